#!/usr/bin/env bash
# JAX and PyTorch side by side on one GPU, in SD 1.5 shapes (random weights, nothing downloaded):
# training at 256 px (the U-Net's step and the trainer's whole step, bfloat16, AdamW) and editing at
# 512 px (the guided U-Net call, one edit and a batch of 8, 30 Euler-ancestral steps), against
# diffusers' UNet2DConditionModel, its training step and StableDiffusionInstructPix2PixPipeline.
# Prints the table and writes $OUT/bench.json and $OUT/bench.md.
#
#   launch/bench_gpu.sh [more python -m mre.bench flags, e.g. --batch=16 --reps=20]
#
# Needs CUDA builds of JAX and torch, e.g.
#   pip install -r requirements.txt 'jax[cuda12]==0.10.2' torch diffusers
# About 5-7 minutes on one H100/H200, most of it compiling. The batch is 8 so that both frameworks'
# training states fit side by side on an 80 GB card; on an H200, --batch=16 also fits.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU
export XLA_PYTHON_CLIENT_PREALLOCATE=false              # PyTorch shares the GPU (same process)
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
OUT=${OUT:-bench_gpu}

python - <<'EOF'
import sys
import jax
if jax.default_backend() != "gpu":
  sys.exit(f"JAX runs on {jax.default_backend()}, not a GPU: install jax[cuda12]")
try:
  import torch
except ImportError:
  print("torch is not installed: the PyTorch column will say so", file=sys.stderr)
else:
  if not torch.cuda.is_available():
    sys.exit("torch sees no GPU (a CPU build?): install a CUDA build, or pass --torch=off")
print("JAX on", jax.devices()[0].device_kind)
EOF

start=$SECONDS
python -m mre.bench --preset=sd15-256-train,sd15-512-edit --reps=10 --warmup=3 --edit_reps=3 \
  --out="$OUT" "$@"
echo "bench_gpu: $((SECONDS - start)) s; tables in $OUT/bench.md"
