"""train-vae and train-clip for real: DeepSpeed on CPU (gloo), raw image-text shards streamed and
decoded, one process and two ranks under torchrun at ZeRO-2 and ZeRO-3 bf16, exact resume,
TensorBoard output, export round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_fixtures import write_corpus
from dalle_ds.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.micro_batch=4", "data.num_workers=1", "data.shuffle_buffer=8", "logging.every_steps=1",
          "optim.warmup_steps=2", "optim.lr=5e-3"]
TINY = {
    "train-vae": ["model.image_size=16", "model.num_layers=2", "model.num_tokens=32", "model.codebook_dim=16",
                  "model.hidden_dim=16", "model.num_resnet_blocks=0"],
    "train-clip": ["model.dim_text=16", "model.dim_image=16", "model.dim_latent=8", "model.text_enc_depth=1",
                   "model.text_seq_len=8", "model.text_heads=2", "model.text_dim_head=8", "model.visual_enc_depth=1",
                   "model.visual_heads=2", "model.visual_dim_head=8", "model.visual_image_size=16",
                   "model.visual_patch_size=4", "logging.retrieval_samples=16"],
}
STEPS = {"train-vae": 80, "train-clip": 40}  # enough to learn four colours
MODULES = {"train-vae": "dalle_ds.training.train_vae", "train-clip": "dalle_ds.training.train_clip"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_train")
    write_corpus(root / "raw", num_shards=4, per_shard=12)
    train_tokenizer([f"a {c} square" for c in ("red", "green", "blue", "yellow")] * 20, root / "tok.model", 300)
    return root


def command(job, inputs, out, *extra, ranks=1, ds_config="zero2.json"):
    args = ["--data", str(inputs / "raw"), "--out", str(out), f"train.deepspeed_config=ds_configs/{ds_config}",
            *COMMON, *TINY[job], *extra]
    if job == "train-clip":
        args = ["--tokenizer", str(inputs / "tok.model"), *args]
    if ranks == 1:
        return [sys.executable, "-m", MODULES[job], *args]
    return ["bash", str(ROOT / "launch" / "torchrun.sh"), str(ranks), job, *args]


def run(cmd):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def rows(run_dir, key="loss/total") -> dict[int, float]:
    """Step -> the last value logged for ``key`` at that step."""
    found = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            found[row["step"]] = row[key]
    return found


def mean(values) -> float:
    return sum(values) / len(values)


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    accumulator.Reload()
    return accumulator


def test_vae_trains_logs_codebook_use_and_resumes_exactly(inputs, tmp_path):
    schedule = ["optim.total_steps=80", "checkpoint.every_steps=30", "logging.image_every_steps=80"]
    out = run(command("train-vae", inputs, tmp_path / "a", "train.steps=80", *schedule))
    assert "train-vae: 80 steps, 320 samples" in out
    run(command("train-vae", inputs, tmp_path / "b", "train.steps=30", *schedule))
    run(command("train-vae", inputs, tmp_path / "b", "train.steps=80", *schedule, "--resume"))
    straight = rows(tmp_path / "a")
    assert rows(tmp_path / "b") == pytest.approx(straight, abs=1e-6)
    losses = list(straight.values())
    assert mean(losses[-10:]) < 0.8 * mean(losses[:10]), losses

    logged = events(tmp_path / "a")
    assert {"loss/total", "vae/codebook_perplexity", "vae/dead_codes", "vae/temperature", "perf/mfu",
            "train/grad_norm", "perf/tokens_per_s"} <= set(logged.Tags()["scalars"])
    perplexity = [e.value for e in logged.Scalars("vae/codebook_perplexity")]
    dead = [e.value for e in logged.Scalars("vae/dead_codes")]
    assert all(1 <= p <= 32 for p in perplexity) and all(0 <= d < 32 for d in dead)
    assert [image.step for image in logged.Images("reconstructions")] == [80]
    temperatures = [e.value for e in logged.Scalars("vae/temperature")]
    assert temperatures == sorted(temperatures, reverse=True) and temperatures[0] <= 1.0


@pytest.mark.parametrize("job,ds_config", [("train-vae", "zero2.json"), ("train-vae", "zero3_bf16.json"),
                                           ("train-clip", "zero2.json"), ("train-clip", "zero3_bf16.json")])
def test_two_ranks_learn(inputs, tmp_path, job, ds_config):
    # pictures and retrieval at the end: under ZeRO-3 they gather weights collectively
    steps = STEPS[job]
    extra = [f"train.steps={steps}", f"checkpoint.every_steps={steps}", f"logging.image_every_steps={steps}"
             if job == "train-vae" else f"logging.retrieval_every_steps={steps}"]
    out = run(command(job, inputs, tmp_path / "run", *extra, ranks=2, ds_config=ds_config))
    assert out.count(f"{job}:") == 1 and f"{steps * 8} samples" in out  # micro batch 4 x 2 ranks
    losses = list(rows(tmp_path / "run").values())
    assert mean(losses[-10:]) < 0.8 * mean(losses[:10]), losses
    if job == "train-clip":
        assert rows(tmp_path / "run", "clip/text_to_image_top1")[steps] >= 0.75  # 4 colours, 16 samples
        logged = events(tmp_path / "run")
        for tag in ("clip/text_to_image_top1", "clip/image_to_text_top1"):
            assert [(e.step, 0 <= e.value <= 1) for e in logged.Scalars(tag)] == [(steps, True)]


ENGINE_OUTPUT = """
import argparse, json, sys, torch
from dalle_ds.cli import build_parser
from dalle_ds.training.train_{job} import {cls}
from dalle_ds.training.trainer import config_from_args
trainer = {cls}(config_from_args({cls}, build_parser().parse_args(sys.argv[1:])))  # --resume: the engine loads the checkpoint
trainer.engine.eval()
torch.manual_seed(0)
images = torch.rand(2, 3, 16, 16)
with torch.no_grad():
    out = {call}
