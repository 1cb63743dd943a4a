// factored_svd_body.h compiled for AVX-512 (F, VL, DQ, BW) + FMA; Eigen is renamed
// edgefuse_eigen_avx512 for this file by CMake (-DEigen=edgefuse_eigen_avx512), see
// factored_svd.h.
#define EDGEFUSE_SVD_NS avx512
#define EDGEFUSE_SVD_FN factored_svd_avx512
#include "src/lora/factored_svd_body.h"
