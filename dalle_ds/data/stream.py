"""The training stream over token shards, resumable exactly.

Stages, per epoch (open_clip's data.py order):
  shard list -> deterministic shuffle (seed, epoch), the same on every rank -> split by rank ->
  split by worker -> never-throwing tar reading -> decode our members only (codes, txt; raw
  bytes, never pickle) -> shuffle buffer (seed, epoch, rank, worker) -> batch -> caption
  tokenization (truncation counted) -> tensors.

Each DataLoader worker runs one *logical* worker's deterministic sequence of batches and tags
every batch with it; the DataLoader hands batches over in round-robin order of workers. The
stream's position is (epoch, batches consumed per logical worker, the logical worker due next).
Restoring it rebuilds the epoch, lets each logical worker fast-forward over what it already gave
(reading raw bytes only), and rotates logical workers over the DataLoader's so that the worker
due next comes first: the batches that follow are exactly those an uninterrupted run would give.

Epochs have the same number of batches on every rank (the smallest rank's count, from the
manifest), so distributed steps never wait on a rank that has run dry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import Rejected
from .manifest import Manifest, ShardRecord, check_vae_fingerprint
from .shards import parse_sources
from .tar_reader import RejectCounts, caption_of, iter_shard
from .token_shards import decode_codes
from .tokenizer import CaptionTokenizer


@dataclass
class StreamConfig:
    batch_size: int = 64  # samples per batch on each rank
    shuffle_buffer: int = 2_000  # samples mixed across shards by each worker; 0 = no shuffle
    seed: int = 0  # shard order and buffer draws derive from (seed, epoch, rank, worker)
    num_workers: int = 2  # DataLoader worker processes per rank; 0 = read in the training process
    # Resampled mode: each worker draws shards with replacement, choosing sources by their weights
    # (``tokens_a::0.7,tokens_b::0.3``); an epoch is then ``epoch_samples`` samples (all ranks
    # together; default: as many as the sources hold).
    resampled: bool = False
    epoch_samples: int | None = None


@dataclass
class StreamState:
    epoch: int = 0
    consumed: list[int] = field(default_factory=list)  # batches consumed this epoch, per logical worker
    next_worker: int = 0  # the logical worker whose batch comes next


@dataclass
class _TokenSource:
    shards: list[tuple[str, int]]  # (path, samples per the manifest)
    weight: float


@dataclass
class _WorkerPlan:
    shards: "list[str] | _ShardSampler"  # what the worker reads, in order
    batches: int  # full batches it can give this epoch


class _ShardSampler:
    """An endless, seeded sequence of shards drawn with replacement: a source by weight, then a
    shard of it in proportion to its samples."""

    def __init__(self, sources: list[_TokenSource], seed: str):
        self.sources, self.seed = sources, seed

    def __iter__(self):
        rng = random.Random(self.seed)
        weights = [s.weight for s in self.sources]
        while True:
            source = rng.choices(self.sources, weights)[0]
            yield rng.choices([p for p, _ in source.shards], [n for _, n in source.shards])[0]


def _epoch_plans(sources: list[_TokenSource], config: StreamConfig, epoch: int, rank: int, world: int,
                 workers: int) -> tuple[list[_WorkerPlan], int]:
    """This rank's logical workers' plans for ``epoch``, and the epoch length in batches: the
    same on every rank (in finite mode the smallest rank's)."""
    if config.resampled:
        total = config.epoch_samples or sum(n for s in sources for _, n in s.shards)
        length = total // (world * config.batch_size)
        seeds = [f"{config.seed}/{epoch}/{rank}/{w}/shards" for w in range(workers)]
        return [_WorkerPlan(_ShardSampler(sources, seed), length) for seed in seeds], length
    order = [shard for source in sources for shard in source.shards]
    random.Random(f"{config.seed}/{epoch}").shuffle(order)  # identical on all ranks

    def plans_of(r):
        mine = order[r::world]
        return [_WorkerPlan([p for p, _ in mine[w::workers]], sum(n for _, n in mine[w::workers]) // config.batch_size)
                for w in range(workers)]

    length = min(sum(p.batches for p in plans_of(r)) for r in range(world))
    return plans_of(rank), length


def _load_sources(data: str, vae_fingerprint: str | None) -> tuple[list[_TokenSource], Manifest]:
    """Token-shard folders (``a`` or ``a::0.7,b::0.3``) -> sources with their manifests' counts;
    all folders must come from one dVAE: the model's, when its fingerprint is given."""
    manifests: dict[Path, Manifest] = {}
    sources = []
    for source in parse_sources(data):
        shards = []
        for path in map(Path, source.paths):
            if path.parent not in manifests:
                manifests[path.parent] = Manifest.load(path.parent)
            record = next((r for r in manifests[path.parent].shards if r.name == path.name), None)
            if record is not None and record.samples > 0:  # else empty, or not finished (being written)
                _check_size(path, record)
                shards.append((str(path), record.samples))
        if not shards:
            raise ValueError(f"source {source.paths[0] if source.paths else data!r} holds no token samples")
        sources.append(_TokenSource(shards, source.weight))
    expected = vae_fingerprint or next(iter(manifests.values())).vae_fingerprint
    whose = "this model's VAE" if vae_fingerprint else "the other token shards"
    for folder, manifest in manifests.items():
        check_vae_fingerprint(manifest.vae_fingerprint, expected, folder, whose)
    return sources, next(iter(manifests.values()))


def _check_size(path: Path, record: ShardRecord) -> None:
    """Every rank checks every shard, so a damaged one stops all ranks alike, before training:
    a rank that ran dry mid-epoch would leave the others waiting on it."""
    size = path.stat().st_size if path.exists() else -1
    if record.bytes and size != record.bytes:
        raise ValueError(f"token shard {path} is {size} bytes, its manifest says {record.bytes}: it was damaged "
                         f"or replaced; delete it and its .stats.json and run pretokenize again")


class _EpochDataset(IterableDataset):
    """One epoch of batches from each logical worker; runs inside DataLoader workers."""

    def __init__(self, stream: "TokenStream", plans: list[_WorkerPlan], state: StreamState):
        self.plans, self.state = plans, state
        self.tokenizer_path, self.config = stream.tokenizer_path, stream.config
        self.text_seq_len, self.rank = stream.text_seq_len, stream.rank
        self.dtype, self.codes_per_image = np.dtype(stream.manifest.codes_dtype), stream.manifest.grid_size**2

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.state.next_worker) % len(self.plans)
        tokenizer = CaptionTokenizer(self.tokenizer_path)
        rejects = RejectCounts()
        batch_size, skip = self.config.batch_size, self.state.consumed[logical]
        batch = []
        for i, sample in enumerate(self._shuffled(logical, rejects)):
            if i < skip * batch_size:  # fast-forward over raw bytes, as far as the last run got
                if i == skip * batch_size - 1:
                    rejects.clear()  # the last run reported these already
                continue
            batch.append(sample)
            if len(batch) == batch_size:
                yield self._collate(batch, tokenizer, logical, rejects)
                batch = []
                rejects.clear()  # each batch reports the rejects met since the previous one

    def _samples(self, logical: int, rejects: RejectCounts):
        for shard in self.plans[logical].shards:
            for raw in iter_shard(shard, rejects):
                try:
                    yield self._codes(raw), caption_of(raw)
                except Rejected as rejected:
                    rejects.add(rejected.reason, raw.key, shard)

    def _codes(self, raw) -> np.ndarray:
        if "codes" not in raw.files:
            raise Rejected("missing_codes")
        try:
            return decode_codes(raw.files["codes"], self.dtype, self.codes_per_image)
        except ValueError as error:
            raise Rejected("bad_codes", str(error)) from None

    def _shuffled(self, logical: int, rejects: RejectCounts):
        size = self.config.shuffle_buffer
        if size == 0:
            yield from self._samples(logical, rejects)
            return
        rng = random.Random(f"{self.config.seed}/{self.state.epoch}/{self.rank}/{logical}")
        buffer = []
        for sample in self._samples(logical, rejects):
            if len(buffer) < size:
                buffer.append(sample)
                continue
            i = rng.randrange(size)
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _collate(self, batch, tokenizer: CaptionTokenizer, logical: int, rejects: RejectCounts) -> dict:
        codes = np.stack([c for c, _ in batch])
        text = tokenizer.encode([caption for _, caption in batch], self.text_seq_len)
        # numpy arrays, not tensors, cross the worker boundary: pickled through the pipe they
        # cost less than a shared-memory file per tensor; codes keep their small shard dtype
        # until _account widens them
        return {"text": text.ids.numpy(), "mask": text.mask.numpy(), "codes": codes,
                "truncated": text.truncated, "rejects": rejects.as_dict()["counts"], "worker": logical}


def _check_config(config: StreamConfig) -> None:
    if config.batch_size < 1 or config.shuffle_buffer < 0 or config.num_workers < 0:
        raise ValueError(f"stream needs batch_size >= 1, shuffle_buffer >= 0 and num_workers >= 0; got "
                         f"{config.batch_size}, {config.shuffle_buffer}, {config.num_workers}")
    if config.epoch_samples is not None and config.epoch_samples < 1:
        raise ValueError(f"epoch_samples must be >= 1, got {config.epoch_samples}")


def _as_is(batch):
    """DataLoader's default would turn our numpy arrays into tensors inside the worker."""
    return batch


class TokenStream:
    """Batches of {text (b, T) ids, mask (b, T), codes (b, N)} from a token-shard folder, epoch
    after epoch, for one rank. ``state_dict()`` / ``load_state_dict()`` resume it exactly."""

    def __init__(self, data, tokenizer_path, text_seq_len: int, config: StreamConfig | None = None, *,
                 rank: int = 0, world_size: int = 1, vae_fingerprint: str | None = None):
        """data: a token-shard folder, or weighted folders ``a::0.7,b::0.3`` (resampled mode)."""
        self.tokenizer_path, self.text_seq_len = str(tokenizer_path), text_seq_len
        self.config, self.rank, self.world_size = config or StreamConfig(), rank, world_size
        self.sources, self.manifest = _load_sources(str(data), vae_fingerprint)
        if not self.config.resampled and len({s.weight for s in self.sources}) > 1:
            raise ValueError("source weights mix sources in resampled mode only; set resampled=True")
        _check_config(self.config)
        self.workers = max(1, self.config.num_workers)
        feeders, num_shards = world_size * self.workers, sum(len(s.shards) for s in self.sources)
        if not self.config.resampled and num_shards < feeders:
            raise ValueError(f"{num_shards} token shards cannot feed {world_size} ranks x "
                             f"{self.workers} workers = {feeders} readers; use fewer data workers, "
                             f"resampled mode, or pretokenize into more, smaller shards")
        self.state = StreamState(consumed=[0] * self.workers)
        self.rejects = RejectCounts()
        self.truncated_captions = 0
        CaptionTokenizer(self.tokenizer_path)  # a bad path fails here, not in a worker

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return self._plans(self.state.epoch if epoch is None else epoch)[1]

    def _plans(self, epoch: int):
        return _epoch_plans(self.sources, self.config, epoch, self.rank, self.world_size, self.workers)

    def identity(self) -> str:
        """What a saved position is a position in: the shards, their counts and every setting
        that orders them. Trainers can compare it across ranks too."""
        parts = [[(p, n, s.weight) for p, n in s.shards] for s in self.sources]
        settings = dataclasses.asdict(self.config)
        blob = json.dumps([parts, settings, self.world_size, self.text_seq_len], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "consumed": list(self.state.consumed),
                "next_worker": self.state.next_worker, "identity": self.identity()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["consumed"]) != self.workers:
            raise ValueError(f"the saved stream position has {len(state['consumed'])} data workers per rank, "
                             f"this run {self.workers}: resume with the same number of workers")
        if state.get("identity") != self.identity():
            raise ValueError("the saved stream position belongs to other data or settings (shards, their counts, "
                             "seed, batch size, workers, ranks, shuffle buffer): resume with the same ones")
        self.state = StreamState(state["epoch"], list(state["consumed"]), state["next_worker"])

    def __iter__(self):
        while True:
            plans, length = self._plans(self.state.epoch)
            if length == 0:
                raise ValueError(f"rank {self.rank} gets less than one batch of {self.config.batch_size} per epoch; "
                                 f"use a smaller batch or more data")
            batches = iter(self._loader(plans)) if sum(self.state.consumed) < length else iter(())
            while sum(self.state.consumed) < length:
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(f"rank {self.rank} ran out of samples in epoch {self.state.epoch}: token "
                                     f"shards hold fewer samples than their manifest says; pretokenize them again")
                yield self._account(batch)
            del batches  # stop the workers before the next epoch's start
            self.state = StreamState(self.state.epoch + 1, [0] * self.workers, 0)

    def _loader(self, plans) -> DataLoader:
        dataset = _EpochDataset(self, plans, StreamState(self.state.epoch, list(self.state.consumed),
                                                         self.state.next_worker))
        # A DataLoader draws a seed for its workers when iterated; its own generator keeps that
        # draw off the global RNG, whose state (dropout masks) a resumed run must not see moved.
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.state.epoch)
        return DataLoader(dataset, batch_size=None, num_workers=self.config.num_workers, collate_fn=_as_is,
                          persistent_workers=False, prefetch_factor=4 if self.config.num_workers else None,
                          generator=generator)

    def _account(self, batch: dict) -> dict:
        worker = batch.pop("worker")
        self.state.consumed[worker] += 1
        self.state.next_worker = (worker + 1) % self.workers
        self.rejects.merge({"counts": batch.pop("rejects"), "records": []})
        self.truncated_captions += batch.pop("truncated")
        return {"text": torch.from_numpy(batch["text"]), "mask": torch.from_numpy(batch["mask"]),
                "codes": torch.from_numpy(batch["codes"].astype(np.int64))}


def first_captions(data, limit: int) -> list[str]:
    """The first good captions of a token-shard folder (or sources spec), in manifest order: the
    same on every rank, e.g. to draw sample grids for."""
    captions = []
    for source in _load_sources(str(data), None)[0]:
        for shard, _ in source.shards:
            for raw in iter_shard(shard, RejectCounts()):
                try:
                    captions.append(caption_of(raw))
                except Rejected:
                    continue
                if len(captions) == limit:
                    return captions
    return captions
