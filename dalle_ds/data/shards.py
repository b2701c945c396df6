"""Shard list specs as users write them, and how jobs share the shards.

A spec is one string or a list of strings. Each string holds one or more patterns separated by
commas outside braces (``a/{0..9}.tar,b/*.tar``); a comma inside braces belongs to the brace
expansion (``{a,b}.tar``). A pattern is, after brace expansion:
- a remote URL (``http://``, ``https://``, ``s3://``, ``gs://``, ``pipe:``): brace-expanded, then
  kept as is and never checked, since only the reader can reach it (the tar reader opens them
  with webdataset's gopen, which has no s3 scheme: write ``pipe:aws s3 cp s3://... -``);
- a glob (``data/*.tar``): the matching files;
- a folder: the ``*.tar`` files directly inside it;
- a file path.
Paths are sorted within each pattern; pattern order is kept; a path listed twice is kept once,
where it first appears.

Brace patterns may name shards that do not exist: img2dataset leaves a gap when a whole shard
failed. Those are dropped and listed in ``ShardList.missing`` so the caller can log them; a
pattern that matches nothing at all is an error.

Weighted sources for mixing add ``::weight`` to a pattern: ``a/{0..9}.tar::0.7,b/*.tar::0.3``.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from braceexpand import UnbalancedBracesError, braceexpand

from ..distributed import check_index, dist_env, slurm_array_task

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")
_GLOB_CHARS = ("*", "?", "[")

Spec = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass
class ShardList:
    paths: list[str]  # shards to read, in order
    missing: list[str] = field(default_factory=list)  # brace-expanded local paths that do not exist


@dataclass
class WeightedShardList:
    """The shards of one ``pattern::weight`` source, before they are counted (sources.py)."""

    paths: list[str]
    weight: float  # relative sampling weight (random.choices normalises them)
    missing: list[str] = field(default_factory=list)


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


def expand_shards(spec: Spec) -> ShardList:
    """All shards named by ``spec``; ValueError for a pattern that matches nothing."""
    result = ShardList(paths=[])
    for pattern in _patterns(spec):
        found = _expand_pattern(pattern)
        result.paths += found.paths
        result.missing += found.missing
    result.paths = list(dict.fromkeys(result.paths))
    return result


def parse_sources(spec: str) -> list[WeightedShardList]:
    """Weighted sources from ``pattern[::weight],...``; the weight defaults to 1.0."""
    sources = []
    for part in _patterns(spec):
        pattern, sep, weight_text = part.rpartition("::")
        if not sep:
            pattern, weight_text = part, "1.0"
        if not pattern.strip():
            raise ValueError(f"source {part!r} has a weight but no shard pattern")
        found = _expand_pattern(pattern.strip())
        sources.append(WeightedShardList(found.paths, _parse_weight(weight_text, part), found.missing))
    return sources


def split_for_job(paths: Sequence[str], job_index: int, num_jobs: int) -> list[str]:
    """This job's share of ``paths``: every ``num_jobs``-th one from ``job_index``. The shares of
    all jobs are disjoint and cover every path; round robin keeps them within one shard in size.
    A job may get nothing when there are more jobs than shards."""
    check_index(job_index, num_jobs, "job")
    return list(paths[job_index::num_jobs])


def default_job_partition() -> tuple[int, int]:
    """(job_index, num_jobs) from the launcher's environment: a SLURM job array, else the
    process's rank among its launcher's (torchrun, deepspeed, srun), else (0, 1)."""
    array = slurm_array_task()
    if array is not None:
        return array
    env = dist_env()
    return env.rank, env.world_size


def _parse_weight(text: str, part: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"bad weight {text!r} in source {part!r}: expected a positive number")
    return weight


def _patterns(spec: Spec) -> list[str]:
    items = [spec] if isinstance(spec, (str, os.PathLike)) else spec
    if isinstance(items, bytes) or not isinstance(items, Sequence):
        raise ValueError(f"a shard spec is a string or a list of strings, got {type(spec).__name__}")
    patterns = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"a shard spec is a string or a list of strings, got an item {item!r}")
        patterns += [p.strip() for p in _split_outside_braces(os.fspath(item)) if p.strip()]
    if not patterns:
        raise ValueError(f"the shard spec {spec!r} names no shards")
    return patterns


def _split_outside_braces(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_pattern(pattern: str) -> ShardList:
    """One pattern's shards, sorted; ValueError when it matches nothing."""
    try:
        expanded = list(braceexpand(pattern))
    except UnbalancedBracesError:
        raise ValueError(f"unbalanced braces in shard pattern {pattern!r}") from None
    if is_remote(pattern):
        return ShardList(paths=sorted(set(expanded)))
    paths, missing, checked = [], [], []
    for path in expanded:
        found, how = _resolve_local(path)
        paths += found
        checked.append(how)
        if not found and len(expanded) > 1:
            missing.append(path)
    if not paths:
        kinds = ", ".join(dict.fromkeys(checked))
        if len(expanded) > 1:
            kinds = f"{len(expanded)} brace-expanded paths as {kinds}"
        raise ValueError(f"no shards match {pattern!r} (checked: {kinds})")
    return ShardList(paths=sorted(set(paths)), missing=missing)


def _resolve_local(path: str) -> tuple[list[str], str]:
    """(files, how they were looked for) for one local path, glob or folder."""
    if any(c in path for c in _GLOB_CHARS):
        return sorted(p for p in glob.glob(path) if os.path.isfile(p)), "glob"
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".tar"))
        return [p for p in (os.path.join(path, n) for n in names) if os.path.isfile(p)], "folder"
    return ([path] if os.path.isfile(path) else []), "folder, file"
