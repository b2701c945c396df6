#!/usr/bin/env bash
# Creates benchmarks/.peer-venv with the reference peer dalle-pytorch 1.6.6, for the benchmark
# scripts to launch as a subprocess (benchmarks/peer_worker.py). The peer is never a dependency
# of dalle_ds itself. Only what dalle_pytorch imports at module import time is installed; its
# VQGAN/tokenizer stack (taming-transformers, omegaconf, transformers, youtokentome, ...) is not:
# peer_worker.py stubs taming and omegaconf.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.peer-venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
"${pip[@]}" torch==2.13.0                      # pinned: same torch as our .venv
"${pip[@]}" --no-deps dalle-pytorch==1.6.6
# dalle_pytorch's own imports (rotary/axial embeddings; pkg_resources, which setuptools >= 81 no
# longer ships, while torch 2.13 needs setuptools >= 77.0.3, so 'setuptools<70' is impossible),
# then what its vae.py / dalle_pytorch.py import at module level (numpy, PIL, yaml, tqdm,
# requests, packaging). The constraint keeps the resolver from ever moving torch.
"${pip[@]}" --constraint <(echo torch==2.13.0) einops axial-positional-embedding rotary-embedding-torch \
    'setuptools>=77.0.3,<81' numpy pillow pyyaml tqdm requests packaging
"$venv/bin/python" - <<'PY'
from importlib.metadata import version  # importing dalle_pytorch itself needs peer_worker's stubs
import torch, pkg_resources, einops, rotary_embedding_torch, axial_positional_embedding  # noqa: F401
print(f"peer venv ready: torch {torch.__version__}, dalle-pytorch {version('dalle-pytorch')}")
PY
