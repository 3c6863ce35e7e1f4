#!/usr/bin/env bash
# Sets up a fresh Debian machine for ssl-lab: Fashion-MNIST (apt), a .venv with the CPU
# torch 2.13.0 installed *first* (a plain `torch` would pull a multi-GB CUDA build), then
# the package with its dev extras. Idempotent: a finished setup is skipped in < 1 s.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SSL_LAB_DATA:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup: no apt-get; Fashion-MNIST will be downloaded on first use (or set SSL_LAB_DATA)" >&2
  fi
fi

stamp=.venv/.ssl-lab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[dev,gen]'
  touch "$stamp"
fi
