"""Shared helpers of the benchmarks: threads, timing, matmul peak, model FLOPs, the peer.

Imported both by our benchmark scripts (run with /work/main/.venv) and by ``peer_worker.py``
(run with benchmarks/.peer-venv, which has torch but not dalle_ds), so that both sides are
built from the same spec, fed the same inputs and timed by the same code. Nothing here imports
dalle_ds at module level.

A spec is a plain dict (it travels to the peer as JSON):
  dim, depth, heads, dim_head, num_text_tokens, text_seq_len,
  image_size, vae_layers, num_image_tokens (VAE num_tokens), batch, attn_types (optional).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

THREADS = 2
HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".peer-venv" / "bin" / "python"
PEER_WORKER = HERE / "peer_worker.py"
PEER_NOTE = "peer = dalle-pytorch 1.6.6 with its defaults rotary_emb=True, shift_tokens=True"


def set_threads() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def _cpu_seconds():
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for
    children such as the peer worker), to tell how much other processes ran meanwhile."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def header(title: str) -> dict:
    """Prints the title; returns the start snapshot for ``footer``."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"== {title}\ntorch {torch.__version__}, {THREADS} threads, load average at start {load}")
    return {"wall": time.perf_counter(), "cpu": _cpu_seconds()}


def footer(start: dict) -> None:
    """How busy other processes kept the machine during the run: they skew the figures."""
    wall = time.perf_counter() - start["wall"]
    (machine0, own0), (machine1, own1) = start["cpu"], _cpu_seconds()
    foreign = max(0.0, (machine1 - machine0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
    print(f"wall {wall:.0f} s; other processes used {100 * foreign:.0f}% of the machine's CPUs meanwhile"
          + ("  (WARNING: figures skewed by contention, rerun on a quiet machine)" if foreign > 0.05 else ""))


# ---- timing -------------------------------------------------------------------------------

def timeit(fn, warmup: int = 2, repeats: int = 5) -> dict:
    """Runs ``fn`` warmup + repeats times; seconds of the timed runs, median first (on CUDA each
    run waits for the device). ``host_median``: the time until ``fn`` returned, before that wait.
    On CUDA, well below ``median`` means the device is the bottleneck; near it proves nothing (a
    sync inside ``fn``, or a full launch queue, blocks the host on the device too)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, host = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        sync()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "times": times,
            "host_median": statistics.median(host)}


def matmul_peak(dtype: torch.dtype, sizes=(2048, 4096)) -> float:
    """The machine's measured matmul peak in FLOP/s: best of square GEMMs at ``THREADS`` threads."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = max(best, 2 * n**3 / timeit(lambda: a @ b, warmup=1, repeats=3)["min"])
    return best


def peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak RSS rises above its current RSS while ``fn`` runs.
    Meant for a fresh process per measurement (ru_maxrss is a lifetime peak): run ``fn`` first."""
    import resource

    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    fn()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def measure_fresh(script: str, args: list[str], tensor_peak: bool) -> dict:
    """``script --measure *args`` in a fresh process; its last stdout line is JSON. With
    ``tensor_peak``, glibc malloc mmaps every buffer of 64 KiB or more (and unmaps it when
    freed), so that the RSS peak is the peak of live tensor memory rather than of malloc's heap."""
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if tensor_peak else {})}
    proc = subprocess.run([sys.executable, script, "--measure", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"measurement {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the shared workload ------------------------------------------------------------------

def grid(spec: dict) -> int:
    return spec["image_size"] // 2 ** spec["vae_layers"]


def seq_len(spec: dict) -> int:
    """Transformer positions per sample: bos + caption + image codes minus the last one."""
    return spec["text_seq_len"] + grid(spec) ** 2


def make_batch(spec: dict, seed: int = 0, device: str = "cpu"):
    """Identical inputs for both sides: captions (b, T) with no padding, codes (b, N)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, spec["num_text_tokens"], (spec["batch"], spec["text_seq_len"]), generator=g)
    codes = torch.randint(0, spec["num_image_tokens"], (spec["batch"], grid(spec) ** 2), generator=g)
    return text.to(device), codes.to(device)


def train_step_fn(model, text, codes, optimizer=None, autocast_dtype=None):
    """One step of ``model(text, codes, return_loss=True)``: forward, backward and, with an
    optimizer, its step. The same call works for DALLE of dalle_ds and of dalle-pytorch."""
    def step():
        with torch.autocast(text.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(text, codes, return_loss=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    return step


def attention_only_fn(attn, inner_dim: int, batch: int, n: int, call):
    """fwd+bwd of an Attention module whose projections are replaced by Identity, so what runs
    is split heads -> attention kernel -> merge heads, with q, k, v of shape (b, h, n, d).
    ``call(attn, x)`` runs the module (the two libraries call it differently)."""
    attn.to_qkv, attn.to_out = torch.nn.Identity(), torch.nn.Identity()
    x = torch.randn(batch, n, 3 * inner_dim, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def step():
        call(attn, x).sum().backward()
        x.grad = None
    return step


def model_flops(spec: dict) -> float:
    """Model FLOPs of one training step (forward + backward) of our DALLE on a batch of ``spec``.

    The useful work, independent of how a library computes it:
      6 * tokens * (matmul params each token passes through)        [2 fwd + 4 bwd per MAC]
        transformer, per layer: to_qkv dim x 3*inner, to_out inner x dim,
                                GEGLU proj_in dim x 8*dim, proj_out 4*dim x dim;
        logits: text positions through the text head dim x (num_text_tokens + text_seq_len),
                image positions through the image head dim x num_image_tokens.
      + attention: per layer and sample, q k^T and attn v are 2 * n^2 * inner FLOPs each
        forward, halved by causality, times 3 for fwd + bwd: 6 * n^2 * inner * depth * batch
        (= 12 * depth * n^2 * inner * batch / 2).
    Embeddings, norms, softmax and the loss are not counted (they are not matmuls).
    """
    d, inner, b = spec["dim"], spec["heads"] * spec["dim_head"], spec["batch"]
    n, t = seq_len(spec), spec["text_seq_len"]
    layer = d * 3 * inner + inner * d + d * 8 * d + 4 * d * d
    matmul_macs = b * (n * spec["depth"] * layer
                       + t * d * (spec["num_text_tokens"] + t)
                       + (n - t) * d * spec["num_image_tokens"])
    attention = 6 * n**2 * inner * spec["depth"] * b
    return 6 * matmul_macs + attention


# ---- our side ---------------------------------------------------------------------------------

def build_ours(spec: dict, **overrides):
    """dalle_ds DALLE for ``spec`` (in train mode)."""
    from dalle_ds import DALLE, DiscreteVAE

    vae = DiscreteVAE(image_size=spec["image_size"], num_layers=spec["vae_layers"], num_tokens=spec["num_image_tokens"])
    kwargs = dict(dim=spec["dim"], vae=vae, num_text_tokens=spec["num_text_tokens"], text_seq_len=spec["text_seq_len"],
                  depth=spec["depth"], heads=spec["heads"], dim_head=spec["dim_head"],
                  attn_types=spec.get("attn_types"))
    return DALLE(**{**kwargs, **overrides}).train()


# ---- the peer ---------------------------------------------------------------------------------

def run_peer(task: str, spec: dict, **options) -> dict:
    """Runs ``peer_worker.py`` in the peer venv (a fresh process) and returns its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    python = PEER_PYTHON
    if os.environ.get("DALLE_DS_PEER_PATH"):  # the peer installed into a folder (bench_gpu.sh), our python
        python = Path(sys.executable)
        env["PYTHONPATH"] = os.pathsep.join([os.environ["DALLE_DS_PEER_PATH"], env.get("PYTHONPATH", "")])
    if not python.exists():
        sys.exit(f"The peer venv {PEER_PYTHON.parent.parent} is missing: run `bash benchmarks/setup_peer.sh` "
                 f"(creates it with dalle-pytorch 1.6.6) and rerun this benchmark.")
    request = json.dumps({"task": task, "spec": spec, **options})
    proc = subprocess.run([str(python), str(PEER_WORKER), request], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"peer worker failed on {task}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- printing ---------------------------------------------------------------------------------

def table(headers, rows) -> None:
    rows = [[(f"{c:.0f}" if abs(c) >= 100 else f"{c:.3g}") if isinstance(c, float) else str(c) for c in row]
            for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))))


def verdict(label: str, value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{label}: {value:.2f}x (target {sign} {target}x) {'MET' if ok else 'MISSED'}"
