#!/usr/bin/env bash
# Cloud TPU pod slices: create, set up, train on every worker, stop, delete.
# Run `launch/tpu_pod.sh --help` for usage.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# Relative to the remote home directory, where `gcloud ... ssh --command` starts.
readonly REMOTE_DIR="simple_diffusion"
readonly JAX_TPU_SPEC="jax[tpu]>=0.10.2,<0.11"

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND --name=NAME --zone=ZONE [OPTIONS] [-- TRAIN_FLAGS...]

Manages a Cloud TPU VM slice (single host or pod) with gcloud and runs
`python -m simple_diffusion.main` on every worker at once. On a pod each worker
is one JAX process; they find each other through the TPU metadata, so no
coordinator flags are needed.

Commands:
  create   Create the slice. Needs --accelerator-type and --version.
  setup    Copy this checkout to every worker, make a virtual env there and
           `pip install -e .` plus the TPU JAX extra (jax[tpu]).
  run      Start training on all workers (--worker=all), detached. Needs
           --config and --workdir. Each worker logs to
           ~/simple_diffusion/logs/train-<worker hostname>.log.
  logs     Print the tail of the training log of one worker (or all).
  stop     Stop the training started by `run` on every worker: SIGTERM (a
           preemption notice: the trainer checkpoints and exits), then SIGKILL
           after --grace seconds.
  delete   Delete the slice (gcloud asks for confirmation).

Options:
  --name=NAME               TPU VM name (required).
  --zone=ZONE               GCP zone, e.g. us-central2-b (required).
  --project=PROJECT         GCP project (default: gcloud's configured one).
  --accelerator-type=TYPE   create: e.g. v4-32, v5litepod-16, v5p-32, v6e-16.
  --version=RUNTIME         create: TPU software version, e.g.
                            tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
                            v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e).
  --spot                    create: use Spot capacity (can be preempted).
  --python=PYTHON           setup: interpreter for the virtual env (default python3).
  --config=CONFIG           run: config file, relative to the repository root,
                            e.g. configs/imagenet512.py.
  --workdir=WORKDIR         run: checkpoints, TensorBoard events, samples. Use a
                            gs://bucket/path so all workers share it; the TPU VM's
                            service account needs write access to the bucket.
  --worker=N|all            logs: which worker (default 0).
  --lines=N                 logs: how many lines (default 50).
  --grace=SECONDS           stop: wait this long before SIGKILL (default 300).
  --dry-run                 Print the gcloud commands instead of running them.
  -h, --help                Show this help.

Flags after `--`, and any --config.KEY=VALUE, are passed to the trainer.

Example:
  launch/tpu_pod.sh create --name=sd-v4 --zone=us-central2-b \
      --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
  launch/tpu_pod.sh setup  --name=sd-v4 --zone=us-central2-b
  launch/tpu_pod.sh run    --name=sd-v4 --zone=us-central2-b \
      --config=configs/imagenet512.py --workdir=gs://my-bucket/imagenet512 \
      --config.batch_size=512
  launch/tpu_pod.sh logs   --name=sd-v4 --zone=us-central2-b --worker=all
  launch/tpu_pod.sh stop   --name=sd-v4 --zone=us-central2-b
  launch/tpu_pod.sh delete --name=sd-v4 --zone=us-central2-b
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  echo "Run 'launch/tpu_pod.sh --help' for usage." >&2
  exit 2
}

require() {  # require VALUE FLAG
  [[ -n "$1" ]] || die "missing $2 (needed by '${COMMAND}')"
}

COMMAND="" NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" VERSION="" SPOT=0
PYTHON="python3" CONFIG="" WORKDIR="" WORKER="0" LINES="50" GRACE="300" DRY_RUN=0
TRAIN_FLAGS=()

while (($#)); do
  arg="$1"
  shift
  case "${arg}" in
    -h | --help) usage; exit 0 ;;
    --) TRAIN_FLAGS+=("$@"); break ;;
    --dry-run) DRY_RUN=1; continue ;;
    --spot) SPOT=1; continue ;;
    --config.*) TRAIN_FLAGS+=("${arg}"); continue ;;
    --*=*) key="${arg%%=*}" value="${arg#*=}" ;;
    --*)
      (($#)) || die "${arg} needs a value"
      key="${arg}" value="$1"
      shift
      ;;
    *)
      [[ -z "${COMMAND}" ]] || die "unexpected argument '${arg}'"
      COMMAND="${arg}"
      continue
      ;;
  esac
  case "${key}" in
    --name) NAME="${value}" ;;
    --zone) ZONE="${value}" ;;
    --project) PROJECT="${value}" ;;
    --accelerator-type) ACCELERATOR_TYPE="${value}" ;;
    --version) VERSION="${value}" ;;
    --python) PYTHON="${value}" ;;
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --worker) WORKER="${value}" ;;
    --lines) LINES="${value}" ;;
    --grace) GRACE="${value}" ;;
    *) die "unknown option ${key}" ;;
  esac
done

