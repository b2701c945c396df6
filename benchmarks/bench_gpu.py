"""Issue 11's GPU figures on one CUDA device, ours against the peer (dalle-pytorch 1.6.6), in one run:

- attention alone, fwd+bwd, bf16, q/k/v (2, 16, 4352, 64) [256 text + 64x64 image] and
  (8, 16, 1280, 64) [256 text + 32x32]: each type's time against full attention's, its largest
  error against the dense reference, and the FlexAttention layout and tile fraction of each
  sparse type (the first call compiles); and each sparse type through ``split.py`` (flash for the
  text keys, FlexAttention for the image alone), to decide ``kernels.SPLIT_DEVICES``;
- the train step (fwd + bwd + fused AdamW, bf16 autocast) at the 441M spec: tokens/s, MFU against
  ``PEAK_FLOPS``, peak memory, the host's share of the step; the same with compiled blocks, with
  split attention, and with every layer full; the peer on the cycled and the full one;
- cached generation of 8 images at the 441M spec, eagerly and replaying a CUDA graph per token:
  image tokens/s, per-token latency, the peer;
- ``train-dalle`` itself (DeepSpeed ZeRO-2 bf16, synthetic token shards): its ``metrics.jsonl``,
  as shipped, with DeepSpeed's own gradient checks, and with ``overlap_comm`` off;
- a profile of the cycled train step, eager and with compiled blocks, of the all-full one, and
  of train-dalle's (``logging.profile_at_step``): kernel time by kind and the costliest kernels,
  to say where a step's time goes; for the all-full step, also the memory bandwidth its
  non-matmul kernels reached (the bytes counted, over their time);
- only when named, ``layouts``: every FlexAttention layout of each sparse type timed, and the
  gather cost they imply (to check ``flex.GATHER_COST``).

Run: python benchmarks/bench_gpu.py [--out FILE.json] [--sections attention,train_step,...]
(on a machine without internet: ``benchmarks/bench_gpu.sh``, which installs the carried wheels).
The peer runs where ``DALLE_DS_PEER_PATH`` (a folder it was installed into) or
``benchmarks/.peer-venv`` has it; without either its rows are skipped.
On a machine without CUDA it says so and exits 0; ``--smoke`` runs every section there at toy
sizes instead (a check of this script, not a measurement). A failing row or section is printed
and recorded, and the others still run; rows are printed as they are measured. On an H200
(2026-11-30) the sections took: train_step 144 s, profile 8 s, train_dalle 38 s (one run; it
now makes three), attention 138 s (then with autotuned compiles), generation over 225 s (with
the peer): ``--sections`` splits the run to fit a device's time limit, and ``--no-peer`` drops
the peer's rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

import common

PEAK_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s of an H100 / H200 SXM
SPEC = dict(dim=1024, depth=24, heads=16, dim_head=64, num_text_tokens=10000, text_seq_len=256, image_size=256,
            vae_layers=3, num_image_tokens=8192, batch=8, attn_types=["full", "axial_row", "axial_col", "conv_like"])
ATTENTION = [dict(batch=2, heads=16, text=256, grid=64, dim_head=64),
             dict(batch=8, heads=16, text=256, grid=32, dim_head=64)]
TIMING = dict(warmup=3, repeats=10)  # the warm-up includes FlexAttention's compiles
SMOKE_SPEC = dict(SPEC, dim=64, depth=4, heads=2, dim_head=16, num_text_tokens=100, text_seq_len=8, image_size=32,
                  num_image_tokens=64, batch=2)
SMOKE_ATTENTION = [dict(batch=2, heads=2, text=8, grid=8, dim_head=16)]
SMOKE_TIMING = dict(warmup=1, repeats=2)
SECTIONS = ("attention", "train_step", "generation", "train_dalle", "profile")
EXTRA_SECTIONS = ("layouts",)  # run only when named: minutes of compiles


def attention(device, shapes, timing) -> list[dict]:
    """Each type's fwd+bwd time, and its largest error against the dense reference (bf16 against
    fp32); then each sparse type through ``split.py`` (flash for the text keys, FlexAttention for
    the image alone), to decide ``kernels.SPLIT_DEVICES``. --smoke on CPU times the split rows'
    forward only, with eager FlexAttention (CPU has neither its backward nor its compiled
    log-sum-exp)."""
    from dalle_ds.attention import flex, split
    from dalle_ds.attention.kernels import attend
    from dalle_ds.attention.patterns import ATTN_TYPES, build_pattern

    rows, smoke = [], device == "cpu"
    for shape in shapes:
        layout, (q, k, v, grad) = _layout(shape), _inputs(shape, device)
        n = layout.total_len - 1
        label = f"({shape['batch']}, {shape['heads']}, {n}, {shape['dim_head']})"
        full = None
        for name in ATTN_TYPES:
            pattern, row = build_pattern(name, layout), dict(shape=label, type=name)
            if pattern.sparse:  # the plan attend uses on CUDA (built here on CPU, for --smoke)
                plan = flex.plan_for(pattern, n, shape["dim_head"], q.device)
                row.update(tile_fraction=plan.tile_fraction, layout=str(plan))
            rows.append(_attention_row(row, pattern, partial(attend, pattern), (q, k, v, grad), timing, full))
            if name == "full" and "ms" in row:
                full, row["vs_full"] = row["ms"], 1.0
        for name in ATTN_TYPES[1:]:
            pattern = build_pattern(name, layout)
            alone = pattern.image_alone()
            row = dict(shape=label, type=f"{name}, split",
                       layout=f"image part: {flex.plan_for(alone, n - layout.text_len, shape['dim_head'], q.device)}")
            kernel = split.flex_image(alone, flex.eager_flex if smoke else None)
            run = partial(split.split_attention, pattern, image_kernel=kernel)
            rows.append(_attention_row(row, pattern, run, (q, k, v, grad), timing, full, forward_only=smoke))
    common.table(["q/k/v", "type", "ms fwd+bwd", "vs full", "max error", "tile fraction", "layout"],
                 [[r["shape"], r["type"], r.get("ms", "failed"), r.get("vs_full") or "", r.get("max_err", ""),
                   r.get("tile_fraction", ""), r.get("layout", "")] for r in rows])
    print(f"FlexAttention: {dict(flex.COUNTS)}; targets: sparse <= 0.45x of full at n = 4352, <= 1.0x at 1280")
    print("'split' rows: split.py, flash for the text keys and FlexAttention for the image alone "
          "(kernels.SPLIT_DEVICES; the plain rows are one FlexAttention call)")
    return rows


def _attention_row(row: dict, pattern, run, inputs, timing, full_ms, forward_only: bool = False) -> dict:
    """``row`` with ``run(q, k, v)``'s largest error against the dense reference, its fwd+bwd time
    and that time against ``full_ms``, printed as it comes (a run cut short keeps what it
    measured); an error is recorded in the row, and the other rows still count."""
    from dalle_ds.attention.kernels import dense_reference_attention

    q, k, v, _ = inputs
    args = [x.detach() for x in (q, k, v)] if forward_only else (q, k, v)  # in grad mode: one compile
    try:
        row["max_err"] = _max_error(run(*args), dense_reference_attention(pattern, *(x.detach().float() for x in args)))
        row["ms"] = common.timeit(_fwd_bwd(run, inputs, forward_only), **timing)["median"] * 1e3
        row["vs_full"] = row["ms"] / full_ms if full_ms else None
        print(f"  {row}")
    except Exception:
        row["error"] = traceback.format_exc(limit=2)
        print(row["error"])
    return row


def _fwd_bwd(run, inputs, forward_only: bool):
    """A step of ``run(q, k, v)`` and its backward of ``grad`` (``inputs``: q, k, v, grad), the
    gradients dropped after it; the forward alone on detached inputs with ``forward_only``."""
    q, k, v, grad = inputs

    def step():
        if forward_only:
            return run(q.detach(), k.detach(), v.detach())
        run(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None
    return step


def layouts(device, shapes, timing) -> list[dict]:
    """Every FlexAttention layout ``flex`` considers for each sparse type, timed fwd+bwd: the
    figures behind ``flex.GATHER_COST``. Per shape, a least-squares fit of ms = a * full tiles +
    b * partial tiles (each as a fraction of full causal attention's area) + c * gathered gives
    what a gather costs in the estimate's unit (c / a), to compare with GATHER_COST, and whether a
    partial tile (masked score by score) costs more than a full one (b against a)."""
    from dalle_ds.attention import flex
    from dalle_ds.attention.patterns import ATTN_TYPES, build_pattern

    torch._dynamo.reset()  # a compile per candidate: counted against flex.RECOMPILE_LIMIT from zero
    rows = []
    for shape in shapes:
        layout, (q, k, v, grad) = _layout(shape), _inputs(shape, device)
        n, d = layout.total_len - 1, shape["dim_head"]
        fit = []
        for name in ATTN_TYPES[1:]:
            pattern = build_pattern(name, layout)
            for plan in flex.candidate_plans(pattern, n, d, device):
                step = _fwd_bwd(plan.attend, (q, k, v, grad), forward_only=device == "cpu")  # --smoke: no CPU backward
                row = dict(shape=str(tuple(q.shape)), type=name, layout=str(plan), tile_fraction=plan.tile_fraction,
                           partial_fraction=plan.partial_fraction, estimated_cost=plan.estimated_cost,
                           ms=common.timeit(step, **timing)["median"] * 1e3)
                rows.append(row)
                fit.append((plan.tile_fraction - plan.partial_fraction, plan.partial_fraction,
                            float(plan.slots is not None), row["ms"]))
                print(f"  {row}")
        features, ms = torch.tensor([f[:3] for f in fit]), torch.tensor([[f[3]] for f in fit])
        a, b, c = torch.linalg.lstsq(features, ms).solution.flatten().tolist()
        implied = c / a * flex.causal_area(n, device) / (n * d) if a > 0 else float("nan")  # nan: no full tiles
        print(f"fit at {tuple(q.shape)}: ms per unit of causal area {a:.3f} in full tiles, {b:.3f} in partial "
              f"ones; gathers {c:.3f} ms: GATHER_COST {implied:.2f} (now {flex.GATHER_COST})")
    return rows


def _layout(shape: dict):
    from dalle_ds.attention.patterns import SequenceLayout

    return SequenceLayout(shape["text"] + 1, shape["grid"], shape["grid"])


def _inputs(shape: dict, device):
    """q, k, v (bf16, requiring grad) and an output gradient for an attention shape."""
    g = torch.Generator(device=device).manual_seed(0)
    size = (shape["batch"], shape["heads"], _layout(shape).total_len - 1, shape["dim_head"])
    q, k, v = (torch.randn(size, device=device, generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    return q, k, v, torch.randn_like(q)


def _max_error(out, reference) -> float:
    return float((out.detach().float() - reference).abs().max())


def train_step(device, spec, timing, peer: bool) -> list[dict]:
    tokens = spec["batch"] * common.seq_len(spec)
    rows = []
    for label, attn_types in (("cycled", spec["attn_types"]), ("all full", ["full"])):
        run_spec = dict(spec, attn_types=attn_types)
        rows.append(_guarded(f"ours, {label}", lambda: _our_train_step(device, run_spec, timing, tokens)))
        if label == "cycled":  # train.compile_blocks and kernels.SPLIT_DEVICES, to decide their defaults
            rows.append(_guarded("ours, cycled, compiled blocks",
                                 lambda: _our_train_step(device, run_spec, timing, tokens, compiled=True)))
            rows.append(_guarded("ours, cycled, split attention",
                                 lambda: _our_train_step(device, run_spec, timing, tokens, split=True)))
        if peer:
            rows.append(_guarded(f"peer, {label}", lambda: _peer_train_step(device, run_spec, timing, tokens)))
    common.table(["run", "ms/step", "host ms", "tokens/s", "MFU", "peak GiB"],
                 [[r["run"], r.get("ms", "failed"), r.get("host_ms", ""), r.get("tokens_per_s", ""),
                   f"{100 * r['mfu']:.1f}%" if "mfu" in r else "", r.get("peak_gib", "")] for r in rows])
    print("host ms: the time until the step's call returned, before waiting for the device. Well below ms/step, "
          "the device is the bottleneck; near it proves nothing (a full launch queue blocks the host too): the "
          "profile section's wall against kernel time says more")
    for label in ("cycled", "all full"):
        ours, theirs = (next((r for r in rows if r["run"] == f"{side}, {label}" and "ms" in r), None)
                        for side in ("ours", "peer"))
        if ours and theirs:
            print(common.verdict(f"{label}: ours vs peer tokens/s", ours["tokens_per_s"] / theirs["tokens_per_s"], 5.0))
        if ours:
            print(f"{label}: MFU {100 * ours['mfu']:.1f}% (target >= 45%; model FLOPs count every layer as full "
                  f"causal attention, see common.model_flops)")
    return rows


def _our_train_step(device, spec, timing, tokens, compiled: bool = False, split: bool = False) -> dict:
    from dalle_ds.training.compile import compile_blocks
    from dalle_ds.training.optim import OptimConfig, build_optimizer

    model = common.build_ours(spec).to(device)
    if compiled:
        compile_blocks(model.transformer)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    text, codes = common.make_batch(spec, device=device)
    _reset_memory(device)
    with _split_attention(device, spec) if split else contextlib.nullcontext():
        times = common.timeit(common.train_step_fn(model, text, codes, opt, torch.bfloat16), **timing)
    sec = times["median"]
    return dict(ms=sec * 1e3, host_ms=times["host_median"] * 1e3, tokens_per_s=tokens / sec,
                mfu=common.model_flops(spec) / sec / PEAK_FLOPS, peak_gib=_peak_gib(device))


@contextlib.contextmanager
def _split_attention(device, spec):
    """kernels.SPLIT_DEVICES set to ``device`` while inside; an error where the flash kernel cannot
    run (the row would time one FlexAttention call under the split's name)."""
    from dalle_ds.attention import kernels, split

    if device == "cuda" and not split.usable(torch.empty(1, 1, 1, spec["dim_head"], device=device, dtype=torch.bfloat16)):
        raise RuntimeError("flash attention cannot run here (build, GPU or head dim): no split attention to time")
    chosen, kernels.SPLIT_DEVICES = kernels.SPLIT_DEVICES, (device,)
    try:
        yield
    finally:
        kernels.SPLIT_DEVICES = chosen


def _peer_train_step(device, spec, timing, tokens) -> dict:
    result = common.run_peer("train_step", spec, device=device, autocast="bfloat16", **timing)
    return dict(ms=result["median"] * 1e3, tokens_per_s=tokens / result["median"],
                peak_gib=result.get("peak_memory", 0) / 2**30)


def _guarded(run: str, measure) -> dict:
    """One row: ``measure()``'s figures, or the error (the peer's failures exit: caught too)."""
    try:
        row = dict(run=run, **measure())
        print(f"  {row}")  # as it comes: a run cut short keeps what it measured
        return row
    except (Exception, SystemExit):
        print(traceback.format_exc(limit=3))
        return dict(run=run, error=traceback.format_exc(limit=3))
    finally:
        _reset_memory("cuda" if torch.cuda.is_available() else "cpu")


def generation(device, spec, timing, peer: bool) -> list[dict]:
    """Cached generation of ``batch`` images: ours (DALL-E cast to bf16, as ``generate --dtype
    bf16``) eagerly and (CUDA) replaying a CUDA graph per token, then the peer (bf16 autocast),
    each row printed as it comes (the peer's calls take minutes at 441M). The peer runs its
    fastest cached setting: its KV cache engaged (see peer_worker.py) and
    ``optimize_for_inference``, which makes its axial layers cached masked attention; its
    conv_like layers have no cache in 1.6.6 and rerun the whole prefix at every token."""
    steps = common.grid(spec) ** 2
    tokens = spec["batch"] * steps
    from dalle_ds.generate import cast_for_inference

    model = common.build_ours(spec).to(device).eval()
    cast_for_inference(model, "bf16", torch.device(device))  # as generate --dtype bf16: no autocast casts
    text, _ = common.make_batch(spec, device=device)
    rows = []

    def row(run: str, sec: float) -> None:
        rows.append(dict(run=run, s=sec, tokens_per_s=tokens / sec, ms_per_token=sec / steps * 1e3))
        print(f"  {rows[-1]}")

    for run, graphed in (("ours", False), ("ours, CUDA graph", True)):
        if graphed and device != "cuda":
            continue

        def generate():
            model.generate_codes(text, filter_thres=0.9, use_cache=True, seed=0, cuda_graph=graphed)
        row(run, common.timeit(generate, **dict(timing, warmup=1, repeats=2))["median"])
    del model
    _reset_memory(device)
    if peer:
        result = common.run_peer("generate", spec, device=device, autocast="bfloat16", filter_thres=0.9,
                                 engage_cache=True, optimize_for_inference=True, **dict(timing, warmup=0, repeats=1))
        row("peer, KV cache engaged, optimize_for_inference", result["median"])
    common.table(["run", "s/call", "image tokens/s", "ms/token step"],
                 [[r["run"], r["s"], r["tokens_per_s"], r["ms_per_token"]] for r in rows])
    if peer:
        for ours in rows[:-1]:
            ratio = ours["tokens_per_s"] / rows[-1]["tokens_per_s"]
            print(common.verdict(f"generation: {ours['run']} vs peer", ratio, 5.0))
    return rows


# train-dalle runs: label -> (changes to ds_configs/zero2_bf16.json's zero_optimization, config
# overrides). DeepSpeed's own per-tensor gradient checks measure what grad_checks.py saves; with
# overlap_comm, DeepSpeed synchronizes the device at every gradient bucket it reduces.
TRAIN_DALLE_RUNS = {"as shipped": ({}, []),
                    "DeepSpeed's own gradient checks": ({}, ["train.fused_grad_checks=false"]),
                    "overlap_comm off": ({"overlap_comm": False}, [])}


def train_dalle(device, spec, smoke: bool) -> dict:
    """Real train-dalle runs (one process, DeepSpeed ZeRO-2 bf16) on synthetic token shards, one
    per ``TRAIN_DALLE_RUNS`` entry; the first is profiled."""
    from bench_train_dalle import overrides, prepare

    # the profiled window lies in an interval before the last, whose throughput is reported
    steps, every, (first, window) = (4, 2, (1, 1)) if smoke else (30, 10, (12, 3))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, image_size=spec["image_size"], num_layers=spec["vae_layers"], num_tokens=spec["num_image_tokens"])
        shipped = json.loads((common.HERE.parent / "ds_configs" / "zero2_bf16.json").read_text())
        for n, (label, (zero, extra)) in enumerate(TRAIN_DALLE_RUNS.items()):
            ds_config, out = root / f"ds_config{n}.json", root / f"run{n}"
            ds_config.write_text(json.dumps({**shipped, "zero_optimization": {**shipped["zero_optimization"], **zero}}))
            profiled = [f"logging.profile_at_step={first}", f"logging.profile_steps={window}"] if n == 0 else []
            args = ["--data", str(root / "tokens"), "--tokenizer", str(root / "tok.model"), "--vae", str(root / "vae"),
                    "--out", str(out), f"train.deepspeed_config={ds_config}", *overrides(spec, steps, every),
                    f"logging.peak_flops={PEAK_FLOPS}", "data.num_workers=2", *profiled, *extra]
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "dalle_ds.training.train_dalle", *args], env=env,
                                  capture_output=True, text=True, cwd=common.HERE.parent)
            if proc.returncode:
                raise RuntimeError(f"train-dalle ({label}) failed:\n{proc.stderr[-4000:]}")
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            last["wall_s"] = time.perf_counter() - start
            print(f"train-dalle, {label}, {steps} steps, last interval: {last['perf/tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {100 * last['perf/mfu']:.1f}% (of {PEAK_FLOPS / 1e12:.0f} TFLOP/s; target >= 45%), "
                  f"FlexAttention compiles {last.get('attention/flex_compiles')}, unfused calls "
                  f"{last.get('attention/unfused_calls')}; whole run {last['wall_s']:.0f} s")
            if profiled:
                print(f"its profile: {next((out / 'profile').glob('*.txt')).read_text()}")
            results[label] = last
    return results


