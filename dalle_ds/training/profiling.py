"""A window of training steps under torch.profiler (``logging.profile_at_step``): where a step's
time goes, as a trace to open in Perfetto or chrome://tracing, and a summary by kind of work.

Each rank writes ``profile/rank<r>-steps<a>-<b>.json`` (the trace) and ``.txt`` (the summary:
wall time per step, time per step by kind, then the costliest operations) into the run folder.
On CUDA the summary counts the device's kernel time, so wall time beyond its total is time the
device waited (for the host, data or a collective); on CPU it counts each operation's own time.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from ..files import atomic_write, atomic_write_bytes

# Substrings of kernel and operation names, lower-cased, tried in this order. Attention first:
# SDPA's flash, memory-efficient (fmha) and cuDNN (sdpa) kernels, whose template names may hold
# "cutlass"; FlexAttention (compiled to inductor templates, "triton_tem_*": the eager model has
# no others); our CPU kernel's ops. Then matmuls: cuBLAS's kernels and ATen's mm ops on CPU.
KINDS = {"attention": ("flash", "fmha", "sdpa", "attention", "flex", "triton_tem"),
         "matmul": ("gemm", "nvjet", "cutlass", "mm")}
TOP_OPERATIONS = 30  # rows of the summary's table


def time_by_kind(events, steps: int, on_cuda: bool) -> dict[str, float]:
    """Milliseconds per step of each kind of work (``KINDS``, then "other") in ``events``
    (``profile.key_averages()``): kernel time on CUDA, operations' own CPU time elsewhere."""
    by_kind = dict.fromkeys((*KINDS, "other"), 0.0)
    for event in events:
        if on_cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # the CPU side of the same work
        name = event.key.lower()
        kind = next((k for k, words in KINDS.items() if any(w in name for w in words)), "other")
        by_kind[kind] += (event.self_device_time_total if on_cuda else event.self_cpu_time_total) / 1e3 / steps
    return by_kind


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


class StepProfiler:
    """Profiles optimizer steps [first, first + count) of a run; ``first`` 0: never. Call
    ``starting(step)`` before each step and ``finished(step)`` after it (1-based step numbers),
    and ``finished(step, run_ended=True)`` when the loop stops early (a preemption inside the
    window writes what it has). A resumed run past ``first`` profiles nothing."""

    def __init__(self, first: int, count: int, folder: Path, rank: int, device: torch.device):
        self.first, self.last = first, first + count - 1
        self.folder, self.rank, self.on_cuda = Path(folder), rank, device.type == "cuda"
        self._profile, self._began = None, 0.0

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
        line = (f"steps {self.first}-{self.last} profiled: wall {wall:.1f} ms per step (with the profiler's own "
                f"overhead); {'kernel' if self.on_cuda else 'CPU'} ms per step: "
                f"{describe(time_by_kind(events, steps, self.on_cuda))}")
        sort = "self_device_time_total" if self.on_cuda else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=TOP_OPERATIONS, max_name_column_width=70)
        atomic_write_bytes(stem.with_suffix(".txt"), f"{line}\n\n{table}\n".encode())
        self._profile = None
        return f"{line}; trace and table in {stem}.json/.txt"
