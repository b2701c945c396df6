"""Training streams over shards, resumable exactly: token shards for train-dalle, raw
image-text shards (img2dataset layout) for train-vae and train-clip.

Stages, per epoch (open_clip's data.py order):
  shard list -> deterministic shuffle (seed, epoch), the same on every rank -> split by rank ->
  split by worker -> never-throwing tar reading (raw bytes) -> shuffle buffer (seed, epoch,
  rank, worker) -> decode (code grids, or pixels; never pickle; one of the sample's captions,
  drawn per epoch), rejects counted -> batch -> caption tokenization (truncation counted) -> tensors.
Decoding after the shuffle buffer keeps the buffer to compact bytes, and lets a resumed run
fast-forward over raw samples without decoding them.

Each DataLoader worker runs one *logical* worker's deterministic sequence of batches and tags
every batch with it; the DataLoader hands batches over in round-robin order of workers. The
stream's position is (epoch; per logical worker, batches given and raw samples drawn; the
logical worker due next). Restoring it rebuilds the epoch, lets each logical worker skip the raw
samples it already drew, and rotates logical workers over the DataLoader's so that the worker
due next comes first: the batches that follow are exactly those an uninterrupted run would give.

Epochs have the same number of batches on every rank (the smallest rank's count, from the
shards' sample counts), so distributed steps never wait on a rank that has run dry. A worker
whose shards give fewer good samples than counted (rejects, damage) reads them again,
reshuffled, to fill its share: workers never run dry.

A sample with several captions (a txt of several lines, as in COCO) is trained on one of them
per epoch, drawn from (seed, epoch, sample key) alone: a resumed run, a sample read twice and a
token shard of the same image all draw the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import Rejected
from .images import decode_image
from .sources import CountedSource, load_raw_sources, load_token_sources
from .tar_reader import RawSample, RejectCounts, captions_of, image_of, iter_shard
from .token_shards import decode_codes
from .tokenizer import CaptionTokenizer

MAX_REJECTS_IN_ROW = 10_000  # then the data, not a sample, is bad: stop with the reasons


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
    positions: list[int] = field(default_factory=list)  # raw samples drawn this epoch, per logical worker
    next_worker: int = 0  # the logical worker whose batch comes next

    @classmethod
    def start(cls, epoch: int, workers: int) -> "StreamState":
        return cls(epoch, [0] * workers, [0] * workers, 0)


@dataclass(frozen=True)
class Codes:
    """Token shards' samples: the dVAE code grid, row-major."""

    dtype: str  # the manifest's codes_dtype
    length: int  # codes per image
    key = "codes"

    def decode(self, raw: RawSample) -> np.ndarray:
        if "codes" not in raw.files:
            raise Rejected("missing_codes")
        try:
            return decode_codes(raw.files["codes"], np.dtype(self.dtype), self.length)
        except ValueError as error:
            raise Rejected("bad_codes", str(error)) from None

    def tensor(self, stacked: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stacked.astype(np.int64))  # widened only now: small across the worker pipe


@dataclass(frozen=True)
class Pixels:
    """Raw shards' samples: the image, decoded to (3, size, size) uint8 RGB."""

    size: int
    key = "images"

    def decode(self, raw: RawSample) -> np.ndarray:
        return decode_image(image_of(raw)[1], self.size).numpy()

    def tensor(self, stacked: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stacked)  # uint8: images_to_float after the copy to the device


@dataclass
class _WorkerPlan:
    shards: "list[str] | _ShardSampler"  # what the worker reads, in order
    batches: int  # full batches it can give this epoch


class _ShardSampler:
    """An endless, seeded sequence of shards drawn with replacement: a source by weight, then a
    shard of it in proportion to its samples."""

    def __init__(self, sources: list[CountedSource], seed: str):
        self.sources, self.seed = sources, seed

    def __iter__(self):
        rng = random.Random(self.seed)
        weights = [s.weight for s in self.sources]
        while True:
            source = rng.choices(self.sources, weights)[0]
            yield rng.choices([p for p, _ in source.shards], [n for _, n in source.shards])[0]