print(json.dumps(out.float().flatten().tolist()))
"""


@pytest.mark.parametrize("job,ds_config", [("train-vae", "zero3.json"), ("train-clip", "zero2.json")])
def test_export_gives_the_engines_outputs_without_deepspeed(inputs, tmp_path, job, ds_config):
    from dalle_ds import CLIP, DiscreteVAE

    run(command(job, inputs, tmp_path / "run", "train.steps=3", ds_config=ds_config))
    run([sys.executable, "-m", "dalle_ds.cli", "export", str(tmp_path / "run"), "--out", str(tmp_path / "model")])
    if job == "train-vae":
        script = ENGINE_OUTPUT.format(job="vae", cls="VaeTrainer", call="trainer.engine(images, return_logits=True)")
        model = DiscreteVAE.from_pretrained(tmp_path / "model").eval()
        exported = model(_images(), return_logits=True)
    else:
        script = ENGINE_OUTPUT.format(job="clip", cls="ClipTrainer", call="trainer.engine(torch.tensor("
                                      "[[5, 6, 7, 0, 0, 0, 0, 0], [8, 9, 0, 0, 0, 0, 0, 0]]), images)")
        model = CLIP.from_pretrained(tmp_path / "model").eval()
        exported = model(torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [8, 9, 0, 0, 0, 0, 0, 0]]), _images())
    argv = command(job, inputs, tmp_path / "run", "train.steps=3", "--resume", ds_config=ds_config)
    engine = json.loads(run([sys.executable, "-c", script, job, *argv[3:]]).splitlines()[-1])
    assert torch.tensor(engine) == pytest.approx(exported.detach().flatten(), abs=1e-5)


def _images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 16, 16)


POISONED = """
import json, sys, torch
from dalle_ds.cli import build_parser
from dalle_ds.training.train_vae import VaeTrainer
from dalle_ds.training.trainer import config_from_args
trainer = VaeTrainer(config_from_args(VaeTrainer, build_parser().parse_args(sys.argv[1:])))
calls = []
def poison(grad):  # the loss stays finite; one backward's gradient does not
    calls.append(1)
    return grad * float("nan") if len(calls) == 3 else grad
next(trainer.model.parameters()).register_hook(poison)
trainer.train()
finite = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
print(json.dumps({"skipped": trainer.engine.skipped_steps, "finite": finite}))
"""


def test_a_non_finite_gradient_with_a_finite_loss_skips_the_step(inputs, tmp_path):
    argv = command("train-vae", inputs, tmp_path / "run", "train.steps=6")
    result = json.loads(run([sys.executable, "-c", POISONED, "train-vae", *argv[3:]]).splitlines()[-1])
    assert result == {"skipped": 1, "finite": True}
    assert rows(tmp_path / "run", "train/skipped_optimizer_steps")[6] == 1


def test_non_finite_gradients_step_after_step_stop_the_run(inputs, tmp_path):
    always = POISONED.replace("if len(calls) == 3 else grad", "")
    argv = command("train-vae", inputs, tmp_path / "run", "train.steps=6", "train.max_bad_steps=2")
    done = subprocess.run([sys.executable, "-c", always, "train-vae", *argv[3:]], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert done.returncode != 0
    assert "2 optimizer steps with non-finite gradients (skipped by DeepSpeed) in a row at step 1" in done.stderr


def test_a_trainer_runs_from_a_config_file_alone(inputs, tmp_path):
    """The run config holds everything, the input paths included: a YAML file alone is a run, and
    the run folder's resolved config is one too (the command line only fills a config)."""
    from dalle_ds.config import apply_overrides

    settings = apply_overrides({}, [*COMMON, *TINY["train-clip"], "train.steps=2", "train.deepspeed_config="
                                    f"{ROOT / 'ds_configs' / 'zero0.json'}",
                                    f"paths.data={inputs / 'raw'}", f"paths.tokenizer={inputs / 'tok.model'}",
                                    f"paths.out={tmp_path / 'run'}"])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    assert "train-clip: 2 steps" in run([sys.executable, "-m", MODULES["train-clip"], "--config", str(tmp_path / "run.yaml")])
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["paths"] == {"data": str(inputs / "raw"), "tokenizer": str(inputs / "tok.model"),
                                 "out": str(tmp_path / "run")}
    resolved["train"]["steps"], resolved["checkpoint"]["resume"] = 3, True
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(resolved))
    assert "train-clip: 3 steps" in run([sys.executable, "-m", MODULES["train-clip"], "--config", str(tmp_path / "more.yaml")])
    assert sorted(rows(tmp_path / "run")) == [1, 2, 3]  # resumed at step 2, from the file's resume flag
