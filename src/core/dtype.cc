// Names, widths and byte sizes of the safetensors dtypes.
#include "edgefuse/core/dtype.h"

#include <array>

#include "edgefuse/core/error.h"

namespace edgefuse {
namespace {

struct DTypeInfo {
  std::string_view name;
  int bits;
};

// Indexed by DType; names and widths as in safetensors/src/tensor.rs.
constexpr std::array<DTypeInfo, kNumDTypes> kDTypeInfo = {{
    {"BOOL", 8},        {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
    {"I8", 8},          {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
    {"F8_E5M2FNUZ", 8}, {"I16", 16},    {"U16", 16},    {"F16", 16},    {"BF16", 16},
    {"I32", 32},        {"U32", 32},    {"F32", 32},    {"C64", 64},    {"F64", 64},
    {"I64", 64},        {"U64", 64},
}};

}  // namespace

std::string_view dtype_name(DType dtype) noexcept {
  return kDTypeInfo[static_cast<std::size_t>(dtype)].name;
}

std::optional<DType> dtype_from_name(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kDTypeInfo.size(); ++i) {
    if (kDTypeInfo[i].name == name) return static_cast<DType>(i);
  }
  return std::nullopt;
}

int dtype_bits(DType dtype) noexcept { return kDTypeInfo[static_cast<std::size_t>(dtype)].bits; }

std::uint64_t dtype_bytes(DType dtype, std::uint64_t count) {
  const std::uint64_t bits = static_cast<std::uint64_t>(dtype_bits(dtype));
  std::uint64_t total_bits = 0;
  if (__builtin_mul_overflow(count, bits, &total_bits)) {
    detail::fail("dtype_bytes: ", count, " elements of ", dtype_name(dtype),
                 " overflow 64 bits of size");
  }
  if (total_bits % 8 != 0) {
    detail::fail("dtype_bytes: ", count, " elements of ", dtype_name(dtype), " take ", total_bits,
                 " bits, not a whole number of bytes");
  }
  return total_bits / 8;
}

}  // namespace edgefuse
