#!/usr/bin/env bash
# Create a virtual environment (./.venv, or LOGITCACHE_VENV) with logitcache and its test
# tools installed.
#
# torch is installed first and on its own: `torch==2.13.0` resolves to the CPU wheel
# that lies on our development and CI machines, so the later `pip install -e .` finds
# its torch requirement satisfied and downloads no multi-GB CUDA build. Elsewhere set
# LOGITCACHE_TORCH to the torch you want (e.g. LOGITCACHE_TORCH="torch" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LOGITCACHE_VENV:-.venv}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${LOGITCACHE_TORCH:-torch==2.13.0}"
"$venv/bin/python" -m pip install --quiet -e ".[test]"
"$venv/bin/logitcache" --version
