"""The ``dalle-ds`` command line: one subcommand per job.

Each subcommand parses its flags, calls the library, prints a one-line summary and exits 0; a
user mistake or unusable input exits 2 with a one-line reason (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path


def _shards(spec) -> list[str]:
    """Expands --data; says which shards of a brace pattern are missing (img2dataset leaves out
    shards that failed) rather than failing on them."""
    from .data.shards import expand_shards

    found = expand_shards(spec)
    if found.missing:
        print(f"note: {len(found.missing)} shards of the pattern do not exist (e.g. {found.missing[0]}); "
              f"using the {len(found.paths)} that do", file=sys.stderr)
    return found.paths


def _add_prep_folder(sub):
    p = sub.add_parser("prep-folder", help="a folder of images + same-named .txt captions -> img2dataset-layout shards")
    p.add_argument("--src", required=True, help="folder with image files and a .txt caption beside each")
    p.add_argument("--out", required=True, help="output folder for the tar shards")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per output shard (default 10000)")
    p.set_defaults(run=_run_prep_folder)


def _run_prep_folder(args):
    from .data.prep_folder import prep_folder

    return prep_folder(args.src, args.out, args.samples_per_shard).line()


def _add_train_tokenizer(sub):
    p = sub.add_parser("train-tokenizer", help="train a sentencepiece tokenizer on the captions of shards")
    p.add_argument("--data", required=True, nargs="+",
                   help="shards: brace pattern (data/{00000..00099}.tar), glob, folder or tar paths")
    p.add_argument("--out", required=True, help="the .model file to write")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (pad id 0 included)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="sentencepiece algorithm (default bpe)")
    p.add_argument("--max-captions", type=int, default=1_000_000,
                   help="train on at most this many captions, the first ones in shard order (default 1000000)")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="map unseen characters to <unk> instead of their UTF-8 bytes")
    p.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args):
    from .data.tar_reader import iter_captions
    from .data.tokenizer import train_tokenizer

    shards = _shards(args.data)
    path = train_tokenizer(iter_captions(shards), args.out, args.vocab_size, model_type=args.model_type,
                           byte_fallback=not args.no_byte_fallback, max_captions=args.max_captions)
    return f"train-tokenizer: wrote {path} (vocab {args.vocab_size}, {args.model_type}) from {len(shards)} shards"


_IMPORT_FLAGS = {"taming": ("ckpt", "config"), "openai": ("encoder", "decoder", "image_size")}  # format -> its flags


def _add_import_vae(sub):
    from .config import constructor_defaults
    from .models.openai_dvae import OpenAIDiscreteVAE

    size = constructor_defaults(OpenAIDiscreteVAE)["image_size"]
    p = sub.add_parser("import-vae", help="a pretrained image tokenizer (taming-transformers' VQGAN, OpenAI's dVAE) "
                                          "-> a model folder to give as --vae")
    p.add_argument("--format", required=True, choices=sorted(_IMPORT_FLAGS), help="whose release format")
    p.add_argument("--out", required=True, help="model folder to write (model.safetensors + config.json)")
    p.add_argument("--ckpt", help="taming: the Lightning checkpoint (.ckpt)")
    p.add_argument("--config", help="taming: the model's YAML (model.target VQModel or GumbelVQ)")
    p.add_argument("--encoder", help="openai: encoder.pkl")
    p.add_argument("--decoder", help="openai: decoder.pkl")
    p.add_argument("--image-size", type=int, help=f"openai: side of the images to tokenize (default {size})")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling, which can run code from the file: taming checkpoints that hold more "
                        "than weights, and OpenAI's .pkl files (always pickles)")
    p.set_defaults(run=_run_import_vae)


def _run_import_vae(args):
    from .import_vae import import_openai, import_taming

    def flags(names):
        return ", ".join("--" + name.replace("_", "-") for name in names)

    needed = [name for name in _IMPORT_FLAGS[args.format] if name != "image_size" and getattr(args, name) is None]
    if needed:
        raise ValueError(f"--format {args.format} needs {flags(needed)}")
    stray = [name for fmt, names in _IMPORT_FLAGS.items() if fmt != args.format for name in names
             if getattr(args, name) is not None]
    if stray:
        raise ValueError(f"{flags(stray)} do not go with --format {args.format}")
    if args.format == "taming":
        model = import_taming(args.ckpt, args.config, args.out, trust_pickle=args.trust_pickle)
    else:
        model = import_openai(args.encoder, args.decoder, args.out, trust_pickle=args.trust_pickle,
                              image_size=args.image_size)
    return (f"import-vae: wrote {args.out} ({type(model).__name__}: {model.num_tokens} codes, "
            f"{model.image_size}px images -> {model.grid_size}x{model.grid_size} grid); give it as --vae")


def _add_pretokenize(sub):
    p = sub.add_parser("pretokenize", help="encode image-text shards into token shards with a frozen dVAE")
    p.add_argument("--data", required=True, nargs="+", help="input shards: brace pattern, glob, folder or tar paths")
    p.add_argument("--vae", required=True,
                   help="the dVAE: an export (or save_pretrained or import-vae) folder, or a train-vae run folder")
    p.add_argument("--out", required=True, help="output folder: token shards, stats and manifest.json")
    p.add_argument("--job-index", type=int, default=None,
                   help="this job's index among --num-jobs (default: SLURM_ARRAY_TASK_ID, else RANK, else 0)")
    p.add_argument("--num-jobs", type=int, default=None,
                   help="number of jobs sharing the input (default: SLURM_ARRAY_TASK_COUNT, else WORLD_SIZE, else 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per dVAE batch (default 64)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_pretokenize)


def _run_pretokenize(args):
    import torch

    from .data.pretokenize import pretokenize
    from .data.shards import default_job_partition
    from .models.image_tokenizer import ImageTokenizer
    from .training.export import load_trained

    index, count = default_job_partition()
    job_index = index if args.job_index is None else args.job_index
    num_jobs = count if args.num_jobs is None else args.num_jobs
    shards = _shards(args.data)  # before loading the VAE: a bad pattern fails fast
    vae = load_trained(args.vae, ImageTokenizer)[0]
    summary = pretokenize(shards, vae, args.out, job_index=job_index, num_jobs=num_jobs,
                          batch_size=args.batch_size, device=torch.device(args.device) if args.device else None,
                          progress=not args.no_progress)
    return summary.line()


def _add_decode_check(sub):
    p = sub.add_parser("decode-check", help="decode token-shard samples through the dVAE into a captioned PNG grid")
    p.add_argument("--data", required=True, help="a token-shard folder (with manifest.json)")
    p.add_argument("--vae", required=True,
                   help="the dVAE the shards were made with (export, import-vae or train-vae run folder)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--num-samples", type=int, default=16, help="how many samples to decode (default 16)")
    p.set_defaults(run=_run_decode_check)


def _run_decode_check(args):
    from .data.decode_check import decode_check
    from .data.manifest import Manifest
    from .models.image_tokenizer import ImageTokenizer
    from .training.export import load_trained

    Manifest.load(args.data)  # before loading the VAE: a wrong folder fails fast
    n = decode_check(args.data, load_trained(args.vae, ImageTokenizer)[0], args.out, args.num_samples)
    return f"decode-check: wrote {n} decoded samples to {args.out}"


_TRAINERS = {  # command -> (module, trainer class, help)
    "train-vae": ("train_vae", "VaeTrainer", "train the discrete VAE under DeepSpeed on raw image-text shards"),
    "train-dalle": ("train_dalle", "DalleTrainer", "train DALL-E under DeepSpeed on token shards"),
    "train-clip": ("train_clip", "ClipTrainer", "train CLIP under DeepSpeed on raw image-text shards"),
}


def _add_trainers(sub):
    for command, (module, _, help_text) in _TRAINERS.items():
        p = sub.add_parser(command, help=help_text)
        importlib.import_module(f".training.{module}", __package__).add_arguments(p)
        p.set_defaults(run=_run_trainer)


def _run_trainer(args):
    from .training.trainer import run

    module, name, _ = _TRAINERS[args.command]
    return run(getattr(importlib.import_module(f".training.{module}", __package__), name), args)


def _add_export(sub):
    p = sub.add_parser("export", help="a training run's latest checkpoint -> one from_pretrained model folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a dalle-ds train-* run")
    p.add_argument("--out", required=True, help="model folder to write (model.safetensors + config.json)")
    p.set_defaults(run=_run_export)


def _run_export(args):
    from .training.export import export_run

    return f"export: wrote {export_run(args.run_dir, args.out)} (load it with from_pretrained)"


def _add_generate(sub):
    from .generate import CPU_BATCH_SIZE, DTYPES, GenerateSettings

    d = GenerateSettings()
    p = sub.add_parser("generate", help="captions -> PNG images (and a grid per caption) with DALL-E, ranked by CLIP")
    p.add_argument("captions", nargs="*", metavar="CAPTION", help="prompts (or --prompts-file)")
    p.add_argument("--dalle", required=True, help="DALL-E: an export's folder, or a train-dalle run folder")
    p.add_argument("--clip", default=None, help="CLIP to rank the images by: an export's or a train-clip run folder")
    p.add_argument("--out", required=True, help="folder for the PNGs, their JSON sidecars and the grids")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--num-images", type=int, default=d.num_images, help=f"images per prompt (default {d.num_images})")
    p.add_argument("--keep", type=int, default=None, help="with --clip: keep the best N per prompt (default all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"images per pass (default: the most that fit in free memory on CUDA, else {CPU_BATCH_SIZE})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"batch k of each prompt is seeded S + k (default {d.seed})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature; 0: greedy")
    p.add_argument("--filter-thres", type=float, default=d.filter_thres,
                   help=f"top-k as a fraction: keep the top (1 - F) of the image vocabulary (default {d.filter_thres})")
    p.add_argument("--top-k", type=int, default=None, help="top-k as a count (overrides --filter-thres)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--cond-scale", type=float, default=d.cond_scale,
                   help="classifier-free guidance scale (default 1: none; try 3)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype,
                   help=f"DALL-E's weights and KV cache (default {d.dtype}; bf16 halves their memory; "
                        f"the dVAE and CLIP stay fp32)")
    p.add_argument("--init-image", default=None, help="an image prompt: every sample keeps the top rows of its codes")
    p.add_argument("--init-rows", type=int, default=None, help="with --init-image: how many code rows to keep")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: replay each token's decoding step as one recorded CUDA graph (less host overhead)")
    p.set_defaults(run=_run_generate)


def _run_generate(args):
    from tqdm import tqdm

    from .data.pretokenize import default_device
    from .generate import GenerateSettings, generate, plan
    from .models.clip import CLIP
    from .models.dalle import DALLE
    from .training.export import load_with_tokenizer

    prompts = list(args.captions)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    dalle, tokenizer = load_with_tokenizer(args.dalle, DALLE, "--dalle")
    dalle.to(args.device or default_device())
    clip = load_with_tokenizer(args.clip, CLIP, "--clip") if args.clip else None
    filter_thres = args.filter_thres if args.top_k is None else 1 - (args.top_k + 0.5) / dalle.num_image_tokens
    settings = GenerateSettings(args.num_images, args.batch_size, args.seed, args.temperature, filter_thres,
                                args.top_p, args.cond_scale, args.keep, args.dtype, args.init_image, args.init_rows,
                                args.cuda_graph)
    settings, memory = plan(dalle, settings)
    print(f"generate: {memory.line()}", file=sys.stderr)
    with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not sys.stderr.isatty()) as bar:
        results = generate(dalle, tokenizer, prompts, args.out, settings, clip, progress=bar)
    images = sum(len(r.images) for r in results)
    return f"generate: {images} images for {len(results)} prompts in {args.out} (grids: {args.out}/*.png)"


def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a dVAE, a DALL-E and/or generated images; writes JSON")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--vae", default=None, help="dVAE (export or train-vae run) to score on --images")
    p.add_argument("--images", default=None, help="held-out raw image-text shards for --vae")
    p.add_argument("--dalle", default=None, help="DALL-E (export or train-dalle run) to score on --tokens")
    p.add_argument("--tokens", default=None, help="held-out token-shard folder (pretokenized with its dVAE)")
    p.add_argument("--generations", default=None, help="the --out of dalle-ds generate: CLIP score, demo accuracy")
    p.add_argument("--clip", default=None, help="CLIP (export or train-clip run) for the CLIP score")
    p.add_argument("--max-samples", type=int, default=1_000, help="held-out samples to score (default 1000)")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    from . import evaluate
    from .demo.shapes import analyse, parse_caption

    pairs = {"--vae": (args.vae, args.images, "--images"), "--dalle": (args.dalle, args.tokens, "--tokens")}
    for flag, (model, data, data_flag) in pairs.items():
        if bool(model) != bool(data):
            raise ValueError(f"{flag} and {data_flag} go together")
    if not (args.vae or args.dalle or args.generations):
        raise ValueError("nothing to evaluate: give --vae with --images, --dalle with --tokens, or --generations")
    # the demo's analyser reads colour and shape for captions that name them; others are skipped
    results = evaluate.evaluate(args.out, vae=args.vae, images=args.images, dalle=args.dalle, tokens=args.tokens,
                                generations=args.generations, clip=args.clip, max_samples=args.max_samples,
                                attributes=(parse_caption, analyse))
    return f"{evaluate.table(results)}\neval: wrote {args.out}"


def _add_demo(sub):
    p = sub.add_parser("demo", help="the quickstart: demo data -> tokenizer -> dVAE -> DALL-E (a rank per GPU, "
                                    "else 2) -> CLIP -> images for held-out captions -> eval")
    p.add_argument("--out", required=True, help="folder for everything the demo makes")
    p.add_argument("--ranks", type=int, default=None,
                   help="DALL-E training processes (default: one per GPU, up to the largest count that divides the "
                        "global batch of 32, else 2); any count trains that same global batch")
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    p.set_defaults(run=_run_demo)


def _run_demo(args):
    from .demo.quickstart import run_demo

    return run_demo(args.out, ranks=args.ranks, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-ds", description="Train DALL-E at scale.")
    # the deepspeed launcher passes --local_rank=N; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also DALLE_DS_DEBUG=1); anywhere on the line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prep_folder, _add_train_tokenizer, _add_import_vae, _add_pretokenize, _add_decode_check,
                _add_trainers, _add_export, _add_generate, _add_eval, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    debug = args.debug or "--debug" in extra or os.environ.get("DALLE_DS_DEBUG", "") not in ("", "0")
    extra = [item for item in extra if item != "--debug"]  # after the command, argparse leaves it over
    # key=value overrides may stand anywhere, also between flags, where argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        summary = args.run(args)
        if summary:
            print(summary)
    except (ValueError, OSError) as error:  # user mistakes and unusable files: one line, no traceback
        if debug:
            raise
        print(f"dalle-ds {args.command}: error: {error} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
