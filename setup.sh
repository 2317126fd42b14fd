#!/usr/bin/env bash
# One-command setup on a fresh Debian/Ubuntu machine, then the offline CPU demo.
#   ./setup.sh              # venv + package + Fashion-MNIST, then trains the demo
#   ./setup.sh --no-demo    # setup only
# The demo writes to workdirs/demo (re-running resumes it).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -qq dataset-fashion-mnist \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/python -m simple_diffusion.main --config=configs/fashion_mnist_demo.py \
    --workdir=workdirs/demo
fi
