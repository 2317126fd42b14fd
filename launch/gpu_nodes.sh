#!/usr/bin/env bash
# Multi-node GPU training without a scheduler. Run `launch/gpu_nodes.sh --help`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
Usage:
  launch/gpu_nodes.sh --coordinator=HOST:PORT --num-processes=N --process-id=I \
      --config=CONFIG --workdir=WORKDIR [OPTIONS] [-- TRAIN_FLAGS...]
    Start this machine's process. Run the same command on every node, each with
    its own --process-id (0..N-1); process 0 runs on HOST, which must accept
    connections on PORT from the other nodes.

  launch/gpu_nodes.sh --hosts=HOST0,HOST1,... --config=CONFIG --workdir=WORKDIR \
      [--port=PORT] [OPTIONS] [-- TRAIN_FLAGS...]
    From one machine, start process i on HOSTi over ssh (HOST0 coordinates),
    each logging to logs/gpu_nodes-<i>-<host>.log here, and wait for all.
    Needs password-less ssh and this checkout at the same path on every host
    (or --repo).

Both run `python -m simple_diffusion.main --config=CONFIG --workdir=WORKDIR ...`
with SIMPLE_DIFFUSION_COORDINATOR, SIMPLE_DIFFUSION_NUM_PROCESSES and
SIMPLE_DIFFUSION_PROCESS_ID set, which simple_diffusion.distributed reads.
Each process drives all GPUs it sees unless --gpus says otherwise; for several
processes on one machine give each its own --gpus.

Options:
  --config=CONFIG        Config file relative to the repository (required).
  --workdir=WORKDIR      Run directory every node can reach: a shared file
                         system path or gs://... (required).
  --coordinator=H:P      Process 0's address and a free port on it.
  --num-processes=N      Total number of processes.
  --process-id=I         This process's id, 0 <= I < N.
  --hosts=H0,H1,...      Hosts to start one process each on, over ssh.
  --port=PORT            --hosts: coordinator port on H0 (default 12355).
  --gpus=0,1,...         Local GPU ids this process uses (JAX_LOCAL_DEVICE_IDS).
  --repo=DIR             Repository path (default: this checkout).
  --python=PYTHON        Interpreter (default: DIR/.venv/bin/python if present,
                         else python3).
  --dry-run              Print what would run instead of running it.
  -h, --help             Show this help.

Flags after `--`, and any --config.KEY=VALUE, are passed to the trainer.

Examples:
  # on node A (10.0.0.1) and node B:
  launch/gpu_nodes.sh --coordinator=10.0.0.1:12355 --num-processes=2 --process-id=0 \
      --config=configs/imagenet128.py --workdir=/shared/runs/in128
  launch/gpu_nodes.sh --coordinator=10.0.0.1:12355 --num-processes=2 --process-id=1 \
      --config=configs/imagenet128.py --workdir=/shared/runs/in128
  # or both from one machine:
  launch/gpu_nodes.sh --hosts=10.0.0.1,10.0.0.2 \
      --config=configs/imagenet128.py --workdir=/shared/runs/in128
EOF
}

die() {
  echo "gpu_nodes.sh: error: $*" >&2
  echo "Run 'launch/gpu_nodes.sh --help' for usage." >&2
  exit 2
}

CONFIG="" WORKDIR="" COORDINATOR="" NUM_PROCESSES="" PROCESS_ID="" HOSTS=""
PORT="12355" GPUS="" REPO="${REPO_ROOT}" PYTHON="" DRY_RUN=0
TRAIN_FLAGS=()

while (($#)); do
  arg="$1"
  shift
  case "${arg}" in
    -h | --help) usage; exit 0 ;;
    --) TRAIN_FLAGS+=("$@"); break ;;
    --dry-run) DRY_RUN=1; continue ;;
    --config.*) TRAIN_FLAGS+=("${arg}"); continue ;;
    --*=*) key="${arg%%=*}" value="${arg#*=}" ;;
    --*)
      (($#)) || die "${arg} needs a value"
      key="${arg}" value="$1"
      shift
      ;;
    *) die "unexpected argument '${arg}'" ;;
  esac
  case "${key}" in
    --config) CONFIG="${value}" ;;
    --workdir) WORKDIR="${value}" ;;
    --coordinator) COORDINATOR="${value}" ;;
    --num-processes) NUM_PROCESSES="${value}" ;;
    --process-id) PROCESS_ID="${value}" ;;
    --hosts) HOSTS="${value}" ;;
    --port) PORT="${value}" ;;
    --gpus) GPUS="${value}" ;;
    --repo) REPO="${value}" ;;
    --python) PYTHON="${value}" ;;
    *) die "unknown option ${key}" ;;
  esac
