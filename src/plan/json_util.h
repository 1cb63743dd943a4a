// Private JSON helpers of the plan layer (schemas, plans, model configs, jobs).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "edgefuse/core/error.h"
#include "edgefuse/io/safetensors.h"
#include "src/io/io_util.h"

namespace edgefuse::detail {

// Strict parse (UTF-8, duplicate keys, depth); errors read "<label>: <what is wrong>".
inline nlohmann::json parse_config_json(std::string_view text, const std::string& label) {
  try {
    return parse_json_strict(text, label, CheckpointRule::kInvalidArgument);
  } catch (const CheckpointError& e) {
    std::string what = e.what();
    const std::string suffix = " (InvalidArgument)";
    if (what.size() > suffix.size() && what.compare(what.size() - suffix.size(), suffix.size(),
                                                    suffix) == 0) {
      what.resize(what.size() - suffix.size());
    }
    throw Error(what);
  }
}

// A JSON integer in [lo, hi]; anything else (floats, strings, negative) is an error.
inline std::uint64_t json_uint(const nlohmann::json& v, const std::string& where,
                               std::uint64_t lo = 0,
                               std::uint64_t hi = UINT64_MAX) {
  if (!v.is_number_integer() || (v.is_number_integer() && !v.is_number_unsigned() &&
                                 v.get<std::int64_t>() < 0)) {
    fail(where, ": expected a non-negative integer, got ", v.dump());
  }
  const auto x = v.get<std::uint64_t>();
  if (x < lo || x > hi) fail(where, ": ", x, " is outside [", lo, ", ", hi, "]");
  return x;
}

}  // namespace edgefuse::detail
