// Private: what the engine's job parser and the engine share: the size cap of the small
// files they read.
#pragma once

#include <cstdint>

namespace edgefuse::detail {

inline constexpr std::uint64_t kMaxJobBytes = 64u << 20;

}  // namespace edgefuse::detail
