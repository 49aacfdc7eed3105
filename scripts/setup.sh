#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: Fashion-MNIST (Debian package), a virtual
# environment in .venv with torch, visionpe and its dependencies. Safe to re-run: it skips what
# is already there. Used by `make demo`, `make test` and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

STAMP=.venv/.visionpe-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "== creating .venv and installing torch, visionpe and dependencies (several minutes)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch wheels: these versions are pinned for reproducibility (CUDA build on x86_64 Linux)
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$STAMP"
fi
.venv/bin/python -c "import torch, timm, lightning, visionpe; print('visionpe', visionpe.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| lightning', lightning.__version__)"
