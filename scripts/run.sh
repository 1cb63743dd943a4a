#!/usr/bin/env bash
# Sets up, builds and runs edgefuse on Debian 12: `bash scripts/run.sh demo` runs the demo,
# `bash scripts/run.sh test` runs the whole test suite through ctest. Installs the Debian
# packages that are missing (as root, or through sudo), configures once, and rebuilds only
# what changed, so running it again is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
if [[ "$job" != "demo" && "$job" != "test" ]]; then
  echo "usage: bash scripts/run.sh demo|test" >&2
  exit 2
fi

packages=(g++ cmake ninja-build libhwy-dev libbenchmark-dev doctest-dev libfmt-dev
          libeigen3-dev nlohmann-json3-dev libcli11-dev libtorch-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  if [[ "$(id -u)" -ne 0 ]]; then sudo="sudo"; fi
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

build=build
if [[ ! -f "$build/build.ninja" ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$build" --parallel "$(nproc)"

case "$job" in
  demo) "$build/edgefuse" demo ;;
  test) ctest --test-dir "$build" --output-on-failure --parallel "$(nproc)" ;;
esac
