// Tests for edgefuse/core/parallel.h: a partition fixed by (n, grain), never by threads.
#include "edgefuse/core/parallel.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "edgefuse/core/error.h"

using namespace edgefuse;

namespace {

std::vector<std::pair<std::size_t, std::size_t>> chunks_seen(std::size_t n, std::size_t grain) {
  std::mutex m;
  std::vector<std::pair<std::size_t, std::size_t>> seen;
  parallel_for(n, grain, [&](std::size_t b, std::size_t e) {
    std::lock_guard<std::mutex> lock(m);
    seen.emplace_back(b, e);
  });
  std::sort(seen.begin(), seen.end());
  return seen;
}

// Per-chunk float sums combined in chunk order: the pattern that makes reductions
// deterministic on top of parallel_for.
float chunked_sum(const std::vector<float>& x, std::size_t grain) {
  std::vector<float> partial((x.size() + grain - 1) / grain, 0.0f);
  parallel_for(x.size(), grain, [&](std::size_t b, std::size_t e) {
    float s = 0.0f;
    for (std::size_t i = b; i < e; ++i) s += x[i];
    partial[b / grain] = s;
  });
  float total = 0.0f;
  for (float p : partial) total += p;
  return total;
}

}  // namespace

TEST_CASE("parallel_for cuts the same chunks with 1, 2, 7 and 64 threads") {
  const std::size_t saved = num_threads();
  std::vector<float> x(100003);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i)) * 1e3f;
  set_num_threads(1);
  const auto reference = chunks_seen(1000, 64);
  const float reference_sum = chunked_sum(x, 4096);
  REQUIRE(reference.size() == 16);
  CHECK(reference.front() == std::make_pair(std::size_t{0}, std::size_t{64}));
  CHECK(reference.back() == std::make_pair(std::size_t{960}, std::size_t{1000}));
  for (std::size_t t : {2, 7, 64}) {
    set_num_threads(t);
    CHECK(num_threads() == t);
    CHECK(chunks_seen(1000, 64) == reference);
    CHECK(chunked_sum(x, 4096) == reference_sum);  // bitwise: same partition, same order
  }
  set_num_threads(saved);
}

TEST_CASE("parallel_for covers every index once, including n = 0 and grain > n") {
  std::vector<int> hits(5000, 0);
  parallel_for(hits.size(), 97, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) ++hits[i];
  });
  CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
  int calls = 0;
  parallel_for(0, 8, [&](std::size_t, std::size_t) { ++calls; });
  CHECK(calls == 0);
  parallel_for(3, 8, [&](std::size_t b, std::size_t e) { calls += static_cast<int>(e - b); });
  CHECK(calls == 3);
  CHECK_THROWS_WITH_AS(parallel_for(10, 0, [](std::size_t, std::size_t) {}),
                       "parallel_for: grain must be positive, got 0", Error);
}

TEST_CASE("parallel_for rethrows the exception of the lowest failing chunk") {
  const std::size_t saved = num_threads();
  set_num_threads(4);
  for (int round = 0; round < 20; ++round) {
    try {
      parallel_for(64, 1, [&](std::size_t b, std::size_t) {
        if (b == 5 || b == 6) throw std::runtime_error("chunk " + std::to_string(b));
      });
      FAIL("no exception");
    } catch (const std::runtime_error& e) {
      // Chunk 6 may run first, but chunk 5 is always claimed (in order) before 6 is, so
      // its error is recorded too and wins as the lower chunk.
      CHECK(std::string(e.what()) == "chunk 5");
    }
  }
  set_num_threads(saved);
}

TEST_CASE("a parallel_for nested inside another runs serially and completes") {
  std::vector<int> hits(64 * 32, 0);
  parallel_for(64, 1, [&](std::size_t b, std::size_t) {
    parallel_for(32, 4, [&](std::size_t ib, std::size_t ie) {
      for (std::size_t i = ib; i < ie; ++i) ++hits[b * 32 + i];
    });
  });
  CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
}

TEST_CASE("set_num_threads from inside a chunk is an error, not a deadlock") {
  CHECK_THROWS_WITH_AS(parallel_for(4, 1, [](std::size_t, std::size_t) { set_num_threads(1); }),
                       "set_num_threads: called from inside a parallel_for chunk", Error);
}

TEST_CASE("ScopedNumThreads sets the count for a scope and restores it, also on a throw") {
  edgefuse::set_num_threads(2);
  {
    const edgefuse::ScopedNumThreads s(3);
    CHECK(edgefuse::num_threads() == 3);
  }
  CHECK(edgefuse::num_threads() == 2);
  {
    const edgefuse::ScopedNumThreads keep(0);  // 0 keeps the caller's count
    CHECK(edgefuse::num_threads() == 2);
  }
  try {
    const edgefuse::ScopedNumThreads s(1);
    CHECK(edgefuse::num_threads() == 1);
    throw std::runtime_error("x");
  } catch (const std::runtime_error&) {
  }
  CHECK(edgefuse::num_threads() == 2);
  edgefuse::set_num_threads(0);
}
