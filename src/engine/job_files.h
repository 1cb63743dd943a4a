// Private: what the engine's job parser and the engine share: the size cap of the small
// files they read, and which schema names are presets.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace edgefuse::detail {

inline constexpr std::uint64_t kMaxJobBytes = 64u << 20;

inline bool is_preset_schema(const std::string& schema) {
  return schema == "llama" || schema == "gpt2" || schema == "mlp";
}

}  // namespace edgefuse::detail
