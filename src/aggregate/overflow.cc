// Overflowed elements computed again (src/aggregate/overflow.h).
#include "src/aggregate/overflow.h"

#include <cmath>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"

namespace edgefuse::detail {
namespace {

// An element of a tensor of `dtype` (F32, BF16 or F16) at p[e]: whether it is finite, its
// value, and storing a double rounded to it when the result is finite there.
bool stored_fits(DType dtype, const std::byte* p, std::size_t e) {
  if (dtype == DType::kF32) return std::isfinite(reinterpret_cast<const float*>(p)[e]);
  const std::uint16_t bits = reinterpret_cast<const std::uint16_t*>(p)[e];
  return dtype == DType::kBF16 ? (bits & 0x7F80u) != 0x7F80u : (bits & 0x7C00u) != 0x7C00u;
}

double stored_as_double(DType dtype, const std::byte* p, std::size_t e) {
  if (dtype == DType::kF32) return reinterpret_cast<const float*>(p)[e];
  if (dtype == DType::kBF16) return to_f32(reinterpret_cast<const BFloat16*>(p)[e]);
  return to_f32(reinterpret_cast<const Float16*>(p)[e]);
}

bool store_if_fits(DType dtype, std::byte* p, std::size_t e, double value) {
  const float f = static_cast<float>(value);
  if (!std::isfinite(f)) return false;
  if (dtype == DType::kF32) {
    reinterpret_cast<float*>(p)[e] = f;
    return true;
  }
  if (dtype == DType::kBF16) {
    const BFloat16 h = to_bf16(f);
    if ((h.bits & 0x7F80u) == 0x7F80u) return false;
    reinterpret_cast<BFloat16*>(p)[e] = h;
    return true;
  }
  const Float16 h = to_f16(f);
  if ((h.bits & 0x7C00u) == 0x7C00u) return false;
  reinterpret_cast<Float16*>(p)[e] = h;
  return true;
}

}  // namespace

std::string element_text(const Shape& shape, std::uint64_t flat) {
  std::vector<std::uint64_t> idx(static_cast<std::size_t>(shape.rank()), 0);
  for (std::size_t d = idx.size(); d-- > 0;) {
    const std::uint64_t n = shape[static_cast<int>(d)];
    idx[d] = n ? flat % n : 0;
    flat = n ? flat / n : 0;
  }
  std::string out = "[";
  for (std::size_t d = 0; d < idx.size(); ++d) out += (d ? ", " : "") + std::to_string(idx[d]);
  return out + "]";
}

float overflow_scale(double total_weight) {
  int k = 0;
  while (total_weight > 1.0 && k < 126) {
    total_weight /= 2.0;
    ++k;
  }
  return std::ldexp(1.0f, -k);
}

void refinalize_overflowed(const OverflowContext& ctx, std::byte* out, const std::byte* base,
                           const float* acc, const float* wsum, std::size_t off, std::size_t len,
                           std::uint64_t tile_start) {
  const TensorMeta& t = *ctx.tensor;
  const bool delta = ctx.mode == AggregateMode::kDelta;
  for (std::size_t e = off; e < off + len; ++e) {
    if (!(wsum[e] > 0.0f) || stored_fits(t.dtype, out, e)) continue;
    const double b = stored_as_double(t.dtype, base, e);
    const double mean = static_cast<double>(acc[e]) / static_cast<double>(wsum[e]);
    const double inc = delta ? static_cast<double>(ctx.server_lr) * mean : 0.0;
    const double r = !delta ? mean : inc == 0.0 ? b : b + inc;
    if (store_if_fits(t.dtype, out, e, r)) continue;
    if (ctx.clients_pending) {
      ctx.saw_nonfinite->store(true, std::memory_order_relaxed);
      continue;
    }
    const std::string where = concat("aggregate: tensor '", t.name, "' element ",
                                     element_text(t.shape, tile_start + e), ": ");
    if (!std::isfinite(mean)) {
      fail(where,
           "the weighted sum of its clients' values is not finite in F32 even with "
           "the weights scaled down (a client's value, or a LoRA product B.A, "
           "overflows F32)");
    }
    fail(where, "the fused value ", r, " is not representable in ", dtype_name(t.dtype),
         delta ? concat(" (the target's ", b, " + server_lr ", ctx.server_lr,
                        " x the weighted mean delta ", mean, ")")
               : std::string(" (the weighted mean of its clients' values)"));
  }
}

}  // namespace edgefuse::detail
