#!/usr/bin/env bash
# Run one command on every worker (host) of a Cloud TPU VM slice, the way a multi-host JAX job
# must run: the same program, started on all hosts at once.
#
#   tools/launch_tpu_pod.sh --tpu NAME --zone ZONE [options] -- COMMAND [ARGS...]
#
# Examples (a v5p-16 slice: 8 chips on 2 hosts):
#   tools/launch_tpu_pod.sh --tpu dpo-v5p --zone us-east5-a --sync --install -- true
#   tools/launch_tpu_pod.sh --tpu dpo-v5p --zone us-east5-a -- \
#       flux-jax train --config configs/qwen3_8b.py --config.output_dir=gs://BUCKET/dpo/run1
#   tools/launch_tpu_pod.sh --tpu dpo-v5p --zone us-east5-a -- \
#       python -c 'import jax; jax.distributed.initialize(); print(jax.device_count())'  # 8
#
# Options:
#   --tpu NAME         the TPU VM (gcloud compute tpus tpu-vm list)
#   --zone ZONE        its zone
#   --project ID       GCP project (default: gcloud's configured project)
#   --repo DIR         the flux_jax checkout on every worker (default: flux_jax; relative to
#                      the worker's $HOME unless absolute)
#   --sync             first copy this checkout (git-tracked and untracked-unignored files) to
#                      --repo on every worker
#   --install          first create DIR/.venv on every worker and pip install -e . 'jax[tpu]'
#   --env KEY=VALUE    export this on every worker (repeatable), e.g. --env HF_TOKEN=...
#   --worker W         run on worker W only, or a comma list (default: all)
#
# On every worker the command runs in --repo with its .venv activated and FLUX_JAX_DISTRIBUTED=1,
# so flux_jax.distributed.initialize_distributed() calls jax.distributed.initialize(), which finds
# the other hosts through the TPU metadata server. Each worker reads only its own shards of the
# model; output_dir must be storage every worker sees (a gs:// bucket or a shared filesystem),
# since orbax writes one checkpoint from all hosts together. A model given as a hub id is
# downloaded once per worker (set --env HF_TOKEN=... for gated models).
#
# The output of all workers is interleaved on this terminal. Ctrl-C ends the local ssh sessions;
# a worker process that outlives them keeps its chips busy ("TPU in use" on the next run). Free
# them with gcloud directly (this script quotes its command as one program and its arguments):
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command='sudo lsof -t /dev/vfio/* /dev/accel* 2>/dev/null | sort -u | xargs -r sudo kill'
set -euo pipefail

usage() { sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

TPU="" ZONE="" PROJECT="" REPO="flux_jax" SYNC=0 INSTALL=0 WORKER="all"
ENVS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --sync) SYNC=1; shift ;;
    --install) INSTALL=1; shift ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --worker) WORKER="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch_tpu_pod.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "launch_tpu_pod.sh: --tpu and --zone are required" >&2; usage 2; }
[[ $# -gt 0 ]] || { echo "launch_tpu_pod.sh: no command after --" >&2; usage 2; }

# The checkout on the workers: "~/DIR" is left for the remote shell to expand.
if [[ "$REPO" == /* ]]; then RDIR="$REPO"; else RDIR="~/$REPO"; fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project "$PROJECT")

if [[ $SYNC == 1 ]]; then
  here=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  archive=$(mktemp /tmp/flux_jax_sync.XXXXXX.tar.gz)
  (cd "$here" && git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -)
  echo "syncing $here -> $TPU:$RDIR ($(du -h "$archive" | cut -f1))"
  "${GCLOUD[@]}" scp "$archive" "$TPU:/tmp/flux_jax_sync.tar.gz" --worker="$WORKER" "${WHERE[@]}"
  "${GCLOUD[@]}" ssh "$TPU" --worker="$WORKER" "${WHERE[@]}" \
    --command="mkdir -p $RDIR && tar -xzf /tmp/flux_jax_sync.tar.gz -C $RDIR"
  rm -f "$archive"
fi

if [[ $INSTALL == 1 ]]; then
  "${GCLOUD[@]}" ssh "$TPU" --worker="$WORKER" "${WHERE[@]}" --command="cd $RDIR && \
    python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
    .venv/bin/pip install -q -e . 'jax[tpu]'"
fi

# The remote command line: every argument quoted for the remote shell.
exports="export FLUX_JAX_DISTRIBUTED=1"
for kv in "${ENVS[@]}"; do exports+="; export $(printf '%q' "$kv")"; done
cmd=$(printf '%q ' "$@")
remote="cd $RDIR && source .venv/bin/activate && $exports && $cmd"

echo "on $TPU (worker $WORKER): $cmd"
exec "${GCLOUD[@]}" ssh "$TPU" --worker="$WORKER" "${WHERE[@]}" --command="$remote"
