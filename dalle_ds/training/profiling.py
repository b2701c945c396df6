"""A window of training steps under torch.profiler (``logging.profile_at_step``): where a step's
time goes, as a trace to open in Perfetto or chrome://tracing, and a summary by kind of work.

Each rank writes ``profile/rank<r>-steps<a>-<b>.json`` (the trace) and ``.txt`` (the summary:
wall time per step, time per step by kind, then the costliest operations) into the run folder.
On CUDA the summary counts the device's kernel time, so wall time beyond its total is time the
device waited (for the host, data or a collective); on CPU it counts each operation's own time.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..files import atomic_write, atomic_write_bytes

# Substrings of kernel and operation names, lower-cased, tried in this order. Attention first:
# SDPA's flash, memory-efficient (fmha) and cuDNN (sdpa) kernels, whose template names may hold
# "cutlass"; FlexAttention (compiled to inductor templates, "triton_tem_*": the eager model has
# no others); our CPU kernel's ops. Then matmuls: cuBLAS's kernels and ATen's mm ops on CPU.
KINDS = {"attention": ("flash", "fmha", "sdpa", "attention", "flex", "triton_tem"),
         "matmul": ("gemm", "nvjet", "cutlass", "mm")}
TOP_OPERATIONS = 30  # rows of the summary's table


def kind_of(name: str) -> str:
    """The kind of work (``KINDS``, else "other") of a kernel or operation name."""
    name = name.lower()
    return next((kind for kind, words in KINDS.items() if any(w in name for w in words)), "other")


def sum_by_kind(amounts) -> dict[str, float]:
    """(name, amount) pairs summed by ``kind_of`` their name: every kind, "other" last."""
    by_kind = dict.fromkeys((*KINDS, "other"), 0.0)
    for name, amount in amounts:
        by_kind[kind_of(name)] += amount
    return by_kind


def time_by_kind(events, steps: int, on_cuda: bool) -> dict[str, float]:
    """Milliseconds per step of each kind of work in ``events`` (``profile.key_averages()``):
    kernel time on CUDA (the CPU side of the same work is left out), operations' own CPU time
    elsewhere."""
    own = [(event.key, event.self_device_time_total if on_cuda else event.self_cpu_time_total) for event in events
           if not on_cuda or event.device_type == torch.autograd.DeviceType.CUDA]
    return sum_by_kind((name, us / 1e3 / steps) for name, us in own)


def describe(by_kind: dict[str, float]) -> str:
    total = sum(by_kind.values()) or 1.0
    return ", ".join(f"{kind} {ms:.1f} ({100 * ms / total:.0f}%)" for kind, ms in by_kind.items())


class ComputeCounter(TorchDispatchMode):
    """``with ComputeCounter() as ops:``, then ``ops.count``: the operations dispatched inside that
    compute (views excluded). On a GPU each is a kernel launch or a few, so the count measures a
    step's launch overhead on any machine. It sees the calling thread only: count a backward on
    CPU, where autograd runs it there."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


class TrafficCounter(TorchDispatchMode):
    """``with TrafficCounter() as traffic:``, then ``traffic.bytes``: bytes each operation
    dispatched inside read and wrote, by operation name (``str(func.overloadpacket)``, e.g.
    "aten.mul"): one pass over each tensor it touches, inputs and outputs (an in-place one's self
    counts twice, read then written; an ``out=`` tensor once). Views and bare allocations move
    nothing. Elementwise work, norms, casts and copies are bound by memory bandwidth on a GPU,
    so their bytes bound their kernel time on any machine (``sum_by_kind(traffic.bytes.items())``
    sorts them as kernel time is). Calling thread only, as above."""

    NO_TRAFFIC = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view"})

    def __init__(self):
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if func.is_view or packet.__name__ in self.NO_TRAFFIC:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        seen, in_place = {id(t) for t in inputs}, packet.__name__.endswith("_")
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and (in_place or id(t) not in seen)]
        self.bytes[str(packet)] += sum(t.numel() * t.element_size() for t in inputs + outputs)
        return out


class StepProfiler:
    """Profiles optimizer steps [first, first + count) of a run; ``first`` 0: never. Call
    ``starting(step)`` before each step and ``finished(step)`` after it (1-based step numbers),
    and ``finished(step, run_ended=True)`` when the loop stops early (a preemption inside the
    window writes what it has). A resumed run past ``first`` profiles nothing."""

    def __init__(self, first: int, count: int, folder: Path, rank: int, device: torch.device):
        self.first, self.last = first, first + count - 1
        self.folder, self.rank, self.on_cuda = Path(folder), rank, device.type == "cuda"
        self._profile, self._began = None, 0.0
        self.by_kind: dict[str, float] = {}  # the window's ms per step by kind, once written

    def starting(self, step: int) -> None:
        if self.first and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
            self._profile = profile(activities=activities)
            self._profile.start()
            self._began = time.perf_counter()

    def finished(self, step: int, run_ended: bool = False) -> str | None:
        """After the window's last step (or the run's, inside the window): writes the trace and
        summary; returns the summary's first line (else None)."""
        if self._profile is None or (step != self.last and not run_ended):
            return None
        self.last = step
        if self.on_cuda:
            torch.cuda.synchronize()  # the window's kernels, all of them
        steps = self.last - self.first + 1
        wall = (time.perf_counter() - self._began) * 1e3 / steps
        self._profile.stop()
        stem = self.folder / f"rank{self.rank}-steps{self.first}-{self.last}"
        atomic_write(stem.with_suffix(".json"), lambda tmp: self._profile.export_chrome_trace(str(tmp)))
        events = self._profile.key_averages()
        self.by_kind = time_by_kind(events, steps, self.on_cuda)
        line = (f"steps {self.first}-{self.last} profiled: wall {wall:.1f} ms per step (with the profiler's own "
                f"overhead); {'kernel' if self.on_cuda else 'CPU'} ms per step: {describe(self.by_kind)}")
        sort = "self_device_time_total" if self.on_cuda else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=TOP_OPERATIONS, max_name_column_width=70)
        atomic_write_bytes(stem.with_suffix(".txt"), f"{line}\n\n{table}\n".encode())
        self._profile = None
        return f"{line}; trace and table in {stem}.json/.txt"
