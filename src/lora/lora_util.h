// Private helpers of the LoRA operators (src/lora/*.cc): f32 copies of factors and small
// dense matrices in Eigen, used for combination and federated rules (never for merging).
#pragma once

#include <Eigen/Dense>

#include "edgefuse/core/tensor.h"

namespace edgefuse::detail {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// F32 row-major tensor <-> double matrix.
MatD to_mat(const Tensor& t);
Tensor to_tensor(const MatD& m);  // rounds each entry to f32 once

}  // namespace edgefuse::detail
