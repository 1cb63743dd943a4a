// Test helper: the message of the exception a call throws, to compare with the exact text.
#pragma once

#include <exception>
#include <functional>
#include <string>

namespace edgefuse_test {

// what() of the std::exception fn throws, or "(no error)".
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace edgefuse_test
