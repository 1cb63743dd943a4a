// Private: the leading decimal number of a string, without exceptions.
#pragma once

#include <charconv>
#include <cstddef>
#include <string>
#include <system_error>

namespace edgefuse::detail {

// Parses the longest leading decimal number of `text` ("12", "-1.5", "2e9": no hexadecimal,
// no leading blanks or '+') into *value; returns the characters used (0 when there is no
// number, or it overflows a double).
inline std::size_t parse_double_prefix(const std::string& text, double* value) {
  const char* end = text.data() + text.size();
  const auto r = std::from_chars(text.data(), end, *value, std::chars_format::general);
  if (r.ec != std::errc()) return 0;
  return static_cast<std::size_t>(r.ptr - text.data());
}

}  // namespace edgefuse::detail
