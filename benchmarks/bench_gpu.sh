#!/usr/bin/env bash
# bench_gpu.py on a CUDA machine without internet, from wheels carried along.
#
#   bash benchmarks/bench_gpu.sh --fetch   # here, with PyPI: wheels into benchmarks/.gpu-wheels (git-ignored)
#   bash benchmarks/bench_gpu.sh [ARGS]    # there: installs them into temporary folders and runs
#                                          # bench_gpu.py ARGS; figures and log go to $OUT (or a temp dir)
#   bash benchmarks/bench_gpu.sh --tests [K]  # there: instead, the tests that need CUDA (skipped on
#                                          # CPU) whose names match pytest's -k K (default: the split
#                                          # attention and CUDA-graph ones, about 14 tests and 4
#                                          # FlexAttention compiles; "cuda": 33, the 32 CUDA-only
#                                          # ones and one that runs anywhere, minutes of compiles)
#
# The target has Python 3.12 with torch (CUDA), einops, sentencepiece, tensorboard, safetensors,
# pillow and numpy. Ours gets DeepSpeed (built here from a venv with torch) and the pure-Python
# rest; the peer (dalle-pytorch 1.6.6) gets its own folder, put first on its PYTHONPATH only.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=benchmarks/.gpu-wheels
if [[ "${1:-}" == --fetch ]]; then
    rm -rf "$wheels" && mkdir -p "$wheels/ours" "$wheels/peer"
    .venv/bin/pip wheel --quiet --no-deps --no-build-isolation deepspeed==0.19.8 -w "$wheels/ours"
    .venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 pydantic-core==2.41.5 pydantic==2.12.5 hjson annotated-types \
        typing-inspection webdataset braceexpand tqdm psutil py-cpuinfo msgpack \
        pytest pytest-timeout pluggy iniconfig packaging pygments -d "$wheels/ours"
    # the peer: what dalle_pytorch imports when it loads (peer_worker.py stubs omegaconf and taming)
    .venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 dalle-pytorch==1.6.6 axial-positional-embedding rotary-embedding-torch \
        ftfy wcwidth setuptools==69.5.1 requests urllib3 idna charset-normalizer certifi tqdm packaging pyyaml \
        -d "$wheels/peer"
    du -sh "$wheels"
    exit 0
fi
out="${OUT:-$(mktemp -d)}"
site="$(mktemp -d)"
python3 -m pip install --quiet --no-index --no-deps --target "$site/ours" --python-version 3.12 \
    --only-binary=:all: --platform manylinux2014_x86_64 "$wheels"/ours/*.whl
python3 -m pip install --quiet --no-index --no-deps --target "$site/peer" --python-version 3.12 \
    --only-binary=:all: --platform manylinux2014_x86_64 "$wheels"/peer/*.whl
export PYTHONPATH="$PWD:$site/ours" DALLE_DS_PEER_PATH="$site/peer"
if [[ "${1:-}" == --tests ]]; then
    python3 -m pytest -q -rs -p no:cacheprovider -k "${2:-split_attention_on_cuda or cuda_graph_generation_equals}" \
        tests/test_flex_attention.py tests/test_attention_patterns.py tests/test_generation.py 2>&1 \
        | tee "$out/cuda_tests.log"
    exit "${PIPESTATUS[0]}"
fi
cd benchmarks
python3 bench_gpu.py --out "$out/bench_gpu.json" "$@" 2>&1 | tee "$out/bench_gpu.log"
