#!/usr/bin/env bash
# The AVX copies of factored_svd (src/lora/factored_svd.h) must define no global or weak symbol
# but their entry points and Eigen under its renamed namespace: any other one (a
# standard-library or Eigen template compiled with AVX flags) could be picked by the linker for
# the whole library and crash a CPU without AVX. Usage: check_isa_symbols.sh libedgefuse.a
set -euo pipefail
lib=$1
status=0
for isa in avx2 avx512; do
  member="factored_svd_${isa}.cc.o"
  syms=$(nm -A --defined-only "$lib" | grep -F ":${member}:" || true)
  if [[ -z "$syms" ]]; then
    echo "FAIL: $lib has no member $member"
    status=1
    continue
  fi
  # Global (upper-case type) and unique/weak-object ('u', 'v', 'w') symbols only.
  bad=$(awk '{ if ($2 ~ /^[A-Zuvw]$/) print $3 }' <<<"$syms" | c++filt |
        grep -v -e "^edgefuse::detail::factored_svd_${isa}(" -e "edgefuse_eigen_${isa}" \
                -e '^DW\.ref\.__gxx_personality_v0$' || true)
  count=$(awk '{ if ($2 ~ /^[A-Zuvw]$/) n++ } END { print n + 0 }' <<<"$syms")
  if [[ -n "$bad" ]]; then
    echo "FAIL: $member defines symbols outside its namespaces:"
    echo "$bad"
    status=1
  else
    echo "ok: $member, $count global symbols, all its own"
  fi
done
exit $status
