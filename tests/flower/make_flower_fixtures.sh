#!/usr/bin/env bash
# Re-makes the Flower parity fixtures (flower_parity.safetensors, flower_parity.json) beside
# this script with the real Flower 1.42.0 strategies, in a virtual environment of pinned
# packages under build/flwr-env (needs python3-venv and PyPI; not part of the test run, which
# only reads the committed fixtures).
set -euo pipefail
cd "$(dirname "$0")/../.."
env=build/flwr-env
if ! "$env/bin/python" -c "import flwr, numpy, safetensors" 2>/dev/null; then
  python3 -m venv "$env"
  "$env/bin/python" -m pip install -q --disable-pip-version-check flwr==1.42.0 numpy==2.4.6 \
    safetensors==0.8.0
fi
"$env/bin/python" tests/flower/make_flower_fixtures.py tests/flower
