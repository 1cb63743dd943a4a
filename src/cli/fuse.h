// `edgefuse fuse JOB.json`: one fusion round through the engine (engine/fuse.h), with progress
// on stderr and a table at the end.
#pragma once

#include <cstddef>
#include <string>

namespace edgefuse::cli {

// Runs the job; `threads` (0: the job's value) overrides the job file. Returns the exit status.
int run_fuse(const std::string& job_path, std::size_t threads, bool quiet);

}  // namespace edgefuse::cli
