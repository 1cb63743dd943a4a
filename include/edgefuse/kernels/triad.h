// edgefuse/kernels/triad.h — the STREAM triad, the memory-bandwidth roofline of the library.
//
// McCalpin's STREAM benchmark (https://www.cs.virginia.edu/stream/) "triad": a = b + s * c.
// Fusion operators move bytes and hardly compute, so every benchmark and the demo report
// their bandwidth as a fraction of this triad measured in the same process, on the same
// threads (parallel_for), with STREAM's byte count: 3 * 4 bytes per f32 element (write
// allocate not counted).
#pragma once

#include <cstddef>

namespace edgefuse {

// a[i] = b[i] + s * c[i] (no FMA). Throws Error if n > 0 and a pointer is null.
void triad(float* a, const float* b, const float* c, float s, std::size_t n);

// Runs the triad `reps` times over three fresh arrays of n floats (after one warm-up pass)
// and returns the best rate in bytes per second, counting 12 bytes per element. Use n so
// that 12 * n is several times the last-level cache. Throws Error if n or reps is 0.
// Allocates 12 * n bytes.
double measure_triad_bytes_per_second(std::size_t n, int reps);

// The same for a job that reports the triad beside its own work: where the arrays cannot be
// allocated (a process near its address-space limit) it tries half as many elements, down to
// 65536, and returns 0 (not measured) rather than fail the job it would only describe.
double measure_triad_if_memory_allows(std::size_t n, int reps);

}  // namespace edgefuse
