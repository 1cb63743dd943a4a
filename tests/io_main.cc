// The doctest main of the io test binary, plus a global operator new that records the largest
// single allocation while a probe is active: the parser tests use it to show that no
// allocation is sized by an attacker's header length. Sanitizer builds keep their own
// allocator, and the probe then reports 0 (the same tests run unprobed there).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <functional>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#define EDGEFUSE_NO_NEW_PROBE 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EDGEFUSE_NO_NEW_PROBE 1
#endif
#endif

namespace {
std::atomic<bool> g_probe{false};
std::atomic<std::size_t> g_largest{0};
}  // namespace

namespace edgefuse::test {
std::size_t largest_allocation_during(const std::function<void()>& fn) {
  g_largest = 0;
  g_probe = true;
  try {
    fn();
  } catch (...) {
    g_probe = false;
    throw;
  }
  g_probe = false;
  return g_largest;
}
}  // namespace edgefuse::test

#if !defined(EDGEFUSE_NO_NEW_PROBE)
// GCC cannot see that new and delete below are a matched malloc/free pair.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t n) {
  if (g_probe.load(std::memory_order_relaxed)) {
    std::size_t cur = g_largest.load(std::memory_order_relaxed);
    while (n > cur && !g_largest.compare_exchange_weak(cur, n)) {
    }
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#endif
