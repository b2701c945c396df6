"""The quickstart's pipeline end to end, on a plan small enough for the test suite: every step
runs for real (DeepSpeed trainers, DALL-E under torchrun with 2 ranks, generate, eval), and a
second run finds every step done."""

import json
import os
import sys
from pathlib import Path

from dalle_ds.demo.quickstart import DemoPlan, heldout_prompts, run_demo

TINY = DemoPlan(train_samples=64, heldout_samples=16, samples_per_shard=16, vocab_size=300, vae_steps=3,
                dalle_steps=3, clip_steps=3, images_per_prompt=2)


def test_the_quickstart_pipeline_runs_end_to_end_and_resumes(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    summary = run_demo(tmp_path, ranks=2, plan=TINY)
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["vae"]["samples"] == 16 and results["dalle"]["samples"] == 16
    generations = results["generations"]
    assert generations["prompts"] == len(heldout_prompts()) and generations["images"] == 2 * len(heldout_prompts())
    assert {"attribute_accuracy/best/colour", "attribute_accuracy/best/shape", "clip_score"} <= set(generations)
    assert (tmp_path / "samples.png").is_file()
    for part in ("vae", "dalle", "clip"):
        assert (tmp_path / "models" / part / "config.json").is_file()
        assert list((tmp_path / "runs" / part / "tensorboard").glob("events.out.tfevents.*"))
    assert "train-dalle: 3 steps, 96 samples" in capfd.readouterr().out  # 2 ranks x micro batch 16
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in summary and str(tmp_path / "samples.png") in summary

    run_demo(tmp_path, ranks=2, plan=TINY)
    log = capfd.readouterr().out
    assert log.count("already done") == 9 and "train-" not in log
