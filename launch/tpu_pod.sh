#!/usr/bin/env bash
# Train on every worker of a TPU VM pod slice at once.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [extra --config.* overrides...]
#   e.g. launch/tpu_pod.sh my-v4-32 us-central2-b --config.model.pretrained=/mnt/disks/ip2p
#
# The repo (and the model/data folders the config names) must be present at the same path on every
# worker (e.g. a shared disk, or `gcloud ... scp --worker=all`). jax.distributed.initialize() is
# detected automatically on TPU pods; mre.train resumes from workdir/checkpoints when re-run, and
# saves a checkpoint when a preemption/maintenance notice arrives.
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; shift 2
CONFIG=${CONFIG:-configs/reward.py}
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
OVERRIDES=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' &&
  python -m mre.train --config=$CONFIG $OVERRIDES"
