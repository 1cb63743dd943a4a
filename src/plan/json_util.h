// Private JSON helpers of the plan layer (schemas, plans, model configs, jobs).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "edgefuse/core/error.h"
#include "edgefuse/io/safetensors.h"
#include "src/io/io_util.h"

namespace edgefuse::detail {

// A ConfigError for `file` (shown escaped and shortened, as io errors show files).
inline ConfigError config_error(const std::string& file, const std::string& detail) {
  return ConfigError(printable(file, 400) + ": " + detail, file, detail);
}

// Strict parse (UTF-8, duplicate keys, depth); a ConfigError reads "<label>: <what is wrong>".
inline nlohmann::json parse_config_json(std::string_view text, const std::string& label) {
  try {
    return parse_json_strict(text, label, CheckpointRule::kInvalidArgument);
  } catch (const CheckpointError& e) {
    throw config_error(e.file(), e.detail());
  }
}

// A job, plan, schema or model config file's text. A file above max_bytes is a ConfigError;
// one that cannot be read is the io layer's CheckpointError (Io).
inline std::string read_config_file(const std::filesystem::path& path, std::uint64_t max_bytes) {
  try {
    return read_small_file(path, max_bytes, CheckpointRule::kInvalidArgument);
  } catch (const CheckpointError& e) {
    if (e.rule() != CheckpointRule::kInvalidArgument) throw;
    throw config_error(e.file(), e.detail());
  }
}

// A JSON integer in [lo, hi]; anything else (floats, strings, negative) is an error.
inline std::uint64_t json_uint(const nlohmann::json& v, const std::string& where,
                               std::uint64_t lo = 0, std::uint64_t hi = UINT64_MAX) {
  if (!v.is_number_integer() ||
      (v.is_number_integer() && !v.is_number_unsigned() && v.get<std::int64_t>() < 0)) {
    fail(where, ": expected a non-negative integer, got ", v.dump());
  }
  const auto x = v.get<std::uint64_t>();
  if (x < lo || x > hi) fail(where, ": ", x, " is outside [", lo, ", ", hi, "]");
  return x;
}

}  // namespace edgefuse::detail
