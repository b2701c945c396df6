"""Peer side of the benchmarks: dalle-pytorch 1.6.6, run by benchmarks/.peer-venv's python.

Usage: peer_worker.py '{"task": ..., "spec": {...}, ...}'  -> prints one JSON line.
Tasks: train_step (fwd+bwd+AdamW), fwd_bwd, attention_only, generate. The specs, inputs and
timing code are those of our side (common.py), so both sides do the same work.
"""

import json
import sys
import types
import warnings

# dalle_pytorch/__init__ imports vae.py, which imports omegaconf and taming for its VQGanVAE
# only; these are the only modules of 1.6.6's import chain the peer venv lacks. Empty stand-ins:
_STUBS = {"omegaconf": {"OmegaConf": None}, "taming": {}, "taming.models": {},
          "taming.models.vqgan": {"VQModel": None, "GumbelVQ": None}}
for _name, _attrs in _STUBS.items():
    sys.modules[_name] = types.ModuleType(_name)
    vars(sys.modules[_name]).update(_attrs)
warnings.filterwarnings("ignore")  # pkg_resources deprecation in dalle_pytorch/__init__

import torch  # noqa: E402
from dalle_pytorch import DALLE, DiscreteVAE  # noqa: E402
from dalle_pytorch.attention import Attention  # noqa: E402

import common  # noqa: E402  (benchmarks/ is sys.path[0]: this script's folder)


def build_peer(spec: dict, optimize_for_inference: bool = False) -> DALLE:
    vae = DiscreteVAE(image_size=spec["image_size"], num_layers=spec["vae_layers"], num_tokens=spec["num_image_tokens"])
    return DALLE(dim=spec["dim"], vae=vae, num_text_tokens=spec["num_text_tokens"], text_seq_len=spec["text_seq_len"],
                 depth=spec["depth"], heads=spec["heads"], dim_head=spec["dim_head"],
                 attn_types=spec.get("attn_types"),  # rotary_emb, shift_tokens: defaults (True)
                 optimize_for_inference=optimize_for_inference).train()


def main(request: dict) -> dict:
    common.set_threads()
    spec, task = request["spec"], request["task"]
    timing = dict(warmup=request.get("warmup", 2), repeats=request.get("repeats", 5))
    # "device" and "autocast" (a dtype name) for bench_gpu.py; CPU fp32 by default
    device = request.get("device", "cpu")
    autocast = getattr(torch, request["autocast"]) if request.get("autocast") else None
    if task in ("train_step", "fwd_bwd"):
        model = build_peer(spec).to(device)
        text, codes = common.make_batch(spec, device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if task == "train_step" else None
        result = common.timeit(common.train_step_fn(model, text, codes, opt, autocast), **timing)
        if device == "cuda":
            result["peak_memory"] = torch.cuda.max_memory_allocated()
        return result
    if task == "attention_only":
        heads, dim_head, n = request["heads"], request["dim_head"], common.seq_len(spec)
        attn = Attention(heads * dim_head, seq_len=n, causal=True, heads=heads, dim_head=dim_head)
        fn = common.attention_only_fn(attn, heads * dim_head, spec["batch"], n, lambda a, x: a(x))
        return common.timeit(fn, **timing)
    if task == "generate":
        # optimize_for_inference: its axial layers as masked full attention, which its cache serves
        model = build_peer(spec, request.get("optimize_for_inference", False)).to(device).eval()
        model.vae.decode = lambda codes: codes  # time the token loop only, not the VAE decoder
        if request.get("engage_cache"):
            # 1.6.6's forward_with_cond_scale drops its `cache` argument when cond_scale == 1, so
            # generate_images(use_cache=True) recomputes the whole prefix at every step. This
            # passes the cache through, as its cond_scale != 1 branch does.
            model.forward_with_cond_scale = lambda *a, cond_scale=1, cache=None, **kw: model(*a, cache=cache, **kw)
        text, _ = common.make_batch(spec, device=device)

        def generate():
            with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
                model.generate_images(text, filter_thres=request["filter_thres"], use_cache=True)
        return common.timeit(generate, **timing)
    raise ValueError(f"unknown task {task!r}")


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
