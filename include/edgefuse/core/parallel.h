// edgefuse/core/parallel.h — a parallel loop whose partition does not depend on threads.
//
// parallel_for(n, grain, fn) cuts [0, n) into the fixed chunks [k*grain, min((k+1)*grain, n))
// and runs fn(begin, end) once per chunk on a persistent pool of threads. The chunks depend
// only on n and grain, never on the thread count, so any computation that is a function of
// its chunk gives bitwise-identical results with 1 or 64 threads (the library's determinism
// rule; oneMKL's CNR mode is the counter-example that needs a fixed thread count).
//
//   std::vector<float> y(n);
//   edgefuse::parallel_for(n, 1 << 16, [&](std::size_t b, std::size_t e) {
//     for (std::size_t i = b; i < e; ++i) y[i] = f(i);
//   });
#pragma once

#include <cstddef>
#include <type_traits>

namespace edgefuse {

// Between loops the pool's threads wait for the next one by spinning for up to 50 us and
// then sleeping on a condition variable (the caller waits for them the same way): a loop
// that follows soon after costs no futex wake-up. They do not spin when the pool has more
// threads than the hardware has.
//
// Threads used by parallel_for, the calling thread included. Initially the value of the
// environment variable EDGEFUSE_NUM_THREADS if it is a positive integer, else the hardware
// concurrency.
std::size_t num_threads() noexcept;

// Sets the thread count; 0 means the hardware concurrency. Waits for a loop running on another
// thread to end; throws Error when called from inside a parallel_for chunk.
void set_num_threads(std::size_t n);

// Sets the thread count for a scope when n > 0 (n = 0 keeps it) and restores the caller's on
// every exit: run_fusion and run_simulation take a job's thread count this way.
class ScopedNumThreads {
 public:
  explicit ScopedNumThreads(std::size_t n) : saved_(num_threads()) {
    if (n > 0) set_num_threads(n);
  }
  ~ScopedNumThreads() { set_num_threads(saved_); }
  ScopedNumThreads(const ScopedNumThreads&) = delete;
  ScopedNumThreads& operator=(const ScopedNumThreads&) = delete;

 private:
  std::size_t saved_;
};

namespace detail {
using ChunkFn = void (*)(void* ctx, std::size_t begin, std::size_t end);
void parallel_for_impl(std::size_t n, std::size_t grain, ChunkFn fn, void* ctx);
}  // namespace detail

// Calls fn(begin, end) for each chunk of [0, n) of `grain` elements (the last may be shorter).
// Chunks run concurrently in an unspecified order; fn must not write what another chunk
// reads. If fn throws, chunks not yet started are skipped and the exception of the
// lowest-numbered failing chunk is rethrown. A parallel_for called from inside fn runs
// serially on the calling thread. Throws Error if grain is 0. Allocates only when the pool
// (re)starts its threads, or to carry an exception.
template <typename Fn>
void parallel_for(std::size_t n, std::size_t grain, Fn&& fn) {
  using F = std::remove_reference_t<Fn>;
  auto call = [](void* ctx, std::size_t b, std::size_t e) { (*static_cast<F*>(ctx))(b, e); };
  detail::parallel_for_impl(n, grain, call, const_cast<void*>(static_cast<const void*>(&fn)));
}

}  // namespace edgefuse
