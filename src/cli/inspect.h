// The `edgefuse inspect PATH` job: lists a checkpoint's tensors (name, dtype, shape, bytes)
// and, for a PEFT folder, its adapter config and LoRA pairs.
#pragma once

#include <string>

namespace edgefuse::cli {

// Prints the listing of `path` (a .safetensors file, an index JSON, a checkpoint folder or a
// PEFT adapter folder) to stdout and returns 0. Invalid input throws edgefuse::Error (the
// caller prints it as one "error: ..." line and exits 2).
int run_inspect(const std::string& path);

}  // namespace edgefuse::cli
