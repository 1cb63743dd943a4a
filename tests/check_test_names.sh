#!/bin/sh
# doctest_discover_tests cuts a test case's name at ';'. The cut name then matches no test case,
# and its ctest entry passes having run nothing. This fails when any name of the given doctest
# binaries holds a ';', naming them.
status=0
for bin in "$@"; do
  bad=$("$bin" --list-test-cases --no-version 2>&1 | grep ';')
  if [ -n "$bad" ]; then
    echo "$bin: test case names with ';' (ctest would run none of them):"
    echo "$bad"
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "no test case name holds ';'"
exit "$status"
