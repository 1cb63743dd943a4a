#!/usr/bin/env bash
# Sets up, builds and runs edgefuse on Debian 12: `bash scripts/run.sh demo` runs the demo,
# `bash scripts/run.sh test` runs the whole test suite. Installs the Debian packages that are
# missing (as root, or through sudo), configures once, and rebuilds only what changed, so
# running it again is cheap.
#
# The test job runs, in order:
#   1. ctest in build/: every doctest case, the CLI, example, benchmark smoke runs, the
#      find_package consumer, and the interop test against the Python `safetensors` package
#      (installed from PyPI into build/pyenv);
#   2. the io tests again, built with clang under AddressSanitizer + UBSan (build-san/);
#   3. the safetensors header fuzzer (libFuzzer) for 60 s, seeded with the bad inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
if [[ "$job" != "demo" && "$job" != "test" ]]; then
  echo "usage: bash scripts/run.sh demo|test" >&2
  exit 2
fi

# libopenblas0-pthread replaces the reference BLAS that Debian's LibTorch would otherwise
# call for every matrix product (about 10x slower); the fortunes packages (English, German,
# Italian, Spanish) are the text the lab's experiments train on.
packages=(g++ cmake ninja-build libhwy-dev libre2-dev libbenchmark-dev doctest-dev libfmt-dev
          libeigen3-dev nlohmann-json3-dev libcli11-dev libxxhash-dev librandom123-dev pkg-config
          libtorch-dev
          libopenblas0-pthread fortunes fortunes-de fortunes-it fortunes-es gnuplot-nox)
if [[ "$job" == "test" ]]; then
  packages+=(clang clang-format libclang-rt-14-dev python3 python3-venv)
fi
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
configure=(-G Ninja -DCMAKE_BUILD_TYPE=Release)
if [[ "$job" == "test" ]]; then
  # The interop test's Python: a virtual environment with pinned packages from PyPI.
  py="$PWD/$build/pyenv/bin/python"
  if ! "$py" -c "import safetensors, numpy" 2>/dev/null; then
    mkdir -p "$build"
    python3 -m venv "$build/pyenv"
    "$py" -m pip install -q --disable-pip-version-check safetensors==0.8.0 numpy==2.4.6
  fi
  configure+=(-DEDGEFUSE_PYTHON="$py")
fi
if [[ ! -f "$build/build.ninja" ]] ||
   { [[ "$job" == "test" ]] && ! grep -q "^EDGEFUSE_PYTHON:FILEPATH=$py\$" "$build/CMakeCache.txt"; }; then
  cmake -S . -B "$build" "${configure[@]}"
fi
cmake --build "$build" --parallel "$(nproc)"

if [[ "$job" == "demo" ]]; then
  "$build/edgefuse-lab" demo
  exit 0
fi

ctest --test-dir "$build" --output-on-failure --parallel "$(nproc)"

# Sanitizers: the io layer (reader, index, writer, crash tests) and the factored SVD's
# hand-written tridiagonal solvers under ASan + UBSan, and the fuzzer, all built with clang in
# their own folder.
san=build-san
if [[ ! -f "$san/build.ninja" ]]; then
  CC=clang CXX=clang++ cmake -S . -B "$san" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DEDGEFUSE_SANITIZE=address,undefined -DEDGEFUSE_BUILD_FUZZERS=ON \
    -DEDGEFUSE_WITH_TORCH=OFF -DEDGEFUSE_BUILD_CLI=OFF -DEDGEFUSE_BUILD_BENCHMARKS=OFF \
    -DEDGEFUSE_BUILD_EXAMPLES=OFF
fi
cmake --build "$san" --parallel "$(nproc)" --target edgefuse_io_tests crash_writer safetensors_fuzz \
  edgefuse_tests
echo "== io tests under AddressSanitizer + UBSan"
"$san/tests/edgefuse_io_tests"
echo "== factored SVD (every instruction-set copy) under AddressSanitizer + UBSan"
"$san/tests/edgefuse_tests" -tc="factored_svd*"

echo "== safetensors header fuzzer, 60 s"
rm -rf "$san/fuzz-run" && mkdir -p "$san/fuzz-run/corpus"
python3 fuzz/make_seeds.py "$san/fuzz-run/seeds"
"$san/fuzz/safetensors_fuzz" -max_total_time=60 -max_len=65536 -rss_limit_mb=4096 \
  -dict=fuzz/safetensors.dict -print_final_stats=1 \
  "$san/fuzz-run/corpus" "$san/fuzz-run/seeds" 2>&1 | tail -n 8
echo "== all tests passed"
