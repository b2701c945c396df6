"""train-dalle for real: DeepSpeed on CPU (gloo), one process and two ranks under torchrun, ZeRO-2
and ZeRO-3 (bf16), exact resume after a clean stop and after SIGKILL, TensorBoard output."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_vae
from data_fixtures import write_corpus
from dalle_ds.cli import main
from dalle_ds.data.pretokenize import pretokenize
from dalle_ds.data.tokenizer import train_tokenizer
from dalle_ds.training import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TINY = ["train.micro_batch=4", "model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=8",
        "model.text_seq_len=8", "data.num_workers=1", "data.shuffle_buffer=8", "logging.every_steps=1",
        "optim.warmup_steps=2", "optim.lr=3e-3", "model.attn_dropout=0.1", "model.attn_types=[full,axial_row]"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    shards = write_corpus(root / "raw", num_shards=4, per_shard=12)
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    pretokenize([str(s) for s in shards], vae, root / "tokens", batch_size=8, progress=False)
    colours = ["red", "green", "blue", "yellow"]
    train_tokenizer([f"a {c} square" for c in colours] * 20, root / "tok.model", 300)
    return root


def command(inputs, out, *extra, ranks=1, ds_config="zero2.json"):
    """One process runs the module entry point; several go through launch/torchrun.sh."""
    args = ["--data", str(inputs / "tokens"), "--tokenizer", str(inputs / "tok.model"), "--vae", str(inputs / "vae"),
            "--out", str(out), f"train.deepspeed_config=ds_configs/{ds_config}", *TINY, *extra]
    if ranks == 1:
        return [sys.executable, "-m", "dalle_ds.training.train_dalle", *args]
    return ["bash", str(ROOT / "launch" / "torchrun.sh"), str(ranks), "train-dalle", *args]


ENV = {**os.environ, "DS_ACCELERATOR": "cpu"}


def run(cmd, with_stderr=False, timeout=300):
    """Runs a training command; past ``timeout`` its whole process group is killed (torchrun's
    workers too, which would otherwise run on beside the next tests) and the test fails with the
    output it had written."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd[:4])} ...\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    return (stdout, stderr) if with_stderr else stdout


