"""training/grad_checks.py: the fused ZeRO-1/2 gradient checks decide as DeepSpeed's own do, train
the same, and compute with a fixed number of operations whatever the number of tensors. A worker
builds real DeepSpeed engines (gloo, CPU) in one process, and in two ranks under torchrun (each
with its own partition, the norm summed over both), and reports what it saw."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("zero1", "zero2", "zero2_bf16")

WORKER = """
import json, sys, torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from dalle_ds.config import BatchLayout
from dalle_ds.distributed import dist_env
from dalle_ds.training import grad_checks
from dalle_ds.training.engine import build_engine, init_distributed, load_ds_config
from dalle_ds.training.optim import OptimConfig
from dalle_ds.training.profiling import ComputeCounter

ENV = dist_env()
init_distributed(ENV)
FUSED = ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct")


def engine_for(ds_config, layers=3, fused=True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)])
    optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, grad_clip=0.1)  # the clip acts on every step
    settings = load_ds_config(f"ds_configs/{ds_config}.json")
    engine, _ = build_engine(model, settings, BatchLayout(4, 1, ENV.world_size), optim, fused_grad_checks=fused)
    assert all((name in vars(engine.optimizer)) == fused for name in FUSED)  # swapped in on the object, or not
    return engine


def backward(engine, seed):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
    engine.backward(engine(x.to(next(engine.module.parameters()).dtype)).float().pow(2).mean())


def checks(opt):
    groups = range(len(opt.bit16_groups))
    norms = lambda fn: [float(fn(opt, opt.averaged_gradients[i], opt.params_in_partition[i])) for i in groups]
    return {"overflow": [bool(grad_checks._any_non_finite(opt)),
                         bool(DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial(opt))],
            "norms": [norms(grad_checks._grad_norm), norms(DeepSpeedZeroOptimizer.get_grad_norm_direct)]}


def decisions(ds_config):
    engine = engine_for(ds_config)
    backward(engine, 0)
    opt, seen = engine.optimizer, {"clean": checks(engine.optimizer)}
    for i, place in ((0, 0), (len(opt.bit16_groups) - 1, -1)):  # the first gradient and the last
        grad = [g for g in opt.averaged_gradients[i] if not getattr(g, "_zero_padding", False)][place]
        for value in ("nan", "inf", "-inf", "largest finite"):
            kept = grad.view(-1)[1].item()
            grad.view(-1)[1] = torch.finfo(grad.dtype).max if value == "largest finite" else float(value)
            seen[f"{value} in group {i}"] = checks(opt)
            grad.view(-1)[1] = kept
    return seen


def trained(ds_config, fused):
    engine = engine_for(ds_config, fused=fused)
    first = engine.module[0].weight
    first.register_hook(lambda g: g * float("nan") if engine.global_steps == 1 else g)  # the second step's
    for step in range(3):
        backward(engine, step)
        engine.step()
    weights = [p.detach().float().flatten().tolist() for p in engine.module.parameters()]
    return {"weights": weights, "skipped": engine.skipped_steps}


def step_operations(ds_config, layers, fused):
    engine = engine_for(ds_config, layers, fused)
    backward(engine, 0)
    with ComputeCounter() as ops:
        engine.step()
    return ops.count


out, configs = sys.argv[1], sys.argv[2:]  # a file per rank: two ranks' lines on one pipe could interleave
report = {c: {"decisions": decisions(c), "fused": trained(c, True), "own": trained(c, False),
              "operations": {f"{layers} layers, {'fused' if fused else 'own'}": step_operations(c, layers, fused)
                             for layers in (3, 12) for fused in (True, False)}}
          for c in configs}
with open(f"{out}/rank{ENV.rank}.json", "w") as f:
    json.dump(report, f)
"""


@pytest.fixture(scope="module", params=[1, 2], ids=["1 rank", "2 ranks"])
def reports(request, tmp_path_factory):
    """Each rank's report, for the one process and for two ranks."""
    out = tmp_path_factory.mktemp("grad_checks")
    (out / "worker.py").write_text(WORKER)
    launcher = [sys.executable] if request.param == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={request.param}"]
    done = subprocess.run([*launcher, str(out / "worker.py"), str(out), *CONFIGS], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(request.param)]


@pytest.mark.parametrize("ds_config", CONFIGS)
def test_fused_checks_decide_as_deepspeeds_own(reports, ds_config):
    for report in reports:
        assert len(report[ds_config]["decisions"]) == 9
        for case, found in report[ds_config]["decisions"].items():
            fused, own = found["overflow"]
            non_finite = case != "clean" and not case.startswith("largest finite")
            assert fused == own == non_finite, case
            fused, own = found["norms"]
            assert fused == pytest.approx(own, rel=1e-6), case
            # DeepSpeed reports a norm it cannot hold in fp32 as -1; the group without the value keeps its own
            assert (-1.0 in own) == (case != "clean"), case


@pytest.mark.parametrize("ds_config", CONFIGS)
def test_training_with_fused_checks_matches_deepspeeds_own(reports, ds_config):
    for fused, own in ((report[ds_config]["fused"], report[ds_config]["own"]) for report in reports):
        assert fused["skipped"] == own["skipped"] == 1  # the poisoned step, skipped by both
        assert len(fused["weights"]) == len(own["weights"]) == 6
        for a, b in zip(fused["weights"], own["weights"]):
            assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("ds_config", CONFIGS)
def test_a_fused_step_computes_with_as_many_operations_for_any_number_of_tensors(reports, ds_config):
    for ops in (report[ds_config]["operations"] for report in reports):
        assert ops["12 layers, fused"] == ops["3 layers, fused"]
        assert ops["12 layers, own"] > ops["3 layers, own"]  # DeepSpeed's own: operations per tensor
        assert ops["12 layers, fused"] < ops["12 layers, own"]
