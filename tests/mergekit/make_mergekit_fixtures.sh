#!/usr/bin/env bash
# Re-makes the mergekit parity fixtures (mergekit_parity.safetensors, mergekit_parity.json)
# beside this script with the real mergekit 0.1.5, in a virtual environment of pinned packages
# under build/mergekit-env (needs python3-venv and PyPI, and about 4 GB for torch and its CUDA
# libraries; not part of the test run, which only reads the committed fixtures).
set -euo pipefail
cd "$(dirname "$0")/../.."
env=build/mergekit-env
if ! "$env/bin/python" -c "import mergekit, torch, safetensors" 2>/dev/null; then
  python3 -m venv "$env"
  "$env/bin/python" -m pip install -q --disable-pip-version-check mergekit==0.1.5 torch==2.15.0 \
    safetensors==0.8.0
fi
"$env/bin/python" tests/mergekit/make_mergekit_fixtures.py tests/mergekit