def profile(device, spec, timing) -> dict:
    """Two train steps under the trainers' own profiler (``training/profiling.py``): cycled eager,
    cycled with compiled blocks (slower on the H200, cause unknown) and all full eager: wall time,
    kernel time by kind and the costliest kernels. For the all-full step, also the bytes its
    operations move (``TrafficCounter``; FlexAttention cannot run under it), so that the other
    kernels' time gives the memory bandwidth they reached (``bench_traffic.py`` counts the same
    bytes on a CPU)."""
    from dalle_ds.training.compile import compile_blocks
    from dalle_ds.training.optim import OptimConfig, build_optimizer
    from dalle_ds.training.profiling import StepProfiler, TrafficCounter, sum_by_kind

    summaries = {}
    full_spec = {**spec, "attn_types": ["full"]}
    for label, run_spec, compiled in (("eager", spec, False), ("compiled blocks", spec, True),
                                      ("all full, eager", full_spec, False)):
        model = common.build_ours(run_spec).to(device)
        if compiled:
            compile_blocks(model.transformer)
        opt = build_optimizer(model, OptimConfig(lr=1e-4))
        text, codes = common.make_batch(run_spec, device=device)
        step = common.train_step_fn(model, text, codes, opt, torch.bfloat16)
        common.timeit(step, warmup=timing["warmup"], repeats=1)  # the compiles happen here
        with tempfile.TemporaryDirectory() as tmp:
            profiler = StepProfiler(1, 2, Path(tmp), 0, torch.device(device))
            for number in (1, 2):
                profiler.starting(number)
                step()
                profiler.finished(number)
            summaries[label] = next(Path(tmp).glob("*.txt")).read_text()
        print(f"{label}: {summaries[label]}")
        if run_spec is full_spec:
            with TrafficCounter() as traffic:
                step()
            gib = {kind: b / 2**30 for kind, b in sum_by_kind(traffic.bytes.items()).items()}
            ms = profiler.by_kind["other"]
            summaries["traffic GiB per step"] = gib
            print("bytes moved per step (counted): " + ", ".join(f"{kind} {g:.2f} GiB" for kind, g in gib.items())
                  + f"; the other kernels moved theirs in {ms:.1f} ms: {gib['other'] * 2**30 / ms / 1e9:.2f} TB/s")
        del model, opt, step
        _reset_memory(device)
    return summaries


