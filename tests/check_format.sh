#!/bin/sh
# Every C++ file of the repository follows .clang-format. Usage: check_format.sh CLANG_FORMAT SOURCE_DIR
set -eu
clang_format=$1
cd "$2"
files=$(find src include tests benchmarks examples lab fuzz -name '*.cc' -o -name '*.h' | sort)
if "$clang_format" --dry-run --Werror --style=file $files; then
  echo "every C++ file follows .clang-format ($(echo "$files" | wc -l) files)"
else
  echo "run: clang-format -i --style=file on the files above" >&2
  exit 1
fi
