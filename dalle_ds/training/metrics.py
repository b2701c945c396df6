"""What a run reports, from rank 0: TensorBoard scalars in the run folder and one JSON line per
logged step in ``metrics.jsonl`` (easy to diff between runs, e.g. after a resume)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class Throughput:
    """Tokens and samples per second between two logging points, and the share of that time
    spent waiting for data."""

    def __init__(self):
        self.start = time.perf_counter()
        self.samples = self.tokens = 0
        self.data_wait = 0.0

    def add(self, samples: int, tokens: int, data_wait: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.data_wait += data_wait

    def read(self, world_size: int, flops_per_token: float, peak_flops: float | None) -> dict:
        """Global rates (this rank's counts times the ranks: every rank has the same batch)."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rates = {"perf/samples_per_s": self.samples * world_size / seconds,
                 "perf/samples_per_s_per_device": self.samples / seconds,
                 "perf/tokens_per_s": self.tokens * world_size / seconds,
                 "perf/tokens_per_s_per_device": self.tokens / seconds,
                 "perf/data_wait_share": self.data_wait / seconds}
        if peak_flops:
            rates["perf/mfu"] = self.tokens / seconds * flops_per_token / peak_flops
        self.__init__()
        return rates


class MetricsWriter:
    """TensorBoard + metrics.jsonl on rank 0; does nothing on other ranks."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def image_grid(self, step: int, tag: str, images, captions: list[str], columns: int = 4) -> None:
        """Images in [0, 1] as one captioned grid (the one decode-check draws)."""
        if not self.enabled:
            return
        import numpy as np

        from ..grids import caption_grid

        grid = np.asarray(caption_grid(images.float().cpu(), captions, columns))
        self.tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def dalle_flops_per_token(model) -> float:
    """Training FLOPs per token: 6 x the matmul parameters a token passes through (2 forward,
    4 backward), plus causal attention's 6 x n x inner_dim per layer (scores and values over on
    average n/2 keys, x3 for backward); an upper bound for sparse layers."""
    blocks = model.transformer.blocks
    attn = blocks[0].attn
    inner = attn.to_qkv.out_features // 3
    n = model.layout.total_len - 1
    per_block = sum(p.numel() for p in blocks[0].parameters() if p.ndim == 2)
    head = model.to_image_logits.weight.numel()
    return 6 * (len(blocks) * per_block + head) + 6 * len(blocks) * n * inner


def measure_peak_flops(dtype, seconds: float = 0.3) -> float:
    """This device's matmul FLOP/s in ``dtype``: the denominator of MFU when none is configured."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 4096 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def training_flops(model, loss_fn) -> float:
    """FLOPs of one forward and backward of ``loss_fn()`` (a scalar loss of ``model``), as torch's
    FlopCounterMode counts them: matmuls and convolutions, the work MFU is about. The gradients
    it leaves are cleared."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def codebook_usage(counts) -> dict:
    """From how often each code was chosen: the perplexity of that distribution (the number of
    codes in effective use) and the codes never chosen."""
    p = counts.double() / counts.sum().clamp(min=1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum()
    return {"vae/codebook_perplexity": float(entropy.exp()), "vae/dead_codes": int((counts == 0).sum())}