def _reset_memory(device) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0


def _peer_available() -> bool:
    return bool(os.environ.get("DALLE_DS_PEER_PATH")) or common.PEER_PYTHON.exists()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write every figure to this JSON file")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS + EXTRA_SECTIONS)}")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, on CPU where there is no CUDA")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip the peer's rows (its generation alone takes minutes at 441M)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA device here; these figures need one (--smoke checks the script on CPU)")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec, shapes, timing = (SMOKE_SPEC, SMOKE_ATTENTION, SMOKE_TIMING) if args.smoke else (SPEC, ATTENTION, TIMING)
    start = common.header(f"bench_gpu on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke)'}")
    peer = _peer_available() and not args.no_peer
    print(f"spec {spec}\n{common.PEER_NOTE}" + ("" if peer else "\npeer not installed: its rows are skipped"))
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    runs = {"attention": lambda: attention(device, shapes, timing),
            "train_step": lambda: train_step(device, spec, timing, peer),
            "generation": lambda: generation(device, spec, timing, peer),
            "train_dalle": lambda: train_dalle(device, spec, args.smoke),
            "profile": lambda: profile(device, spec, timing),
            "layouts": lambda: layouts(device, shapes, timing)}
    for section in args.sections.split(","):
        print(f"\n-- {section}")
        began = time.perf_counter()
        try:
            results[section] = runs[section]()
        except (Exception, SystemExit):  # report, go on: one failing section must not cost the others' figures
            traceback.print_exc()
            results[section] = {"error": traceback.format_exc(limit=3)}
        print(f"({section}: {time.perf_counter() - began:.0f} s)")
        _reset_memory(device)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    common.footer(start)


if __name__ == "__main__":
    main()
