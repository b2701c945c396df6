"""Training streams over shards, resumable exactly: token shards for train-dalle, raw
image-text shards (img2dataset layout) for train-vae and train-clip.

Stages, per epoch (open_clip's data.py order):
  shard list -> deterministic shuffle (seed, epoch), the same on every rank -> split by rank ->
  split by worker -> never-throwing tar reading (raw bytes; samples outside the shards' counts,
  such as a raw sample without an image, rejected) -> shuffle buffer (seed, epoch, rank,
  worker) -> decode (code grids, or pixels; never pickle; one of the sample's captions,
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

Resumed on another layout of ranks x workers (elastic), the stream replays every old reader's
draws on sample indices, from the shards' counts alone, and deals the samples no one drew to
the new readers: the rest of the interrupted epoch, none twice while the shards hold what their
counts say. The position then records the earlier stretches (``StreamState.history``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
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
    # Earlier stretches of this epoch, read by another layout of ranks x workers (an elastic
    # resume): each {"world", "workers", "positions": per rank, per worker, "batches": per rank}
    history: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, epoch: int, workers: int) -> "StreamState":
        return cls(epoch, [0] * workers, [0] * workers, 0)


@dataclass(frozen=True)
class Codes:
    """Token shards' samples: the dVAE code grid, row-major."""

    dtype: str  # the manifest's codes_dtype
    length: int  # codes per image
    key = "codes"

    def check_counted(self, raw: RawSample) -> None:
        """Every sample of a token shard is in its manifest's count."""

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

    def check_counted(self, raw: RawSample) -> None:
        """Rejected unless the shard's count includes it: raw shards count samples with an image."""
        image_of(raw)

    def decode(self, raw: RawSample) -> np.ndarray:
        return decode_image(image_of(raw)[1], self.size).numpy()

    def tensor(self, stacked: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stacked)  # uint8: images_to_float after the copy to the device


@dataclass
class _WorkerPlan:
    shards: "list[str] | _ShardSampler"  # what the worker reads, in order
    batches: int  # full batches it can give this epoch
    keep: dict[str, np.ndarray] | None = None  # after an elastic resume: each shard's samples still to read


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


def _seed(config: StreamConfig, epoch: int, segment: int, *where) -> str:
    """The seed of one random stage: (seed, epoch, rank, worker, ...); a stretch of the epoch
    after an elastic resume (segment > 0) draws anew."""
    stretch = f"/{segment}" if segment else ""
    return "/".join(map(str, (config.seed, f"{epoch}{stretch}", *where)))


def _epoch_order(sources: list[CountedSource], config: StreamConfig, epoch: int) -> list[tuple[str, int]]:
    order = [shard for source in sources for shard in source.shards]
    random.Random(f"{config.seed}/{epoch}").shuffle(order)  # identical on all ranks
    return order


def _epoch_plans(sources: list[CountedSource], config: StreamConfig, epoch: int, rank: int, world: int,
                 workers: int, segment: int = 0) -> tuple[list[_WorkerPlan], int]:
    """This rank's logical workers' plans for ``epoch``, and the epoch length in batches: the
    same on every rank (in finite mode the smallest rank's)."""
    if config.resampled:
        total = config.epoch_samples or sum(n for s in sources for _, n in s.shards)
        length = total // (world * config.batch_size)
        seeds = [_seed(config, epoch, segment, rank, w, "shards") for w in range(workers)]
        return [_WorkerPlan(_ShardSampler(sources, seed), length) for seed in seeds], length
    every = _every_ranks_plans(sources, config, epoch, world, workers)
    return every[rank], min(sum(p.batches for p in plans) for plans in every)


