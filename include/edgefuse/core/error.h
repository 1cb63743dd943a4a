// edgefuse/core/error.h — the one exception type of the library, and internal assertions.
//
// API misuse and bad data (sizes, dtypes, files, client updates) throw edgefuse::Error, whose
// message names the function, the argument or tensor and the values seen. Internal invariants
// use EDGEFUSE_DASSERT, which is compiled out unless EDGEFUSE_ENABLE_DASSERT is defined (the
// build defines it for the library in Debug and sanitizer builds): the unchecked kernels of
// the aggregator's tile loop assert their public twins' contracts there. The library never
// aborts on user error. The pattern follows {fmt}'s format_error: a
// std::runtime_error subclass, so LibTorch and plain C++ callers catch it the usual way.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace edgefuse {

// Thrown for every invalid argument or input. what() is a complete sentence-like message,
// e.g. "accumulate_runs: runs[2] = (dst_start 90, length 20) ends at 110 > acc_len 100".
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A job, plan, schema or model config file that breaks a rule of its format. what() reads
// "<file>: <detail>"; file() and detail() give the two parts.
class ConfigError : public Error {
 public:
  ConfigError(const std::string& what, std::string file, std::string detail)
      : Error(what), file_(std::move(file)), detail_(std::move(detail)) {}
  const std::string& file() const noexcept { return file_; }
  const std::string& detail() const noexcept { return detail_; }

 private:
  std::string file_;
  std::string detail_;
};

namespace detail {

// The arguments concatenated with operator<<, as fail() words them.
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// Concatenates the arguments with operator<< and throws Error. Used as
// `detail::fail("accumulate: n = ", n, " but x is null")`.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(concat(args...));
}

// For EDGEFUSE_DASSERT(holds([&] { check_args(...); })): whether `check` returns without
// throwing Error; when it throws, its message goes to stderr before the assertion aborts.
template <typename Check>
bool holds(Check&& check) {
  try {
    check();
    return true;
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return false;
  }
}

[[noreturn]] inline void dassert_failed(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "edgefuse internal assertion failed: %s at %s:%d\n", expr, file, line);
  std::abort();
}

}  // namespace detail
}  // namespace edgefuse

#if defined(EDGEFUSE_ENABLE_DASSERT)
#define EDGEFUSE_DASSERT(expr) \
  ((expr) ? (void)0 : ::edgefuse::detail::dassert_failed(#expr, __FILE__, __LINE__))
#else
#define EDGEFUSE_DASSERT(expr) ((void)0)
#endif
