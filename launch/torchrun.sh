#!/usr/bin/env bash
# One node, N processes (one per GPU; on CPU, N gloo ranks):
#   launch/torchrun.sh N train-dalle --data tokens/ --tokenizer captions.model --vae vae/ --out runs/dalle
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC COMMAND [ARGS...]}
shift
# --shutdown-timeout: on TERM (Ctrl-C, preemption) the trainers get time to write their checkpoint
exec torchrun --standalone --nproc_per_node "$nproc" --shutdown-timeout 300 -m dalle_ds.cli "$@"
