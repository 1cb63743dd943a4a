// Private helpers of the LoRA operators (src/lora/*.cc): f32 copies of factors and small
// dense matrices in Eigen, used for combination and federated rules (never for merging).
#pragma once

#include <Eigen/Dense>

#include <cstdint>
#include <string>
#include <string_view>

#include "edgefuse/core/tensor.h"
#include "edgefuse/lora/adapter.h"

namespace edgefuse::detail {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// F32 row-major tensor <-> double matrix.
MatD to_mat(const Tensor& t);
Tensor to_tensor(const MatD& m);  // rounds each entry to f32 once

// Index of the first non-finite f32 element, or -1.
std::int64_t first_nonfinite_f32(const float* p, std::size_t n);

}  // namespace edgefuse::detail
