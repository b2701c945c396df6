"""The quickstart's pipeline end to end, on a plan small enough for the test suite: every step
runs for real (DeepSpeed trainers, DALL-E under torchrun with 2 ranks, generate, eval), and a
second run finds every step done."""

import json

import pytest

from dalle_ds.config import apply_overrides, batch_layout
from dalle_ds.demo.quickstart import DemoPlan, heldout_prompts, run_demo

TINY = DemoPlan(train_samples=64, heldout_samples=16, samples_per_shard=16, vocab_size=300, vae_steps=3,
                dalle_steps=3, clip_steps=3, images_per_prompt=2)


def test_the_quickstart_pipeline_runs_end_to_end_and_resumes(tmp_path, capfd):
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


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_the_demo_trains_dalle_on_one_global_batch_at_any_rank_count(ranks):
    """One rank accumulates what two compute at once: the recipe, and so the results, do not
    follow the rank count."""
    train = apply_overrides({}, DemoPlan().dalle(ranks))["train"]
    layout = batch_layout(train["micro_batch"], ranks, train["global_batch"])
    assert layout.micro_batch * layout.grad_accumulation * ranks == 32
    assert layout.grad_accumulation == (2 if ranks == 1 else 1)


def test_a_rank_count_that_cannot_share_the_global_batch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="global batch of 32: give a --ranks that divides it, got 3"):
        run_demo(tmp_path, ranks=3, plan=TINY)
    assert not list(tmp_path.iterdir())  # before any step