def losses(run_dir) -> dict[int, float]:
    """Step -> loss, the last logged value for each step (a resumed run logs some steps again)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss/total"] for row in rows}


def test_single_process_trains_resumes_exactly_and_logs(inputs, tmp_path):
    schedule = ["optim.total_steps=8", "checkpoint.every_steps=4"]  # the same lr schedule for a stop at 4
    profile = ["logging.profile_at_step=6", "logging.profile_steps=2"]  # and the losses stay those of run b
    out = run(command(inputs, tmp_path / "a", "train.steps=8", *schedule, "logging.sample_every_steps=8", *profile))
    assert "train-dalle: 8 steps, 32 samples" in out
    # no terminal here: a plain progress line per logging interval, as a SLURM log shows it
    progress = [line for line in out.splitlines() if line.startswith("train-dalle step ")]
    assert [line.split()[2] for line in progress] == [f"{step}/8:" for step in range(1, 9)]
    assert all(re.search(r"loss \d+\.\d{4}, [\d,]+ tokens/s, ETA \d+:\d\d:\d\d$", line) for line in progress)
    run(command(inputs, tmp_path / "b", "train.steps=4", *schedule))
    run(command(inputs, tmp_path / "b", "train.steps=8", *schedule, "--resume"))
    straight, resumed = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(straight) == list(range(1, 9)) and straight[8] < straight[1]
    assert resumed == pytest.approx(straight, abs=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/text", "loss/image", "train/lr", "train/grad_norm", "perf/tokens_per_s",
            "perf/samples_per_s", "perf/tokens_per_s_per_device", "perf/samples_per_s_per_device",
            "perf/data_wait_share",
            "train/skipped_micro_batches", "perf/mfu"} <= tags
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, 9))
    assert [image.step for image in events.Images("samples")] == [8]  # generated for the data's first captions
    assert events.Scalars("loss/total")[-1].value == pytest.approx(straight[8], rel=1e-6)
    config = (tmp_path / "a" / "config.yaml").read_text()
    assert "micro_batch: 4" in config and "axial_row" in config

    # the profiled window: a trace of steps 6-7 whose matmuls and attention are named, and a summary
    assert re.search(r"train-dalle: steps 6-7 profiled: wall [\d.]+ ms per step .*; CPU ms per step: "
                     r"attention [\d.]+ \(\d+%\), matmul [\d.]+ \(\d+%\), other", out)
    trace = json.loads((tmp_path / "a" / "profile" / "rank0-steps6-7.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"aten::mm", "Optimizer.step#AdamW.step"} <= names, sorted(n for n in names if n)[:50]
    assert any(name and "GroupedAttention" in name for name in names)  # the sparse layer on CPU
    summary = (tmp_path / "a" / "profile" / "rank0-steps6-7.txt").read_text()
    assert summary.startswith("steps 6-7 profiled: wall") and "aten::mm" in summary
    assert not (tmp_path / "b" / "profile").exists()

    # a run folder serves generate as an export does: its latest checkpoint, with its tokenizer
    out = run([sys.executable, "-m", "dalle_ds.cli", "generate", "--dalle", str(tmp_path / "a"), "--out",
               str(tmp_path / "samples"), "--num-images", "2", "a red square"])
    assert "generate: 2 images for 1 prompts" in out
    assert len(list((tmp_path / "samples").glob("000-a-red-square/*.png"))) == 2


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3_bf16.json"])
def test_two_ranks_learn(inputs, tmp_path, ds_config):
    out, err = run(command(inputs, tmp_path / "run", "train.steps=10", "checkpoint.every_steps=10",
                           "logging.sample_every_steps=10", ranks=2, ds_config=ds_config), with_stderr=True)
    assert out.count("train-dalle:") == 1 and "80 samples" in out  # 10 steps x 4 x 2 ranks (sampling is collective)
    assert out.count("train-dalle step 10/10:") == 1  # progress from rank 0 only
    assert "all_gather_into_tensor" not in err  # DeepSpeed's deprecation noise, silenced on every rank
    trained = losses(tmp_path / "run")
    assert trained[10] < 0.7 * trained[1], trained


def test_two_ranks_killed_mid_training_resume_the_same_losses(inputs, tmp_path):
    extra = ["train.steps=12", "checkpoint.every_steps=3"]
    run(command(inputs, tmp_path / "straight", *extra, ranks=2))

    killed = tmp_path / "killed"
    job = subprocess.Popen(command(inputs, killed, *extra, ranks=2), start_new_session=True, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        if (killed / "metrics.jsonl").exists() and max(losses(killed), default=0) >= 8:
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # no warning, no last checkpoint: as a crashed node
    job.wait()
    assert max(losses(killed)) < 12, "the run must be killed before it ends"
    run(command(inputs, killed, *extra, "--resume", ranks=2))
    assert losses(killed) == pytest.approx(losses(tmp_path / "straight"), abs=1e-5)


ENGINE_LOGITS = """
import argparse, json, sys, torch
from dalle_ds.training.train_dalle import DalleTrainer, add_arguments
from dalle_ds.training.trainer import config_from_args
parser = argparse.ArgumentParser()
add_arguments(parser)
trainer = DalleTrainer(config_from_args(DalleTrainer, parser.parse_args(sys.argv[1:])))  # --resume: loads the checkpoint
trainer.engine.eval()
torch.manual_seed(0)
text, codes = torch.randint(1, trainer.model.num_text_tokens, (2, 8)), torch.randint(0, 32, (2, 15))
with torch.no_grad():
    logits = trainer.engine(text, codes)  # every rank takes part (ZeRO-3 gathers the weights)
if trainer.env.is_main:
    print(json.dumps(logits.flatten().tolist()))
