"""The pretokenize job: image-text shards -> token shards through a frozen dVAE.

One output shard per input shard, named after it. A shard is written to a temporary name and
renamed when complete, then its stats sidecar marks it done; rerunning skips done shards, so a
killed job resumes where it stopped and never leaves a partial shard that looks finished. Jobs
take disjoint subsets of the input shards (``--job-index/--num-jobs``), so any number can run at
once, on any machines sharing the output folder.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.image_tokenizer import ImageTokenizer
from ..models.pretrained import model_fingerprint
from .errors import Rejected
from .images import decode_image, images_to_float
from .manifest import ShardRecord, finished_shards, merge_manifest, write_shard_record
from .shards import split_for_job
from .tar_reader import RejectCounts, image_and_captions, iter_shard
from .token_shards import TokenSample, TokenShardWriter, codes_dtype


@dataclass
class PretokenizeSummary:
    shards_written: int = 0
    shards_skipped: int = 0  # already done by an earlier run or another job
    shards_incomplete: int = 0  # input unreadable or cut short: written as far as it went, retried on rerun
    samples: int = 0
    rejects: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    total_samples_in_folder: int = 0

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        rejects = ", ".join(f"{k} {v}" for k, v in sorted(self.rejects.items())) or "none"
        retry = f" ({self.shards_incomplete} from damaged input: rerun to retry them)" if self.shards_incomplete else ""
        return (f"pretokenize: {self.shards_written} shards written{retry}, {self.shards_skipped} already done, "
                f"{self.samples} samples ({rate:.0f}/s), rejected: {rejects}; "
                f"folder now holds {self.total_samples_in_folder} samples")


_INPUT_DAMAGE = {"unreadable_shard", "truncated_shard"}  # may be passing trouble (a remote outage)


def output_name(shard: str) -> str:
    """The output file name for an input shard: its base name, as a .tar. For remote specs it
    is the last path-like token (``pipe:aws s3 cp s3://b/00001.tar -`` -> ``00001.tar``)."""
    tokens = [t for t in shard.split() if "/" in t or t.endswith(".tar")] or [shard]
    base = tokens[-1].split("?")[0].split("#")[0].rstrip("/").rsplit("/", 1)[-1]
    return base if base.endswith(".tar") else base + ".tar"


def output_names(shards: list[str]) -> dict[str, str]:
    """Input shard -> output shard file name; names must not clash."""
    names = {shard: output_name(shard) for shard in shards}
    clashes = [n for n, c in Counter(names.values()).items() if c > 1]
    if clashes:
        raise ValueError(f"input shards from different folders share the name {clashes[0]!r}; "
                         f"pretokenize each folder into its own output folder")
    return names


def manifest_header(vae: ImageTokenizer) -> dict:
    return dict(vae_fingerprint=model_fingerprint(vae), image_size=vae.image_size, grid_size=vae.grid_size,
                num_codes=vae.num_tokens, codes_dtype=codes_dtype(vae.num_tokens).str)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Encoder:
    """Batches decoded images through the frozen VAE (bf16 autocast on GPU)."""

    def __init__(self, vae: ImageTokenizer, device: torch.device):
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        batch = images_to_float(torch.stack(images).to(self.device, non_blocking=True))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            return self.vae.get_codebook_indices(batch).cpu()


def pretokenize_shard(source: str, out_path: Path, encoder: _Encoder, batch_size: int, progress=None) -> ShardRecord:
    """Writes one token shard; returns its record. Bad samples are skipped and counted."""
    rejects = RejectCounts()
    dtype = codes_dtype(encoder.vae.num_tokens)
    writer = TokenShardWriter(out_path, dtype)
    pending: list[tuple[str, torch.Tensor, str]] = []

    def flush():
        codes = encoder([image for _, image, _ in pending]).numpy()
        for (key, _, caption), row in zip(pending, codes):
            meta = {"source_key": key, "source_shard": Path(source).name}
            writer.write(TokenSample(key, row, caption, meta))
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    try:
        for raw in iter_shard(source, rejects):
            try:
                _, image_bytes, captions = image_and_captions(raw)
                # all captions, one per line: train-dalle's stream draws one per epoch, as train-clip's does
                pending.append((raw.key, decode_image(image_bytes, encoder.vae.image_size), "\n".join(captions)))
            except Rejected as rejected:
                rejects.add(rejected.reason, raw.key, source)
                continue
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        count = writer.commit()
    except BaseException:
        writer.abort()
        raise
    _write_rejects_log(out_path, rejects)
    counts = rejects.as_dict()["counts"]
    return ShardRecord(name=out_path.name, source=str(source), samples=count, rejects=counts,
                       bytes=out_path.stat().st_size, complete=not set(counts) & _INPUT_DAMAGE)


def _write_rejects_log(out_path: Path, rejects: RejectCounts) -> None:
    records = rejects.as_dict()["records"]
    if records:
        lines = [json.dumps({"key": k, "shard": s, "reason": r}) for k, s, r in records]
        out_path.with_name(out_path.name + ".rejects.jsonl").write_text("\n".join(lines) + "\n")


def pretokenize(shards: list[str], vae: ImageTokenizer, out_dir, *, job_index: int = 0, num_jobs: int = 1,
                batch_size: int = 64, device: torch.device | None = None, progress: bool = True) -> PretokenizeSummary:
    """Pretokenizes this job's share of ``shards`` into ``out_dir`` and updates its manifest."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = manifest_header(vae)
    merge_manifest(out, header)  # refuses a folder made with another dVAE before any work
    names = output_names(shards)
    encoder = _Encoder(vae, device or default_device())
    summary, start = PretokenizeSummary(), time.perf_counter()
    done = finished_shards(out)
    bar = _progress_bar(progress)
    try:
        for source in split_for_job(shards, job_index, num_jobs):
            if names[source] in done and done[names[source]].complete:
                summary.shards_skipped += 1
                continue
            record = pretokenize_shard(source, out / names[source], encoder, batch_size, bar)
            write_shard_record(out, record)
            summary.shards_written += 1
            summary.shards_incomplete += not record.complete
            summary.samples += record.samples
            summary.rejects.update(record.rejects)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - start
    summary.total_samples_in_folder = merge_manifest(out, header).total_samples
    return summary


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" samples", desc="pretokenize", smoothing=0.1)