def _epoch_plans(sources: list[CountedSource], config: StreamConfig, epoch: int, rank: int, world: int,
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


class _EpochDataset(IterableDataset):
    """One epoch of batches from each logical worker; runs inside DataLoader workers."""

    def __init__(self, stream: "ShardStream", plans: list[_WorkerPlan], state: StreamState):
        self.plans, self.state = plans, state
        self.format, self.tokenizer_path = stream.format, stream.tokenizer_path
        self.config, self.text_seq_len, self.rank = stream.config, stream.text_seq_len, stream.rank

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.state.next_worker) % len(self.plans)
        given, planned = self.state.consumed[logical], self.plans[logical].batches
        if given >= planned:
            return
        tokenizer = CaptionTokenizer(self.tokenizer_path) if self.tokenizer_path else None
        rejects = RejectCounts()
        raws = self._shuffled(logical, rejects)
        position = self.state.positions[logical]
        deque(itertools.islice(raws, position), maxlen=0)  # skip what the last run drew, undecoded
        rejects.clear()  # the last run reported these already
        batch, in_row = [], 0
        for raw in raws:
            position += 1
            try:
                batch.append(self._decode(raw, tokenizer is not None))
                in_row = 0
            except Rejected as rejected:
                rejects.add(rejected.reason, raw.key, raw.shard)
                in_row = _check_rejects_in_row(in_row + 1, rejects)
                continue
            if len(batch) == self.config.batch_size:
                yield self._collate(batch, tokenizer, logical, position, rejects)
                batch = []
                rejects.clear()  # each batch reports the rejects met since the previous one
                given += 1
                if given == planned:
                    return

    def _decode(self, raw: RawSample, with_caption: bool):
        caption = draw_caption(captions_of(raw), self.config.seed, self.state.epoch, raw.key) if with_caption else None
        return self.format.decode(raw), caption

    def _passes(self, logical: int, rejects: RejectCounts):
        """The worker's shards, then again, reshuffled, as often as its plan needs; None marks
        the end of each pass."""
        shards = self.plans[logical].shards
        rng = random.Random(f"{self.config.seed}/{self.state.epoch}/{self.rank}/{logical}/passes")
        while True:
            read = 0
            for shard in shards:  # a resampled plan's shards never end
                for raw in iter_shard(shard, rejects):
                    read += 1
                    yield raw
            if read == 0:
                raise ValueError(f"no shard of rank {self.rank}'s data worker {logical} could be read "
                                 f"({dict(rejects.counts)}): check the shards")
            yield None
            shards = rng.sample(shards, len(shards))

    def _shuffled(self, logical: int, rejects: RejectCounts):
        size = self.config.shuffle_buffer
        rng = random.Random(f"{self.config.seed}/{self.state.epoch}/{self.rank}/{logical}")
        buffer = []
        for sample in self._passes(logical, rejects):
            if sample is None:  # a pass's samples all come before the next pass's
                rng.shuffle(buffer)
                yield from buffer
                buffer = []
            elif len(buffer) < size:
                buffer.append(sample)
            elif size:
                i = rng.randrange(size)
                buffer[i], sample = sample, buffer[i]
                yield sample
            else:
                yield sample

    def _collate(self, batch, tokenizer: CaptionTokenizer | None, logical: int, position: int,
                 rejects: RejectCounts) -> dict:
        # numpy arrays, not tensors, cross the worker boundary: pickled through the pipe they
        # cost less than a shared-memory file per tensor
        out = {self.format.key: np.stack([x for x, _ in batch]), "truncated": 0,
               "rejects": rejects.as_dict()["counts"], "worker": logical, "position": position}
        if tokenizer is not None:
            text = tokenizer.encode([caption for _, caption in batch], self.text_seq_len)
            out.update(text=text.ids.numpy(), mask=text.mask.numpy(), truncated=text.truncated)
        return out


