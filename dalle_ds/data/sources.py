"""What a training stream reads: weighted sources of shards, each shard with its sample count.

Counts let every rank plan an epoch of equal length before reading a byte. Token shards take
them from their folder's manifest. Raw image-text shards take them from img2dataset's
``{shard}_stats.json`` (``successes``) when it is there, else from the tar's headers (a seek per
member, no data read). Remote shards cannot be counted: they stream in resampled mode, whose
epoch length is set in samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .manifest import Manifest, ShardRecord, check_vae_fingerprint
from .shards import is_remote, parse_sources
from .tar_reader import count_samples


@dataclass
class CountedSource:
    """A weighted source whose shards carry their sample counts: what the stream plans with."""

    shards: list[tuple[str, int]]  # (path, samples)
    weight: float  # relative sampling weight


def load_token_sources(data: str, vae_fingerprint: str | None) -> tuple[list[CountedSource], Manifest]:
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
        sources.append(CountedSource(shards, source.weight))
    expected = vae_fingerprint or next(iter(manifests.values())).vae_fingerprint
    whose = "this model's VAE" if vae_fingerprint else "the other token shards"
    for folder, manifest in manifests.items():
        check_vae_fingerprint(manifest.vae_fingerprint, expected, folder, whose)
    return sources, next(iter(manifests.values()))


def load_raw_sources(data: str, resampled: bool) -> list[CountedSource]:
    """Raw image-text shard patterns (``shards/{00000..00099}.tar`` or weighted
    ``a/*.tar::0.7,b/*.tar::0.3``) -> sources with counted shards."""
    sources = []
    for source in parse_sources(data):
        remote = [p for p in source.paths if is_remote(p)]
        if remote and not resampled:
            raise ValueError(f"remote shards such as {remote[0]} cannot be counted before reading: stream them "
                             f"with data.resampled=true and data.epoch_samples=N")
        # a remote shard weighs as one sample: resampled mode draws them uniformly
        shards = [(p, 1 if is_remote(p) else raw_shard_samples(p)) for p in source.paths]
        shards = [(p, n) for p, n in shards if n > 0]
        if not shards:
            raise ValueError(f"source {source.paths[0] if source.paths else data!r} holds no image samples")
        sources.append(CountedSource(shards, source.weight))
    return sources


def raw_shard_samples(path: str) -> int:
    stats = Path(path).with_name(Path(path).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):  # absent or not img2dataset's: count headers
        return count_samples(path)


def _check_size(path: Path, record: ShardRecord) -> None:
    """Every rank checks every shard, so a damaged one stops all ranks alike, before training,
    rather than quietly shortening the data (its workers would fill epochs with repeats)."""
    size = path.stat().st_size if path.exists() else -1
    if record.bytes and size != record.bytes:
        raise ValueError(f"token shard {path} is {size} bytes, its manifest says {record.bytes}: it was damaged "
                         f"or replaced; delete it and its .stats.json and run pretokenize again")
