#!/usr/bin/env bash
# avgen training on every worker of a Cloud TPU VM pod slice (gcloud ... ssh --worker=all).
#
#   launch/tpu_pod.sh my-v5p-32 us-east5-a configs/stage2.py:size=2B /mnt/shared/runs/stage2 \
#       --config.data.path='/mnt/shared/data/*.array_record' --config.mesh.fsdp=16
#
# Arguments: TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]. Every worker runs the same
# command; AVGEN_DISTRIBUTED=auto makes jax.distributed find the pod from the TPU metadata.
# WORKDIR and the data must be a path all workers see (Filestore/NFS or a gcsfuse mount).
# Environment (optional):
#   PROJECT     gcloud project (default: gcloud's configured one)
#   AVGEN_REPO  the checkout on the workers (default: $HOME/avgen, expanded on the worker)
#   SYNC=1      first copy this checkout to AVGEN_REPO on every worker and pip install it with
#               the tpu extra
#   DRY_RUN=1   print the gcloud commands instead of running them
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4
REMOTE_REPO=${AVGEN_REPO:-'$HOME/avgen'}
GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  TARGET+=(--project="$PROJECT")
fi
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ "${SYNC:-0}" == 1 ]]; then
  archive=$(mktemp /tmp/avgen-XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  run "${GCLOUD[@]}" scp "$archive" "$TPU_NAME:/tmp/avgen.tar.gz" "${TARGET[@]}"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${TARGET[@]}" --command="mkdir -p \"$REMOTE_REPO\" && \
tar -xzf /tmp/avgen.tar.gz -C \"$REMOTE_REPO\" && pip install -q -e \"$REMOTE_REPO[tpu]\""
fi

# Quote each override once here so that the remote shell sees it unchanged.
overrides=$(printf ' %q' "$@")
remote="cd \"$REMOTE_REPO\" && AVGEN_DISTRIBUTED=auto python3 -m avgen.main \
--config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR")${overrides}"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${TARGET[@]}" --command="$remote"
