"""dalle-ds demo: the whole pipeline on the embedded shapes dataset, on a laptop-sized CPU budget.

Each step is the job a user would run on their own data: the data jobs, exports, generation
and eval through the library functions the command line calls, the trainers through the command
line in their own processes (DeepSpeed's, DALL-E's under torchrun), with settings sized to train
in minutes on 2 CPU cores. A step whose output is already complete is skipped, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.pretokenize import default_device, pretokenize
from ..data.shards import expand_shards
from ..data.tar_reader import iter_captions
from ..data.tokenizer import train_tokenizer
from ..evaluate import evaluate, table
from ..files import atomic_write
from ..generate import GenerateSettings, generate
from ..grids import caption_grid
from ..models.clip import CLIP
from ..models.dalle import DALLE
from ..models.vae import DiscreteVAE
from ..training.export import export_run, load_trained, load_with_tokenizer
from .dataset import write_demo_dataset
from .shapes import BACKGROUNDS, HELD_OUT, POSITIONS, SIZES, Scene, analyse, parse_caption


@dataclass(frozen=True)
class DemoPlan:
    """How much of everything: the defaults fit 2 CPU cores in the quickstart's budget."""

    train_samples: int = 4_000
    heldout_samples: int = 200
    samples_per_shard: int = 500  # 8 training shards: 2 ranks x 1 data worker read 4 each
    vocab_size: int = 400
    vae_steps: int = 400
    dalle_steps: int = 1_200
    clip_steps: int = 2_000
    images_per_prompt: int = 8
    dalle_global_batch: int = 32  # the same recipe at any rank count: fewer ranks accumulate
    dalle_micro_batch: int = 16  # at most, per rank

    def vae(self) -> list[str]:
        return ["model.image_size=48", "model.num_layers=2", "model.num_tokens=64", "model.codebook_dim=64",
                "model.hidden_dim=32", "model.num_resnet_blocks=1", "train.micro_batch=32", "optim.lr=3e-3",
                "anneal.rate=2e-3", "anneal.temperature_min=0.1", "train.deepspeed_config=ds_configs/zero0.json",
                *self._schedule(self.vae_steps, "logging.image_every_steps")]

    def dalle(self, ranks: int) -> list[str]:
        if self.dalle_global_batch % ranks:
            raise ValueError(f"the demo trains DALL-E on a global batch of {self.dalle_global_batch}: give a --ranks "
                             f"that divides it, got {ranks}")
        micro_batch = min(self.dalle_micro_batch, self.dalle_global_batch // ranks)
        return ["model.dim=128", "model.depth=4", "model.heads=4", "model.dim_head=32", "model.text_seq_len=16",
                "model.null_cond_prob=0.1", f"train.micro_batch={micro_batch}",
                f"train.global_batch={self.dalle_global_batch}", "optim.lr=3e-3", "logging.sample_cond_scale=1.0",
                "train.deepspeed_config=ds_configs/zero2.json",
                *self._schedule(self.dalle_steps, "logging.sample_every_steps")]

    def default_ranks(self) -> int:
        """One per GPU (as many as divide the global batch), else 2 CPU processes."""
        if not torch.cuda.is_available():
            return 2
        return max(r for r in range(1, torch.cuda.device_count() + 1) if self.dalle_global_batch % r == 0)

    def clip(self) -> list[str]:
        return ["model.dim_text=64", "model.dim_image=64", "model.dim_latent=64", "model.text_enc_depth=2",
                "model.text_seq_len=16", "model.text_heads=4", "model.text_dim_head=16", "model.visual_enc_depth=2",
                "model.visual_heads=4", "model.visual_dim_head=16", "model.visual_image_size=48",
                "model.visual_patch_size=8", "train.micro_batch=32", "optim.lr=2e-3",
                "train.deepspeed_config=ds_configs/zero0.json",
                *self._schedule(self.clip_steps, "logging.retrieval_every_steps")]

    def generate(self, seed: int) -> GenerateSettings:
        # no guidance: on held-out pairs it pushes towards the training pairs (measured: shape accuracy 81% -> 46%)
        return GenerateSettings(num_images=self.images_per_prompt, seed=seed, cond_scale=1.0, filter_thres=0.9)

    @staticmethod
    def _schedule(steps: int, pictures_key: str) -> list[str]:
        """Pictures at the end only (they cost minutes on a CPU), a checkpoint halfway and at the end."""
        return [f"train.steps={steps}", f"{pictures_key}={steps}", f"checkpoint.every_steps={max(1, steps // 2)}",
                f"optim.warmup_steps={max(1, steps // 20)}", f"logging.every_steps={max(1, steps // 50)}",
                "data.num_workers=1", "data.shuffle_buffer=1000"]


def heldout_prompts() -> list[str]:
    """Every held-out (colour, shape) pair at each size, position and background (80 captions)."""
    return [Scene(colour, shape, size, position, background).caption(0) for colour, shape in HELD_OUT
            for size in SIZES for position in POSITIONS for background in BACKGROUNDS]


class _Steps:
    """Runs each step once: a step whose output exists is reported done and skipped."""

    def __init__(self):
        self.start = time.perf_counter()

    def run(self, name: str, done: Path, action) -> None:
        if done.exists():
            print(f"[demo] {name}: already done ({done})", flush=True)
            return
        print(f"[demo] {name} ...", flush=True)
        began = time.perf_counter()
        action()
        print(f"[demo] {name}: {time.perf_counter() - began:.0f} s", flush=True)


def _train(*args: str, ranks: int = 1) -> None:
    """A trainer in its own process(es), as the user runs it: DeepSpeed owns the process group."""
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    launcher = ([sys.executable, "-m", "dalle_ds.cli"] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                 "-m", "dalle_ds.cli"])
    if subprocess.run([*launcher, *args], env=env).returncode != 0:
        raise RuntimeError(f"demo step failed: dalle-ds {' '.join(args)}")


