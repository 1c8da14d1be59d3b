#!/usr/bin/env bash
# Train on all GPUs of one host: a single process drives every local GPU (JAX is SPMD), so no
# torchrun-style launcher is needed.
#
#   launch/multi_gpu.sh [--config=configs/reward.py] [--config.* overrides...]
#
# Needs a CUDA build of JAX: pip install -r requirements.txt 'jax[cuda12]==0.10.2'
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/reward.py
ARGS=()
for a in "$@"; do
  case "$a" in --config=*) CONFIG=${a#--config=} ;; *) ARGS+=("$a") ;; esac
done
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m mre.train --config="$CONFIG" --config.distributed=off "${ARGS[@]}"
