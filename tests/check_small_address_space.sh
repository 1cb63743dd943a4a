#!/usr/bin/env bash
# The core edgefuse program links no LibTorch, so it starts within a small address space
# (LibTorch's static initialisers alone exceed 700 MiB), and its commands run there: --help,
# the in-memory demo, and a simulated fusion round under a fitting memory budget.
# Usage: check_small_address_space.sh EDGEFUSE WORK_DIR
set -euo pipefail
cli="$1"
work="$2"
if ldd "$cli" | grep -Ei 'libtorch|libc10'; then
  echo "FAIL: $cli links LibTorch"
  exit 1
fi
rm -rf "$work" && mkdir -p "$work" && cd "$work"
limit=716800  # KiB: 700 MiB of address space
(ulimit -v "$limit"; "$cli" --help >/dev/null)
(ulimit -v "$limit"; "$cli" demo --scale tiny --threads 2) | grep -q "mismatches 0"
(ulimit -v "$limit"; "$cli" simulate --target-params 2e6 --client-params 2e5 --clients 8 \
   --memory-budget 128MiB --threads 2 --quiet) | grep -q "xxh3"
echo "small address space: ok"