def draw_caption(captions: list[str], seed: int, epoch: int, key: str) -> str:
    """The caption a sample is trained on in ``epoch``: see the module doc."""
    if len(captions) == 1:
        return captions[0]
    # a str seed is hashed with sha512: the same draw in every process, whatever PYTHONHASHSEED
    return captions[random.Random(f"{seed}/{epoch}/{key}/caption").randrange(len(captions))]


def _check_rejects_in_row(in_row: int, rejects: RejectCounts) -> int:
    if in_row >= MAX_REJECTS_IN_ROW:
        raise ValueError(f"{in_row} samples in a row were rejected ({dict(rejects.counts)}): the data does not "
                         f"hold what this job reads (images and captions for train-vae/clip, codes for "
                         f"train-dalle); check the shards with dalle-ds decode-check")
    return in_row


def _check_config(config: StreamConfig) -> None:
    if config.batch_size < 1 or config.shuffle_buffer < 0 or config.num_workers < 0:
        raise ValueError(f"stream needs batch_size >= 1, shuffle_buffer >= 0 and num_workers >= 0; got "
                         f"{config.batch_size}, {config.shuffle_buffer}, {config.num_workers}")
    if config.epoch_samples is not None and config.epoch_samples < 1:
        raise ValueError(f"epoch_samples must be >= 1, got {config.epoch_samples}")


def _as_is(batch):
    """DataLoader's default would turn our numpy arrays into tensors inside the worker."""
    return batch