"""


@pytest.mark.parametrize("ds_config", ["zero0.json", "zero1.json", "zero2_bf16.json", "zero3.json"])
def test_export_gives_the_engines_logits_without_deepspeed(inputs, tmp_path, ds_config):
    from dalle_ds import DALLE, DiscreteVAE
    from dalle_ds.cli import main

    out = tmp_path / "run"
    run(command(inputs, out, "train.steps=3", "checkpoint.every_steps=3", ranks=2, ds_config=ds_config))
    assert main(["export", str(out), "--out", str(tmp_path / "model")]) == 0
    model = DALLE.from_pretrained(tmp_path / "model").eval()

    (tmp_path / "engine_logits.py").write_text(ENGINE_LOGITS)
    cmd = command(inputs, out, "train.steps=3", "--resume", ranks=2, ds_config=ds_config)
    script = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(tmp_path / "engine_logits.py"),
              *cmd[cmd.index("--data"):]]
    engine_logits = torch.tensor(json.loads(run(script).strip().splitlines()[-1]))
    torch.manual_seed(0)
    text, codes = torch.randint(1, model.num_text_tokens, (2, 8)), torch.randint(0, 32, (2, 15))
    with torch.no_grad():
        exported = model(text, codes).flatten()
        real = exported > -1e30  # not the other vocabulary's masked entries (finfo.min differs per dtype)
        tolerance = 0.1 if "bf16" in ds_config else 1e-5  # the engine computes in bf16, the export in fp32
        assert torch.equal(real, engine_logits > -1e30)
        assert torch.allclose(exported[real], engine_logits[real], atol=tolerance)
    vae = DiscreteVAE.from_pretrained(inputs / "vae")  # the frozen dVAE comes back exact, never rounded
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), vae.state_dict().values()))
    assert main(["export", str(inputs), "--out", str(tmp_path / "x")]) == 2  # not a run folder


def test_reversible_layers_train_alike_under_zero_1_2_and_3(inputs, tmp_path):
    extra = ["train.steps=5", "checkpoint.every_steps=5", "model.reversible=true", "model.depth=3",
             "model.attn_types=[full,sparse,conv_like]"]
    runs = {}
    for stage in (1, 2, 3):
        run(command(inputs, tmp_path / f"z{stage}", *extra, ranks=2, ds_config=f"zero{stage}.json"))
        runs[stage] = losses(tmp_path / f"z{stage}")
    assert runs[1][5] < runs[1][1]
    assert runs[2] == pytest.approx(runs[1], abs=1e-5) and runs[3] == pytest.approx(runs[1], abs=1e-5)


def test_the_same_command_runs_under_the_deepspeed_launcher(inputs, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = command(inputs, tmp_path / "run", "train.steps=2")
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                "--module", "dalle_ds.cli", "train-dalle"]
    out = run(launcher + cmd[cmd.index("--data"):])
    assert "train-dalle: 2 steps, 16 samples" in out  # 2 ranks x micro batch 4 x 2 steps


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(inputs, tmp_path):
    # enough steps that the signal lands mid-run however fast the machine; no periodic save
    extra = ["train.steps=150", "optim.total_steps=150", "checkpoint.every_steps=1000", "logging.every_steps=1"]
    run(command(inputs, tmp_path / "straight", *extra))
    stopped = tmp_path / "stopped"
    job = subprocess.Popen(command(inputs, stopped, *extra), env=ENV, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        if (stopped / "metrics.jsonl").exists() and max(losses(stopped), default=0) >= 4:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # as SLURM on preemption
    assert job.wait(timeout=120) == 0
    saved = int((stopped / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 4 <= saved < 150 and f"train-dalle: {saved} steps" in job.stdout.read()
    run(command(inputs, stopped, *extra, "--resume"))
    assert losses(stopped) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


@pytest.mark.parametrize("command, broken, message", [
    ("train-dalle", "tokenizer", "tokenizer model .* does not exist"),
    ("train-dalle", "vae", "is neither a model folder"),
    ("train-dalle", "data", "no shards match"),
    ("train-clip", "tokenizer", "tokenizer model .* does not exist"),
    ("train-vae", "data", "no shards match"),
])
def test_trainers_reject_bad_inputs_before_any_heavy_start_up(tmp_path, monkeypatch, capsys, command, broken,
                                                              message):
    """A missing tokenizer, a folder that holds no dVAE or data that matches nothing is a one-line
    error before the process group (and DeepSpeed's comm op) starts."""
    def heavy_start_up(env):
        raise AssertionError("the process group started before the inputs were checked")
    monkeypatch.setattr(trainer_module, "init_distributed", heavy_start_up)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "00000.tar").write_bytes(b"")
    tokenizer = train_tokenizer([f"a {w} thing" for w in ("red", "green", "blue", "large")] * 20,
                                tmp_path / "tok.model", 30, byte_fallback=False)
    paths = {"data": str(tmp_path / "data"), "tokenizer": str(tokenizer), "vae": str(tmp_path)}
    if broken != "vae":
        tiny_vae().save_pretrained(tmp_path / "vae")
        paths["vae"] = str(tmp_path / "vae")
    paths[broken] = str(tmp_path / "missing")
    flags = {"train-dalle": ("data", "tokenizer", "vae"), "train-clip": ("data", "tokenizer"), "train-vae": ("data",)}
    argv = [command, *(item for key in flags[command] for item in (f"--{key}", paths[key])), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_a_trainer_without_its_paths_names_the_flags_and_keys(tmp_path, capsys):
    assert main(["train-dalle", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "paths.tokenizer (--tokenizer), paths.vae (--vae) not set" in capsys.readouterr().err


RESUMED_STATE = """
import argparse, json, sys, torch
from deepspeed.utils import safe_get_full_optimizer_state
from dalle_ds.training.train_dalle import DalleTrainer, add_arguments
from dalle_ds.training.trainer import config_from_args
parser = argparse.ArgumentParser()
add_arguments(parser)
trainer = DalleTrainer(config_from_args(DalleTrainer, parser.parse_args(sys.argv[1:])))  # --resume
# ZeRO-1/2 link each parameter to its optimizer-state fragments at the first step; read before it
getattr(trainer.engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
state = {name: [safe_get_full_optimizer_state(p, key).flatten().tolist() for key in ("exp_avg", "exp_avg_sq")]
         for name, p in trainer.engine.module.named_parameters() if p.requires_grad}  # collective under ZeRO-3
trainer.train()  # on to train.steps
if trainer.env.is_main:
    print(json.dumps({"step": trainer.progress.step, "optimizer": state}))
"""


def _resumed_state(inputs, tmp_path, out, ranks, ds_config, *extra):
    """Resumes the run in ``out`` on ``ranks`` (in a script that reads the engine's optimizer
    state first), trains on to train.steps; returns that state."""
    script = tmp_path / "resumed_state.py"
    script.write_text(RESUMED_STATE)
    cmd = command(inputs, out, *extra, "--resume", ranks=ranks, ds_config=ds_config)
    launch = [sys.executable, str(script)] if ranks == 1 else [str(TORCHRUN), "--standalone", "--nproc_per_node",
                                                                str(ranks), str(script)]
    return json.loads(run(launch + cmd[cmd.index("--data"):]).strip().splitlines()[-1])["optimizer"]


def _first_batches_loss(inputs, run_dir, ranks) -> float:
    """The loss the checkpoint's weights give on the first optimizer step a resumed run on
    ``ranks`` reads: every rank's micro-batches, from the saved data position."""
    from dalle_ds.config import load_config
    from dalle_ds.data.stream import TokenStream
    from dalle_ds.training.export import consolidate
    from dalle_ds.training.train_dalle import DalleRunConfig

    model = consolidate(run_dir).eval()
    config = load_config(DalleRunConfig, run_dir / "config.yaml")
    saved = torch.load(next((run_dir / "checkpoints").glob("step*/*mp_rank_00_model_states.pt")), weights_only=False)
    accumulation = 8 // (config.train.micro_batch * ranks)  # the global batch of 2 ranks x micro batch 4
    losses = []
    for rank in range(ranks):
        stream = TokenStream(inputs / "tokens", inputs / "tok.model", 8, trainer_module.stream_config(config),
                             rank=rank, world_size=ranks)
        stream.load_state_dicts([r["stream"] for r in saved["ranks"]])
        batches = iter(stream)
        for _ in range(accumulation):
            batch = next(batches)
            with torch.no_grad():
                losses.append(float(model(batch["text"], batch["codes"], mask=batch["mask"], return_loss=True)))
    return sum(losses) / len(losses)


def _saved_optimizer_state(run_dir, tag) -> dict:
    """Each parameter's whole Adam moments, as DeepSpeed's ds_to_universal assembled them from
    the old ranks' ZeRO partitions."""
    folder = run_dir / "checkpoints" / "universal" / tag / "zero"

    def moment(path):  # ZeRO-1/2 store {"param": tensor, ...}, ZeRO-3 the tensor
        value = torch.load(path, weights_only=True)
        return (value["param"] if isinstance(value, dict) else value).flatten().tolist()

    return {p.name: [moment(p / f"{key}.pt") for key in ("exp_avg", "exp_avg_sq")]
            for p in folder.iterdir() if (p / "exp_avg.pt").is_file()}


@pytest.mark.parametrize("ds_config, ranks, resumed_ranks", [("zero1.json", 2, 1), ("zero2.json", 2, 1),
                                                              ("zero3.json", 2, 1), ("zero2.json", 1, 2),
                                                              ("zero3.json", 1, 2)])
def test_a_run_resumes_on_another_number_of_ranks(inputs, tmp_path, ds_config, ranks, resumed_ranks):
    """Through DeepSpeed's universal checkpoint: the saved weights (the first resumed loss is
    what the checkpoint's model gives on that step's batches), the saved optimizer state, and
    the data position (whose rules tests/test_stream.py checks)."""
    out = tmp_path / "run"
    schedule = ["optim.total_steps=6", "checkpoint.every_steps=3", "model.attn_dropout=0", "train.global_batch=8"]
    run(command(inputs, out, "train.steps=3", *schedule, ranks=ranks, ds_config=ds_config))
    expected_loss = _first_batches_loss(inputs, out, resumed_ranks)
    resumed_state = _resumed_state(inputs, tmp_path, out, resumed_ranks, ds_config, "train.steps=5", *schedule)
    saved_state = _saved_optimizer_state(out, "step00000003")
    assert resumed_state.keys() == saved_state.keys()
    for name, (exp_avg, exp_avg_sq) in saved_state.items():
        assert resumed_state[name][0] == pytest.approx(exp_avg, abs=1e-7) and any(exp_avg), name
        assert resumed_state[name][1] == pytest.approx(exp_avg_sq, abs=1e-9), name
    trained = losses(out)
    assert trained[4] == pytest.approx(expected_loss, rel=1e-5) and 5 in trained


def test_fine_tuning_from_an_export_continues_at_its_loss(inputs, tmp_path):
    """--init-from: the new run's first loss is what the exported model gives on its first
    batches, far below a fresh model's; the optimizer, schedule and data start afresh."""
    from dalle_ds.config import load_config
    from dalle_ds.data.stream import TokenStream
    from dalle_ds.models.dalle import DALLE
    from dalle_ds.models.pretrained import model_from_config
    from dalle_ds.training.train_dalle import DalleRunConfig

    no_dropout = "model.attn_dropout=0"
    run(command(inputs, tmp_path / "base", "train.steps=8", no_dropout))
    assert main(["export", str(tmp_path / "base"), "--out", str(tmp_path / "model")]) == 0
    tuned = tmp_path / "tuned"
    run(command(inputs, tuned, "train.steps=2", no_dropout, "--init-from", str(tmp_path / "model")))

    config = load_config(DalleRunConfig, tuned / "config.yaml")
    assert config.checkpoint.init_from == str(tmp_path / "model")
    first = next(iter(TokenStream(inputs / "tokens", inputs / "tok.model", 8, trainer_module.stream_config(config))))
    exported = DALLE.from_pretrained(tmp_path / "model").eval()
    fresh = model_from_config(json.loads((tuned / "model_config.json").read_text())).eval()
    with torch.no_grad():
        expected, untrained = (float(m(first["text"], first["codes"], mask=first["mask"], return_loss=True))
                               for m in (exported, fresh))
    assert losses(tuned)[1] == pytest.approx(expected, rel=1e-5)
    assert losses(tuned)[1] < 0.8 * untrained
    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/samples"] == 4 and rows[0]["train/lr"] < rows[1]["train/lr"]  # warm-up from step 0 again


def test_compiled_blocks_train_as_eager_does(inputs, tmp_path, monkeypatch, capsys):
    """train.compile_blocks under DeepSpeed (ZeRO-2): the same losses as eager; with ZeRO-3 a
    one-line error before start-up."""
    extra = ["train.steps=2", "model.attn_dropout=0"]
    run(command(inputs, tmp_path / "eager", *extra))
    run(command(inputs, tmp_path / "compiled", *extra, "train.compile_blocks=true"))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)

    def heavy_start_up(env):
        raise AssertionError("the process group started before the config was checked")
    monkeypatch.setattr(trainer_module, "init_distributed", heavy_start_up)
    argv = command(inputs, tmp_path / "z3", *extra, "train.compile_blocks=true", ds_config="zero3.json")
    assert main(["train-dalle", *argv[argv.index("--data"):]]) == 2
    assert "train.compile_blocks does not go with ZeRO-3" in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    (["logging.profile_at_step=9"], r"profiles steps 9-9: the window must lie in the run's steps 1-2"),
    (["logging.profile_at_step=2", "logging.profile_steps=3"], r"profiles steps 2-4: the window must lie"),
    (["logging.profile_steps=0"], r"logging.profile_steps must be >= 1"),
])
def test_a_profile_window_outside_the_run_is_an_error_before_start_up(inputs, tmp_path, monkeypatch, capsys,
                                                                      settings, message):
    def heavy_start_up(env):
        raise AssertionError("the process group started before the config was checked")
    monkeypatch.setattr(trainer_module, "init_distributed", heavy_start_up)
    argv = command(inputs, tmp_path / "run", "train.steps=2", "logging.profile_at_step=1", "logging.profile_steps=1",
                   *settings)
    assert main(["train-dalle", *argv[argv.index("--data"):]]) == 2
    assert re.search(message, capsys.readouterr().err)