def _write_dataset(data: Path, plan: DemoPlan, seed: int) -> None:
    """Beside its place first, then renamed: a half-written dataset is never taken for done."""
    partial = data.with_name(data.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_demo_dataset(partial, plan.train_samples, plan.heldout_samples, seed, plan.samples_per_shard)
    partial.rename(data)


def _pretokenize(data: Path, vae: Path, out: Path) -> None:
    pretokenize(expand_shards(str(data)).paths, load_trained(vae, DiscreteVAE)[0], out, progress=False)


def _generate(models: Path, prompts: list[str], samples: Path, settings: GenerateSettings) -> None:
    dalle, tokenizer = load_with_tokenizer(models / "dalle", DALLE, "DALL-E")
    generate(dalle.to(default_device()), tokenizer, prompts, samples, settings,
             load_with_tokenizer(models / "clip", CLIP, "CLIP"))


def _overview(samples: Path, out_png: Path) -> None:
    """The best image of each prompt, captioned, in one grid."""
    images, captions = [], []
    for grid_folder in sorted(p for p in samples.iterdir() if p.is_dir()):
        best = grid_folder / "000.png"
        images.append(torch.from_numpy(np.asarray(Image.open(best).convert("RGB")).copy()).permute(2, 0, 1))
        captions.append(grid_folder.name.split("-", 1)[1].replace("-", " "))
    grid = caption_grid(torch.stack(images).float() / 255, captions, columns=8)
    atomic_write(out_png, lambda path: grid.save(path, format="PNG"))


def run_demo(out, ranks: int | None = None, seed: int = 0, plan: DemoPlan = DemoPlan()) -> str:
    """``ranks``: DALL-E's training processes (default ``plan.default_ranks()``)."""
    ranks = plan.default_ranks() if ranks is None else ranks
    if torch.cuda.is_available():
        ranks = min(ranks, torch.cuda.device_count())  # a rank per GPU
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # for the trainers this process starts, too
    plan.dalle(ranks)  # a rank count the recipe cannot take fails before any step
    out = Path(out)
    data, runs, models = out / "data", out / "runs", out / "models"
    steps = _Steps()
    seeds = [f"train.seed={seed}", "--resume"]  # an interrupted run continues from its last checkpoint
    steps.run("dataset", data, lambda: _write_dataset(data, plan, seed))
    tokenizer = out / "tokenizer.model"
    steps.run("tokenizer", tokenizer, lambda: train_tokenizer(
        iter_captions(expand_shards(str(data / "train")).paths), tokenizer, plan.vocab_size))
    steps.run("dVAE", models / "vae" / "config.json", lambda: (
        _train("train-vae", "--data", str(data / "train"), "--out", str(runs / "vae"), *plan.vae(), *seeds),
        export_run(runs / "vae", models / "vae")))
    for split in ("train", "heldout"):
        steps.run(f"pretokenize {split}", out / "tokens" / split / "manifest.json",
                  lambda split=split: _pretokenize(data / split, models / "vae", out / "tokens" / split))
    steps.run(f"DALL-E ({ranks} ranks)", models / "dalle" / "config.json", lambda: (
        _train("train-dalle", "--data", str(out / "tokens" / "train"), "--tokenizer", str(tokenizer), "--vae",
               str(models / "vae"), "--out", str(runs / "dalle"), *plan.dalle(ranks), *seeds, ranks=ranks),
        export_run(runs / "dalle", models / "dalle")))
    steps.run("CLIP", models / "clip" / "config.json", lambda: (
        _train("train-clip", "--data", str(data / "train"), "--tokenizer", str(tokenizer), "--out",
               str(runs / "clip"), *plan.clip(), *seeds),
        export_run(runs / "clip", models / "clip")))
    samples, prompts = out / "samples", heldout_prompts()
    (out / "heldout_prompts.txt").write_text("\n".join(prompts) + "\n")
    overview = out / "samples.png"  # written last: generation finished
    steps.run("generate (held-out captions)", overview, lambda: (
        _generate(models, prompts, samples, plan.generate(seed)), _overview(samples, overview)))
    results = out / "eval.json"
    steps.run("eval", results, lambda: print(table(evaluate(
        results, vae=models / "vae", images=str(data / "heldout"), dalle=models / "dalle",
        tokens=str(out / "tokens" / "heldout"), generations=samples, clip=models / "clip",
        attributes=(parse_caption, analyse))), flush=True))
    minutes = (time.perf_counter() - steps.start) / 60
    return (f"demo: done in {minutes:.1f} min.\n"
            f"  images for held-out captions: {overview} (best of each, by CLIP) and {samples}/*.png\n"
            f"  evaluation: {results}\n"
            f"  models (from_pretrained / dalle-ds generate): {models}/{{vae,dalle,clip}}\n"
            f"  training logs: tensorboard --logdir {runs}\n"
            f"  try: dalle-ds generate --dalle {models / 'dalle'} --clip {models / 'clip'} --out {out / 'mine'} "
            f"\"a large purple cross on the left on a black background\"")