def _every_ranks_plans(sources: list[CountedSource], config: StreamConfig, epoch: int, world: int,
                       workers: int) -> list[list[_WorkerPlan]]:
    """Finite mode: each rank's logical workers' plans, the epoch's shards split by rank, then by worker."""
    order = _epoch_order(sources, config, epoch)

    def plans_of(r):
        mine = order[r::world]
        return [_WorkerPlan([p for p, _ in mine[w::workers]], sum(n for _, n in mine[w::workers]) // config.batch_size)
                for w in range(workers)]

    return [plans_of(r) for r in range(world)]


def _buffer_shuffle(items, size: int, rng: random.Random):
    """A shuffle buffer of ``size`` over ``items``, in which None ends a pass: a pass's items
    all come out before the next pass's. The one home of the draws a resumed run replays."""
    buffer = []
    for item in items:
        if item is None:
            rng.shuffle(buffer)
            yield from buffer
            buffer = []
        elif len(buffer) < size:
            buffer.append(item)
        elif size:
            i = rng.randrange(size)
            buffer[i], item = item, buffer[i]
            yield item
        else:
            yield item


# ---- elastic resume: the rest of an epoch on another layout of ranks x workers ----------------

def _layout_plans(sources: list[CountedSource], config: StreamConfig, epoch: int, history: list[dict], rank: int,
                  world: int, workers: int) -> tuple[list[_WorkerPlan], int]:
    """``_epoch_plans``, or after an elastic resume (``history``: the stretches read before) the
    plans for what the epoch has left. In finite mode that is every sample no earlier stretch
    drew, each shard dealt whole to the reader with the fewest samples so far; in resampled mode,
    fresh draws for the samples the epoch has left."""
    segment = len(history)
    if not segment:
        return _epoch_plans(sources, config, epoch, rank, world, workers)
    if config.resampled:
        plans, length = _epoch_plans(sources, config, epoch, rank, world, workers, segment)
        given = sum(stretch["batches"] * stretch["world"] for stretch in history) * config.batch_size
        length = max(length * world * config.batch_size - given, 0) // (world * config.batch_size)
        return [dataclasses.replace(p, batches=length) for p in plans], length
    every = _pool_plans(_remaining(sources, config, epoch, history), config.batch_size, world, workers)
    return every[rank], min(sum(p.batches for p in plans) for plans in every)


def _remaining(sources: list[CountedSource], config: StreamConfig, epoch: int,
               history: list[dict]) -> list[tuple[str, np.ndarray]]:
    """(shard, indices of its counted samples not drawn yet) in epoch order, after the stretches
    of ``history``: each reader's draws replayed on sample indices, from the shards' counts."""
    counts = {p: n for source in sources for p, n in source.shards}
    pool = [(p, np.arange(n)) for p, n in _epoch_order(sources, config, epoch)]
    for segment, stretch in enumerate(history):
        world, workers = stretch["world"], stretch["workers"]
        every = (_every_ranks_plans(sources, config, epoch, world, workers) if segment == 0
                 else _pool_plans(pool, config.batch_size, world, workers))
        drawn = {p: np.zeros(counts[p], dtype=bool) for p, _ in pool}
        for rank, plans in enumerate(every):
            for worker, plan in enumerate(plans):
                indices = ((p, j) for p in plan.shards
                           for j in (range(counts[p]) if plan.keep is None else plan.keep[p]))
                rng = random.Random(_seed(config, epoch, segment, rank, worker))
                shuffled = _buffer_shuffle(itertools.chain(indices, [None]), config.shuffle_buffer, rng)
                for p, j in itertools.islice(shuffled, stretch["positions"][rank][worker]):
                    drawn[p][j] = True
        pool = [(p, indices[~drawn[p][indices]]) for p, indices in pool]
        pool = [(p, indices) for p, indices in pool if len(indices)]
    return pool


def _pool_plans(pool: list[tuple[str, np.ndarray]], batch_size: int, world: int,
                workers: int) -> list[list[_WorkerPlan]]:
    """Every rank's worker plans for a pool of samples: each shard whole to the reader
    (rank x worker) with the fewest samples so far, in pool order."""
    readers = [(0, reader) for reader in range(world * workers)]
    dealt: list[list[tuple[str, np.ndarray]]] = [[] for _ in readers]
    for shard, indices in pool:
        load, reader = heapq.heappop(readers)
        dealt[reader].append((shard, indices))
        heapq.heappush(readers, (load + len(indices), reader))
    plans = [_WorkerPlan([p for p, _ in mine], sum(len(i) for _, i in mine) // batch_size, dict(mine))
             for mine in dealt]
    return [plans[r * workers:(r + 1) * workers] for r in range(world)]


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
        plan = self.plans[logical]
        shards = plan.shards
        rng = random.Random(self._seed(logical, "passes"))
        while True:
            read = 0
            for shard in shards:  # a resampled plan's shards never end
                keep = None if plan.keep is None else set(plan.keep[shard].tolist())  # the rest of an epoch, elastic
                for j, raw in self._counted(shard, rejects):
                    if keep is None or j in keep:
                        read += 1
                        yield raw
            if read == 0:
                raise ValueError(f"no shard of rank {self.rank}'s data worker {logical} could be read "
                                 f"({dict(rejects.counts)}): check the shards")
            yield None
            shards = rng.sample(shards, len(shards))

    def _counted(self, shard: str, rejects: RejectCounts):
        """(index, sample) of the samples the shard's count includes; the others are rejected
        here, before the shuffle buffer, so that indices and draws follow the counts alone (an
        elastic resume replays them from the counts)."""
        j = 0
        for raw in iter_shard(shard, rejects):
            try:
                self.format.check_counted(raw)
            except Rejected as rejected:
                rejects.add(rejected.reason, raw.key, raw.shard)
                continue
            yield j, raw
            j += 1

    def _shuffled(self, logical: int, rejects: RejectCounts):
        rng = random.Random(self._seed(logical))
        return _buffer_shuffle(self._passes(logical, rejects), self.config.shuffle_buffer, rng)

    def _seed(self, logical: int, *what) -> str:
        return _seed(self.config, self.state.epoch, len(self.state.history), self.rank, logical, *what)

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


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


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
        self._planned = (None, None)  # (epoch, stretches) and their plans
        self.rejects = RejectCounts()
        self.truncated_captions = 0
        if self.tokenizer_path:
            CaptionTokenizer(self.tokenizer_path)  # a bad path fails here, not in a worker

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return self._plans(self.state.epoch if epoch is None else epoch)[1]

    def _plans(self, epoch: int):
        history = self.state.history if epoch == self.state.epoch else []
        key = (epoch, repr(history))
        if self._planned[0] != key:  # after an elastic resume, planning replays the epoch so far: once
            plans = _layout_plans(self.sources, self.config, epoch, history, self.rank, self.world_size, self.workers)
            self._planned = (key, plans)
        return self._planned[1]

    def identity(self) -> str:
        """What a saved position is a position in: the shards, their counts and every setting
        that orders or decodes them, and the layout of ranks x workers. Trainers compare it
        across ranks too."""
        return _digest(self._described(layout=True))

    def data_identity(self) -> str:
        """``identity`` without the layout: what an elastic resume must keep."""
        return _digest(self._described(layout=False))

    def _described(self, layout: bool) -> list:
        parts = [[(p, n, s.weight) for p, n in s.shards] for s in self.sources]
        settings = dataclasses.asdict(self.config)
        if not layout:
            del settings["num_workers"]
        return [parts, settings, *([self.world_size] if layout else []), self.text_seq_len, repr(self.format)]

    def state_dict(self) -> dict:
        return {**dataclasses.asdict(self.state), "identity": self.identity(), "data_identity": self.data_identity()}

    def load_state_dict(self, state: dict) -> None:
        """This rank's saved position (``load_state_dicts`` takes every rank's: it can resume on
        another layout)."""
        if len(state["consumed"]) != self.workers and self.world_size > 1:
            raise ValueError(f"the saved stream position has {len(state['consumed'])} data workers per rank, this "
                             f"stream {self.workers}: give load_state_dicts every rank's position to resume on "
                             f"another layout")
        self.load_state_dicts([state] * self.world_size)

    def load_state_dicts(self, states: list[dict]) -> None:
        """Every rank's saved position, in rank order (a checkpoint holds them all). With the
        same layout of ranks x data workers this rank continues its own exactly. With another
        (an elastic resume), the rest of the interrupted epoch is dealt afresh to the new
        readers: every sample that no rank drew yet, none twice (see ``_layout_plans``)."""
        mine = states[self.rank] if len(states) == self.world_size else states[0]
        if len(states) == self.world_size and len(mine["consumed"]) == self.workers:
            if mine.get("identity") != self.identity():
                raise ValueError("the saved stream position belongs to other data or settings (shards, their "
                                 "counts, seed, batch size, shuffle buffer): resume with the same ones")
            self.state = StreamState(mine["epoch"], list(mine["consumed"]), list(mine["positions"]),
                                     mine["next_worker"], list(mine.get("history", [])))
            return
        if mine.get("data_identity") != self.data_identity():
            raise ValueError("the saved stream position belongs to other data or settings (shards, their counts, "
                             "seed, batch size, shuffle buffer): resume with the same ones")
        epoch, history = mine["epoch"], list(mine.get("history", []))
        world, workers = len(states), len(mine["consumed"])
        length = _layout_plans(self.sources, self.config, epoch, history, 0, world, workers)[1]
        if sum(mine["consumed"]) >= length:  # the epoch was done: the next starts afresh
            self.state = StreamState.start(epoch + 1, self.workers)
            return
        stretch = {"world": world, "workers": workers, "positions": [list(s["positions"]) for s in states],
                   "batches": sum(mine["consumed"])}
        self.state = dataclasses.replace(StreamState.start(epoch, self.workers), history=[*history, stretch])

    def __iter__(self):
        while True:
            plans, length = self._plans(self.state.epoch)
            if length == 0 and not self.state.history:  # (an elastic resume may leave less than a batch)
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