done

[[ -n "${CONFIG}" ]] || die "missing --config"
[[ -n "${WORKDIR}" ]] || die "missing --workdir"
[[ -z "${GPUS}" || "${GPUS}" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must look like 0,1,2"

quote() {
  printf '%q ' "$@"
}

if [[ -n "${HOSTS}" ]]; then
  [[ -z "${COORDINATOR}${NUM_PROCESSES}${PROCESS_ID}" ]] ||
    die "--hosts sets the coordinator, process count and ids itself; drop them"
  [[ "${PORT}" =~ ^[0-9]+$ ]] || die "--port must be a number"
  [[ -f "${REPO_ROOT}/${CONFIG}" ]] || die "--config=${CONFIG} is not a file under ${REPO_ROOT}"
  IFS=, read -r -a hosts <<<"${HOSTS}"
  coordinator="${hosts[0]}:${PORT}"
  ((DRY_RUN)) || mkdir -p "${REPO_ROOT}/logs"
  pids=()
  # Ctrl-C here ends the ssh sessions started below, which ends the remote runs.
  trap '((${#pids[@]} == 0)) || kill "${pids[@]}" 2>/dev/null' INT TERM
  for i in "${!hosts[@]}"; do
    host="${hosts[i]}"
    node_cmd=(launch/gpu_nodes.sh --coordinator="${coordinator}"
      --num-processes="${#hosts[@]}" --process-id="${i}" --config="${CONFIG}"
      --workdir="${WORKDIR}")
    [[ -z "${GPUS}" ]] || node_cmd+=(--gpus="${GPUS}")
    [[ -z "${PYTHON}" ]] || node_cmd+=(--python="${PYTHON}")
    node_cmd+=(-- "${TRAIN_FLAGS[@]}")
    # -tt: when this ssh session ends, the remote process gets SIGHUP and ends too.
    ssh_cmd=(ssh -tt -o BatchMode=yes "${host}" "cd $(quote "${REPO}")&& $(quote "${node_cmd[@]}")")
    log="${REPO_ROOT}/logs/gpu_nodes-${i}-${host}.log"
    if ((DRY_RUN)); then
      echo "$(quote "${ssh_cmd[@]}")> $(quote "${log}")"
      continue
    fi
    "${ssh_cmd[@]}" >"${log}" 2>&1 &
    pids+=("$!")
    echo "gpu_nodes.sh: process ${i} on ${host}: log ${log}"
  done
  failed=0
  for i in "${!pids[@]}"; do
    if ! wait "${pids[i]}"; then
      echo "gpu_nodes.sh: process ${i} on ${hosts[i]} failed; see its log" >&2
      failed=1
    fi
  done
  exit "${failed}"
fi

[[ -n "${COORDINATOR}" ]] || die "missing --coordinator (or give --hosts)"
[[ -n "${NUM_PROCESSES}" ]] || die "missing --num-processes (or give --hosts)"
[[ -n "${PROCESS_ID}" ]] || die "missing --process-id (or give --hosts)"
[[ "${COORDINATOR}" =~ ^.+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT"
[[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive number"
if [[ ! "${PROCESS_ID}" =~ ^(0|[1-9][0-9]*)$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
  die "--process-id must be in 0..$((NUM_PROCESSES - 1))"
fi

cd "${REPO}" || die "--repo=${REPO} is not a directory"
[[ -f "${CONFIG}" ]] || die "--config=${CONFIG} is not a file under ${REPO}"
if [[ -z "${PYTHON}" ]]; then
  PYTHON="python3"
  [[ ! -x .venv/bin/python ]] || PYTHON="${REPO}/.venv/bin/python"
fi

export SIMPLE_DIFFUSION_COORDINATOR="${COORDINATOR}"
export SIMPLE_DIFFUSION_NUM_PROCESSES="${NUM_PROCESSES}"
export SIMPLE_DIFFUSION_PROCESS_ID="${PROCESS_ID}"
[[ -z "${GPUS}" ]] || export JAX_LOCAL_DEVICE_IDS="${GPUS}"
cmd=("${PYTHON}" -m simple_diffusion.main --config="${CONFIG}" --workdir="${WORKDIR}"
  "${TRAIN_FLAGS[@]}")
if ((DRY_RUN)); then
  env | grep -E '^(SIMPLE_DIFFUSION_|JAX_LOCAL_DEVICE_IDS=)' | sort
  quote "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
