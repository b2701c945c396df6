"""manifest.json of a token-shard folder, and the per-shard records jobs merge into it.

Each finished output shard gets a sidecar ``{shard}.stats.json`` (written last, atomically: it is
the shard's "done" mark). Any job can rebuild the manifest from the sidecars; a file lock makes
concurrent jobs on one file system take turns, and since every rebuild reads all sidecars, the
last writer's manifest is complete.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import atomic_write_bytes

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATS_SUFFIX = ".stats.json"
FORMAT = "dalle_ds.token_shards/1"


@dataclass
class ShardRecord:
    name: str  # output shard file name, e.g. 00012.tar
    source: str  # the input shard it came from
    samples: int
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> count
    bytes: int = 0  # the shard file's size: readers check it before trusting ``samples``
    complete: bool = True  # False: the input could not be read whole; a rerun tries it again


@dataclass
class Manifest:
    vae_fingerprint: str
    image_size: int
    grid_size: int
    num_codes: int
    codes_dtype: str  # numpy dtype string, e.g. "<u2"
    shards: list[ShardRecord] = field(default_factory=list)
    format: str = FORMAT

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def rejects(self) -> dict[str, int]:
        total = Counter()
        for s in self.shards:
            total.update(s.rejects)
        return dict(sorted(total.items()))

    @classmethod
    def load(cls, folder) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ValueError(f"{folder} has no {MANIFEST}: is it a token-shard folder written by "
                             f"`dalle-ds pretokenize`?")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is format {data.get('format')!r}, expected {FORMAT!r}")
        data.pop("total_samples", None), data.pop("total_rejects", None)
        data["shards"] = [ShardRecord(**s) for s in data["shards"]]
        return cls(**data)


def _write_json(path: Path, data) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())


def write_shard_record(folder, record: ShardRecord) -> None:
    _write_json(Path(folder) / (record.name + STATS_SUFFIX), asdict(record))


def finished_shards(folder) -> dict[str, ShardRecord]:
    """Output shard name -> its record, for every shard whose sidecar exists and reads back."""
    records = {}
    for path in sorted(Path(folder).glob("*" + STATS_SUFFIX)):
        try:
            record = ShardRecord(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:  # e.g. emptied by a crash: redo that shard
            logger.warning("ignoring unreadable %s (%s); its shard will be redone", path, error)
            continue
        records[record.name] = record
    return records


def check_vae_fingerprint(found: str, expected: str, where, whose: str,
                          fix: str = "use the VAE the shards came from, or pretokenize again") -> None:
    """Token shards only make sense with the dVAE that wrote them."""
    if found != expected:
        raise ValueError(f"the token shards in {where} were made with another dVAE ({found[:12]}) than "
                         f"{whose} ({expected[:12]}); {fix}")


def merge_manifest(folder, header: dict) -> Manifest:
    """Rebuilds manifest.json from all sidecars, under an exclusive lock; refuses to mix shards
    made with another dVAE."""
    folder = Path(folder)
    with open(folder / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = folder / MANIFEST
        if existing.is_file():
            check_vae_fingerprint(Manifest.load(folder).vae_fingerprint, header["vae_fingerprint"], folder,
                                  "this job's VAE", fix="write to a new folder")
        manifest = Manifest(**{**header, "shards": list(finished_shards(folder).values())})
        _write_json(existing, {**asdict(manifest), "total_samples": manifest.total_samples,
                               "total_rejects": manifest.rejects})
    return manifest
