// Dispatch unit and argument checks for kernels/accumulate.h.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "src/kernels/accumulate.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "src/kernels/accumulate-inl.h"

HWY_BEFORE_NAMESPACE();
namespace edgefuse {
namespace HWY_NAMESPACE {

void AccumulateF32(float* acc, const float* x, std::size_t n, float w) {
  AccumulateArray(acc, x, n, w);
}
void AccumulateBF16(float* acc, const BFloat16* x, std::size_t n, float w) {
  AccumulateArray(acc, x, n, w);
}
void AccumulateF16(float* acc, const Float16* x, std::size_t n, float w) {
  AccumulateArray(acc, x, n, w);
}
void AccumulateIndexedF32(float* acc, const float* x, const std::uint32_t* index, std::size_t n,
                          float w) {
  AccumulateIndexedArray(acc, x, index, n, w);
}
void AccumulateIndexedBF16(float* acc, const BFloat16* x, const std::uint32_t* index, std::size_t n,
                           float w) {
  AccumulateIndexedArray(acc, x, index, n, w);
}
void AccumulateIndexedF16(float* acc, const Float16* x, const std::uint32_t* index, std::size_t n,
                          float w) {
  AccumulateIndexedArray(acc, x, index, n, w);
}

}  // namespace HWY_NAMESPACE
}  // namespace edgefuse
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <atomic>
#include <numeric>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "edgefuse/kernels/accumulate.h"
#include "src/kernels/dispatch.h"

namespace edgefuse {

HWY_EXPORT(AccumulateF32);
HWY_EXPORT(AccumulateBF16);
HWY_EXPORT(AccumulateF16);
HWY_EXPORT(AccumulateIndexedF32);
HWY_EXPORT(AccumulateIndexedBF16);
HWY_EXPORT(AccumulateIndexedF16);

namespace {

template <typename T>
using DenseKernel = void (*)(float*, const T*, std::size_t, float);
template <typename T>
using IndexedKernel = void (*)(float*, const T*, const std::uint32_t*, std::size_t, float);

template <typename T>
void accumulate_checked(DenseKernel<T> kernel, float* acc, const T* x, std::size_t n, float w) {
  constexpr const char* kFn = "accumulate";
  detail::check_finite(kFn, "w", w);
  detail::check_pointer(kFn, "acc", acc, n);
  detail::check_pointer(kFn, "x", x, n);
  detail::check_disjoint(kFn, "acc", acc, n * sizeof(float), "x", x, n * sizeof(T));
  parallel_for(n, detail::kStreamGrain,
               [&](std::size_t b, std::size_t e) { kernel(acc + b, x + b, e - b, w); });
}

// Validates the runs and returns their prefix offsets into x (size num_runs + 1).
std::vector<std::size_t> check_runs(std::size_t acc_len, std::size_t x_len, const Run* runs,
                                    std::size_t num_runs) {
  constexpr const char* kFn = "accumulate_runs";
  detail::check_pointer(kFn, "runs", runs, num_runs);
  std::vector<std::size_t> offsets(num_runs + 1, 0);
  for (std::size_t k = 0; k < num_runs; ++k) {
    const Run& r = runs[k];
    if (r.length == 0) {
      detail::fail(kFn, ": runs[", k, "] = (dst_start ", r.dst_start, ", length 0) is empty");
    }
    if (r.dst_start > acc_len || r.length > acc_len - r.dst_start) {
      detail::fail(kFn, ": runs[", k, "] = (dst_start ", r.dst_start, ", length ", r.length,
                   ") ends past acc_len ", acc_len);
    }
    offsets[k + 1] = offsets[k] + r.length;
    if (offsets[k + 1] < offsets[k]) detail::fail(kFn, ": run lengths overflow");
  }
  if (offsets[num_runs] != x_len) {
    detail::fail(kFn, ": the ", num_runs, " runs cover ", offsets[num_runs],
                 " elements but x_len is ", x_len);
  }
  std::vector<std::size_t> order(num_runs);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return runs[a].dst_start < runs[b].dst_start; });
  for (std::size_t k = 1; k < num_runs; ++k) {
    const Run& prev = runs[order[k - 1]];
    const Run& next = runs[order[k]];
    if (prev.dst_start + prev.length > next.dst_start) {
      detail::fail(kFn, ": runs[", order[k - 1], "] = (dst_start ", prev.dst_start, ", length ",
                   prev.length, ") and runs[", order[k], "] = (dst_start ", next.dst_start,
                   ", length ", next.length, ") overlap in the destination");
    }
  }
  return offsets;
}

template <typename T>
void accumulate_runs_checked(DenseKernel<T> kernel, float* acc, std::size_t acc_len, const T* x,
                             std::size_t x_len, const Run* runs, std::size_t num_runs, float w) {
  constexpr const char* kFn = "accumulate_runs";
  detail::check_finite(kFn, "w", w);
  const std::vector<std::size_t> offsets = check_runs(acc_len, x_len, runs, num_runs);
  detail::check_pointer(kFn, "acc", acc, x_len);
  detail::check_pointer(kFn, "x", x, x_len);
  detail::check_disjoint(kFn, "acc", acc, acc_len * sizeof(float), "x", x, x_len * sizeof(T));
  // Chunks cut x (not acc) into equal pieces, so one long run and many short ones both
  // spread over the threads; each chunk walks the runs it intersects.
  parallel_for(x_len, detail::kStreamGrain, [&](std::size_t b, std::size_t e) {
    std::size_t k = static_cast<std::size_t>(std::upper_bound(offsets.begin(), offsets.end(), b) -
                                             offsets.begin() - 1);
    while (b < e) {
      const std::size_t stop = std::min(e, offsets[k + 1]);
      kernel(acc + runs[k].dst_start + (b - offsets[k]), x + b, stop - b, w);
      b = stop;
      ++k;
    }
  });
}

