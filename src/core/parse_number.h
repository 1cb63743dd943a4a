// Private: the leading decimal number of a string, without exceptions (std::stod throws on
// garbage and on overflow).
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace edgefuse::detail {

// Parses the longest leading number of `text` into *value; returns the characters used (0 when
// there is no number, or it overflows a double).
inline std::size_t parse_double_prefix(const std::string& text, double* value) {
  std::size_t used = 0;
  try {
    *value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  return used;
}

}  // namespace edgefuse::detail