[[ -n "${COMMAND}" ]] || die "missing COMMAND (create, setup, run, logs, stop or delete)"
case "${COMMAND}" in
  create | setup | run | logs | stop | delete) ;;
  *) die "unknown command '${COMMAND}'" ;;
esac
require "${NAME}" --name
require "${ZONE}" --zone
if [[ "${COMMAND}" == create ]]; then
  require "${ACCELERATOR_TYPE}" --accelerator-type
  require "${VERSION}" --version
fi
if [[ "${COMMAND}" == run ]]; then
  require "${CONFIG}" --config
  require "${WORKDIR}" --workdir
  [[ -f "${REPO_ROOT}/${CONFIG}" ]] || die "--config=${CONFIG} is not a file under ${REPO_ROOT}"
  if [[ "${WORKDIR}" != gs://* ]]; then
    echo "tpu_pod.sh: warning: --workdir=${WORKDIR} is local to each worker;" \
      "use a gs:// path so checkpoints survive the slice and all workers share them." >&2
  fi
fi
[[ "${WORKER}" == all || "${WORKER}" =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all'"
[[ "${LINES}" =~ ^[0-9]+$ ]] || die "--lines must be a number"
[[ "${GRACE}" =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds"

GCLOUD_SCOPE=(--zone="${ZONE}")
[[ -z "${PROJECT}" ]] || GCLOUD_SCOPE+=(--project="${PROJECT}")

run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "${NAME}" "${GCLOUD_SCOPE[@]}" \
    --worker="$1" --command="$2"
}

case "${COMMAND}" in
  create)
    create_flags=(--accelerator-type="${ACCELERATOR_TYPE}" --version="${VERSION}")
    ((SPOT == 0)) || create_flags+=(--spot)
    run gcloud compute tpus tpu-vm create "${NAME}" "${GCLOUD_SCOPE[@]}" "${create_flags[@]}"
    ;;
  setup)
    archive_dir="$(mktemp -d)"
    trap 'rm -rf "${archive_dir}"' EXIT
    archive="${archive_dir}/simple_diffusion.tar.gz"
    run tar -C "${REPO_ROOT}" --exclude=./.venv --exclude=./.git \
      --exclude=__pycache__ --exclude=./logs -czf "${archive}" .
    run gcloud compute tpus tpu-vm scp "${archive}" "${NAME}:simple_diffusion.tar.gz" \
      "${GCLOUD_SCOPE[@]}" --worker=all
    # Ubuntu's python3 lacks the venv module until python3-venv is installed.
    on_workers all "set -e
mkdir -p ${REMOTE_DIR} && tar -xzf simple_diffusion.tar.gz -C ${REMOTE_DIR}
cd ${REMOTE_DIR}
if [ ! -x .venv/bin/python ]; then
  $(printf '%q' "${PYTHON}") -m venv .venv || {
    sudo apt-get update -q && sudo apt-get install -y -q python3-venv &&
    $(printf '%q' "${PYTHON}") -m venv .venv; }
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e . $(printf '%q' "${JAX_TPU_SPEC}")
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  run)
    train_cmd=(.venv/bin/python -m simple_diffusion.main --config="${CONFIG}"
      --workdir="${WORKDIR}" "${TRAIN_FLAGS[@]}")
    # nohup + redirected stdio keeps training alive after ssh disconnects; the
    # pid file lets `stop` end exactly this process.
    on_workers all "set -e
cd ${REMOTE_DIR}
mkdir -p logs
if [ -f logs/train.pid ] && kill -0 \"\$(cat logs/train.pid)\" 2>/dev/null; then
  echo \"training already running on \$(hostname) (pid \$(cat logs/train.pid))\" >&2; exit 1
fi
nohup $(printf '%q ' "${train_cmd[@]}") > \"logs/train-\$(hostname).log\" 2>&1 < /dev/null &
echo \$! > logs/train.pid
echo \"started on \$(hostname): pid \$!, log ${REMOTE_DIR}/logs/train-\$(hostname).log\""
    ;;
  logs)
    on_workers "${WORKER}" "tail -v -n ${LINES} ${REMOTE_DIR}/logs/train-*.log"
    ;;
  stop)
    # JAX's preemption service catches SIGTERM (a preemption notice the trainer
    # acts on by checkpointing and exiting), so SIGKILL follows after --grace.
    on_workers all "cd ${REMOTE_DIR} && [ -f logs/train.pid ] || { echo \"nothing to stop on \$(hostname)\"; exit 0; }
pid=\$(cat logs/train.pid)
kill -TERM \"\$pid\" 2>/dev/null || { echo \"not running on \$(hostname)\"; rm -f logs/train.pid; exit 0; }
for _ in \$(seq ${GRACE}); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done
if kill -0 \"\$pid\" 2>/dev/null; then kill -KILL \"\$pid\"; echo \"killed on \$(hostname) after ${GRACE} s\"; else echo \"stopped on \$(hostname)\"; fi
rm -f logs/train.pid"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "${NAME}" "${GCLOUD_SCOPE[@]}"
    ;;
esac
