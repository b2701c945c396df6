#!/usr/bin/env bash
# Several nodes with the deepspeed launcher (passwordless ssh between the nodes in the hostfile):
#   launch/deepspeed.sh launch/hostfile train-dalle --data tokens/ ... --out runs/dalle
# A hostfile lists "hostname slots=GPUS" per node; see launch/hostfile.example.
set -euo pipefail
hostfile=${1:?usage: launch/deepspeed.sh HOSTFILE COMMAND [ARGS...]}
shift
exec deepspeed --hostfile "$hostfile" --module dalle_ds.cli "$@"