class ShardStream:
    """Batches for one rank, epoch after epoch, from weighted shard sources; each sample decoded
    by ``format`` and, with a tokenizer, its caption tokenized. ``state_dict()`` /
    ``load_state_dict()`` resume it exactly."""

    def __init__(self, sources: list[CountedSource], format: Codes | Pixels, config: StreamConfig | None,
                 tokenizer_path=None, text_seq_len: int = 0, *, rank: int = 0, world_size: int = 1):
        self.sources, self.format = sources, format
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path else None
        self.text_seq_len = text_seq_len
        self.config, self.rank, self.world_size = config or StreamConfig(), rank, world_size
        if not self.config.resampled and len({s.weight for s in self.sources}) > 1:
            raise ValueError("source weights mix sources in resampled mode only; set resampled=True")
        _check_config(self.config)
        self.workers = max(1, self.config.num_workers)
        feeders, num_shards = world_size * self.workers, sum(len(s.shards) for s in self.sources)
        if not self.config.resampled and num_shards < feeders:
            raise ValueError(f"{num_shards} shards cannot feed {world_size} ranks x {self.workers} workers = "
                             f"{feeders} readers; use fewer data workers, resampled mode, or more, smaller shards")
        self.state = StreamState.start(0, self.workers)
        self.rejects = RejectCounts()
        self.truncated_captions = 0
        if self.tokenizer_path:
            CaptionTokenizer(self.tokenizer_path)  # a bad path fails here, not in a worker

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return self._plans(self.state.epoch if epoch is None else epoch)[1]

    def _plans(self, epoch: int):
        return _epoch_plans(self.sources, self.config, epoch, self.rank, self.world_size, self.workers)

    def identity(self) -> str:
        """What a saved position is a position in: the shards, their counts and every setting
        that orders or decodes them. Trainers can compare it across ranks too."""
        parts = [[(p, n, s.weight) for p, n in s.shards] for s in self.sources]
        settings = dataclasses.asdict(self.config)
        blob = json.dumps([parts, settings, self.world_size, self.text_seq_len, repr(self.format)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {**dataclasses.asdict(self.state), "identity": self.identity()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["consumed"]) != self.workers:
            raise ValueError(f"the saved stream position has {len(state['consumed'])} data workers per rank, "
                             f"this run {self.workers}: resume with the same number of workers")
        if state.get("identity") != self.identity():
            raise ValueError("the saved stream position belongs to other data or settings (shards, their counts, "
                             "seed, batch size, workers, ranks, shuffle buffer): resume with the same ones")
        self.state = StreamState(state["epoch"], list(state["consumed"]), list(state["positions"]),
                                 state["next_worker"])

    def __iter__(self):
        while True:
            plans, length = self._plans(self.state.epoch)
            if length == 0:
                raise ValueError(f"rank {self.rank} gets less than one batch of {self.config.batch_size} per epoch; "
                                 f"use a smaller batch or more data")
            if sum(self.state.consumed) < length:
                batches = iter(self._loader(plans))
                while sum(self.state.consumed) < length:
                    yield self._account(next(batches))
                del batches  # stop the workers before the next epoch's start
            self.state = StreamState.start(self.state.epoch + 1, self.workers)

    def _loader(self, plans) -> DataLoader:
        dataset = _EpochDataset(self, plans, dataclasses.replace(self.state, consumed=list(self.state.consumed),
                                                                 positions=list(self.state.positions)))
        # A DataLoader draws a seed for its workers when iterated; its own generator keeps that
        # draw off the global RNG, whose state (dropout masks) a resumed run must not see moved.
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.state.epoch)
        return DataLoader(dataset, batch_size=None, num_workers=self.config.num_workers, collate_fn=_as_is,
                          persistent_workers=False, prefetch_factor=4 if self.config.num_workers else None,
                          generator=generator)

    def _account(self, batch: dict) -> dict:
        worker = batch.pop("worker")
        self.state.consumed[worker] += 1
        self.state.positions[worker] = batch.pop("position")
        self.state.next_worker = (worker + 1) % self.workers
        self.rejects.merge({"counts": batch.pop("rejects"), "records": []})
        self.truncated_captions += batch.pop("truncated")
        out = {self.format.key: self.format.tensor(batch[self.format.key])}
        if "text" in batch:
            out.update(text=torch.from_numpy(batch["text"]), mask=torch.from_numpy(batch["mask"]))
        return out

    def first_samples(self, limit: int) -> list[tuple[np.ndarray, str | None]]:
        """The first good samples of the sources, in order, decoded, each with its first caption:
        the same on every rank, e.g. fixed prompts or images for the trainers' grids."""
        samples = []
        for source in self.sources:
            for shard, _ in source.shards:
                for raw in iter_shard(shard, RejectCounts()):
                    try:
                        samples.append((self.format.decode(raw), captions_of(raw)[0]))
                    except Rejected:
                        continue
                    if len(samples) == limit:
                        return samples
        return samples

    def as_tensor(self, samples: list[tuple[np.ndarray, str | None]]) -> torch.Tensor:
        """The codes or images of some ``first_samples`` as one tensor, as the batches hold them."""
        return self.format.tensor(np.stack([x for x, _ in samples]))


class TokenStream(ShardStream):
    """Batches of {text (b, T) ids, mask (b, T), codes (b, N) long} from token-shard folders."""

    def __init__(self, data, tokenizer_path, text_seq_len: int, config: StreamConfig | None = None, *,
                 rank: int = 0, world_size: int = 1, vae_fingerprint: str | None = None):
        """data: a token-shard folder, or weighted folders ``a::0.7,b::0.3`` (resampled mode)."""
        sources, self.manifest = load_token_sources(str(data), vae_fingerprint)
        codes = Codes(self.manifest.codes_dtype, self.manifest.grid_size**2)
        super().__init__(sources, codes, config, tokenizer_path, text_seq_len, rank=rank, world_size=world_size)


class ImageTextStream(ShardStream):
    """Batches of {images (b, 3, s, s) uint8} from raw image-text shards, plus {text, mask} when
    a tokenizer is given (CLIP; the dVAE needs no captions)."""

    def __init__(self, data, image_size: int, config: StreamConfig | None = None, *, tokenizer_path=None,
                 text_seq_len: int = 0, rank: int = 0, world_size: int = 1):
        """data: shard patterns (``shards/{00000..00099}.tar``, a folder, a glob), weighted
        ``a::0.7,b::0.3`` in resampled mode."""
        config = config or StreamConfig()
        sources = load_raw_sources(str(data), config.resampled)
        super().__init__(sources, Pixels(image_size), config, tokenizer_path, text_seq_len, rank=rank,
                         world_size=world_size)
