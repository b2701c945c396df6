"""Token shards: what pretokenization writes and train-dalle streams.

A token shard is a tar in WebDataset layout. Each sample ``{key}`` holds
- ``{key}.codes``: the dVAE code grid, row-major, raw little-endian integers of the dtype named
  in the folder's manifest (the smallest that fits the codebook);
- ``{key}.txt``: the caption, UTF-8; several captions of one image, one per line;
- ``{key}.json``: metadata: the source key and shard.
Raw bytes and JSON only: reading a shard never unpickles anything.

Tars are written deterministically (members in write order, zero mtime and owner), so the same
input always gives byte-identical shards, whichever job or machine wrote them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import fsync_file, temporary_name


def codes_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned little-endian integer type holding ids in [0, num_codes)."""
    for dtype in ("<u1", "<u2", "<u4"):
        if num_codes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"num_codes {num_codes} does not fit in 32 bits")


@dataclass
class TokenSample:
    key: str
    codes: np.ndarray  # (grid * grid,) integers
    caption: str  # several captions are one per line
    meta: dict


def encode_sample(sample: TokenSample, dtype: np.dtype) -> dict[str, bytes]:
    """Member suffix -> bytes for one sample."""
    return {
        "codes": np.ascontiguousarray(sample.codes, dtype=dtype).tobytes(),
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }


def decode_codes(data: bytes, dtype: np.dtype, num_codes_per_image: int) -> np.ndarray:
    codes = np.frombuffer(data, dtype=dtype)
    if codes.size != num_codes_per_image:
        raise ValueError(f"expected {num_codes_per_image} codes, found {codes.size}")
    return codes


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One file in a tar, with no mtime or owner: the same bytes make the same tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes one tar under a temporary name unique to this writer; ``commit()`` renames it into
    place, so a killed job never leaves a partial shard under the final name, and two jobs on one
    shard never write the same file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        add_member(self._tar, name, data)

    def commit(self) -> int:
        self._tar.close()
        fsync_file(self.tmp)
        os.replace(self.tmp, self.path)
        return self.count

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


class TokenShardWriter(ShardWriter):
    """A token shard: codes of ``dtype``, caption and metadata per sample."""

    def __init__(self, path: Path, dtype: np.dtype):
        super().__init__(path)
        self.dtype = dtype

    def write(self, sample: TokenSample) -> None:
        for suffix, data in encode_sample(sample, self.dtype).items():
            self.add(f"{sample.key}.{suffix}", data)
        self.count += 1