template <typename T>
void accumulate_indexed_checked(IndexedKernel<T> kernel, float* acc, std::size_t acc_len,
                                const T* x, const std::uint32_t* index, std::size_t n, float w) {
  constexpr const char* kFn = "accumulate_indexed";
  detail::check_finite(kFn, "w", w);
  detail::check_pointer(kFn, "acc", acc, n);
  detail::check_pointer(kFn, "x", x, n);
  detail::check_pointer(kFn, "index", index, n);
  // One parallel pass checks the range and whether the list is strictly increasing (plans
  // produce sorted subsets), which proves the indices distinct without extra memory. The
  // lowest failing chunk's error is the one rethrown, so the message names the first bad index.
  std::atomic<bool> increasing{true};
  parallel_for(n, detail::kStreamGrain, [&](std::size_t b, std::size_t e) {
    bool inc = b == 0 || index[b] > index[b - 1];
    for (std::size_t i = b; i < e; ++i) {
      if (index[i] >= acc_len) {
        detail::fail(kFn, ": index[", i, "] = ", index[i], " is out of range for acc_len ",
                     acc_len);
      }
      inc = inc && (i == b || index[i] > index[i - 1]);
    }
    if (!inc) increasing.store(false, std::memory_order_relaxed);
  });
  if (!increasing.load()) {
    std::vector<std::uint64_t> seen((acc_len + 63) / 64, 0);
    for (std::size_t i = 0; i < n; ++i) {
      std::uint64_t& word = seen[index[i] / 64];
      const std::uint64_t bit = std::uint64_t{1} << (index[i] % 64);
      if (word & bit) {
        const std::size_t first =
            static_cast<std::size_t>(std::find(index, index + i, index[i]) - index);
        detail::fail(kFn, ": index value ", index[i], " repeats (first at index[", first,
                     "]); a plan's indices must be distinct");
      }
      word |= bit;
    }
  }
  detail::check_disjoint(kFn, "acc", acc, acc_len * sizeof(float), "x", x, n * sizeof(T));
  detail::check_disjoint(kFn, "acc", acc, acc_len * sizeof(float), "index", index,
                         n * sizeof(std::uint32_t));
  parallel_for(n, detail::kStreamGrain,
               [&](std::size_t b, std::size_t e) { kernel(acc, x + b, index + b, e - b, w); });
}

}  // namespace

void accumulate(float* acc, const float* x, std::size_t n, float w) {
  detail::init_dispatch();
  accumulate_checked(&HWY_DYNAMIC_DISPATCH(AccumulateF32), acc, x, n, w);
}
void accumulate(float* acc, const BFloat16* x, std::size_t n, float w) {
  detail::init_dispatch();
  accumulate_checked(&HWY_DYNAMIC_DISPATCH(AccumulateBF16), acc, x, n, w);
}
void accumulate(float* acc, const Float16* x, std::size_t n, float w) {
  detail::init_dispatch();
  accumulate_checked(&HWY_DYNAMIC_DISPATCH(AccumulateF16), acc, x, n, w);
}

void accumulate_runs(float* acc, std::size_t acc_len, const float* x, std::size_t x_len,
                     const Run* runs, std::size_t num_runs, float w) {
  detail::init_dispatch();
  accumulate_runs_checked(&HWY_DYNAMIC_DISPATCH(AccumulateF32), acc, acc_len, x, x_len, runs,
                          num_runs, w);
}
void accumulate_runs(float* acc, std::size_t acc_len, const BFloat16* x, std::size_t x_len,
                     const Run* runs, std::size_t num_runs, float w) {
  detail::init_dispatch();
  accumulate_runs_checked(&HWY_DYNAMIC_DISPATCH(AccumulateBF16), acc, acc_len, x, x_len, runs,
                          num_runs, w);
}
void accumulate_runs(float* acc, std::size_t acc_len, const Float16* x, std::size_t x_len,
                     const Run* runs, std::size_t num_runs, float w) {
  detail::init_dispatch();
  accumulate_runs_checked(&HWY_DYNAMIC_DISPATCH(AccumulateF16), acc, acc_len, x, x_len, runs,
                          num_runs, w);
}

void accumulate_indexed(float* acc, std::size_t acc_len, const float* x, const std::uint32_t* index,
                        std::size_t n, float w) {
  detail::init_dispatch();
  accumulate_indexed_checked(&HWY_DYNAMIC_DISPATCH(AccumulateIndexedF32), acc, acc_len, x, index, n,
                             w);
}
void accumulate_indexed(float* acc, std::size_t acc_len, const BFloat16* x,
                        const std::uint32_t* index, std::size_t n, float w) {
  detail::init_dispatch();
  accumulate_indexed_checked(&HWY_DYNAMIC_DISPATCH(AccumulateIndexedBF16), acc, acc_len, x, index,
                             n, w);
}
void accumulate_indexed(float* acc, std::size_t acc_len, const Float16* x,
                        const std::uint32_t* index, std::size_t n, float w) {
  detail::init_dispatch();
  accumulate_indexed_checked(&HWY_DYNAMIC_DISPATCH(AccumulateIndexedF16), acc, acc_len, x, index, n,
                             w);
}

}  // namespace edgefuse
#endif  // HWY_ONCE
