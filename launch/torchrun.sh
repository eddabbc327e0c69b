#!/bin/bash
# Train one clip_train run on one or more machines without SLURM: start this on every node.
#
#   NNODES=2 MASTER_ADDR=node0 CLIP_TRAIN_RUN_ID=vitb16-run1 launch/torchrun.sh [hydra overrides]
#
# Environment:
#   NNODES                    nodes taking part (default 1)
#   MASTER_ADDR, MASTER_PORT  rendezvous host and port, reachable from every node (required with NNODES > 1;
#                             port default 29500); torchrun's c10d rendezvous runs there, so node ranks are
#                             assigned as nodes join and no node needs to know its own rank
#   CLIP_TRAIN_RUN_ID         names the rendezvous and the run directory outputs/<id>, so every node and every
#                             restart agree on it and resume there (required with NNODES > 1; one node: a
#                             timestamp taken once by this script)
#   CLIP_TRAIN_NPROC_PER_NODE processes per node (default: the GPUs nvidia-smi lists, else 1)
#   CLIP_TRAIN_MAX_RESTARTS   torchrun restarts of the whole group after a failure (default 0); each restart
#                             resumes from the newest checkpoint (ckpt.resume=auto)
#   CLIP_TRAIN_DRY_RUN=1      print the torchrun command instead of running it
#
# Activate the environment that has clip_train first: `python` is the one on PATH.
set -euo pipefail

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

nnodes=${NNODES:-1}
is_count "$nnodes" || die "NNODES must be a positive integer, got '$nnodes'"
restarts=${CLIP_TRAIN_MAX_RESTARTS:-0}
[[ $restarts =~ ^[0-9]+$ ]] || die "CLIP_TRAIN_MAX_RESTARTS must be a non-negative integer, got '$restarts'"

if [ -n "${CLIP_TRAIN_NPROC_PER_NODE:-}" ]; then
  nproc=$CLIP_TRAIN_NPROC_PER_NODE
  is_count "$nproc" || die "CLIP_TRAIN_NPROC_PER_NODE must be a positive integer, got '$nproc'"
else
  nproc=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  is_count "$nproc" || nproc=1
fi

if [ "$nnodes" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$nnodes needs MASTER_ADDR (a host every node can reach, e.g. the first node)"
  [ -n "${CLIP_TRAIN_RUN_ID:-}" ] || die "NNODES=$nnodes needs CLIP_TRAIN_RUN_ID, the same on every node (e.g. vitb16-run1)"
fi
run_id=${CLIP_TRAIN_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
[[ $run_id =~ ^[A-Za-z0-9._-]+$ ]] || die "CLIP_TRAIN_RUN_ID may only use letters, digits, '.', '_' and '-', got '$run_id'"

if [ -n "${MASTER_ADDR:-}" ]; then
  rendezvous=(--rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv-id="$run_id")
else
  rendezvous=(--standalone)
fi

# A fixed run directory (unless the caller chose one): a restarted group must find the checkpoints.
overrides=("$@")
has_run_dir=0
for arg in "${overrides[@]}"; do
  case $arg in hydra.run.dir=*) has_run_dir=1 ;; esac
done
if [ "$has_run_dir" = 0 ]; then
  overrides=("hydra.run.dir=outputs/${run_id}" "${overrides[@]}")
fi

cmd=(python -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc" "${rendezvous[@]}"
     --max-restarts="$restarts" -m clip_train "${overrides[@]}")
echo "torchrun.sh: $(printf '%q ' "${cmd[@]}")" >&2
if [ -n "${CLIP_TRAIN_DRY_RUN:-}" ]; then
  exit 0
fi
exec "${cmd[@]}"
