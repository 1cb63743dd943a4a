// factored_svd_body.h compiled for AVX2 + FMA; Eigen is renamed edgefuse_eigen_avx2 for this
// file by CMake (-DEigen=edgefuse_eigen_avx2), see factored_svd.h.
#define EDGEFUSE_SVD_NS avx2
#define EDGEFUSE_SVD_FN factored_svd_avx2
#include "src/lora/factored_svd_body.h"
