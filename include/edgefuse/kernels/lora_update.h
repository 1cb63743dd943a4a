// edgefuse/kernels/lora_update.h — the LoRA merge kernel: W += s·L·R for a low-rank pair.
//
// LoRA (Hu et al. 2021, arXiv 2106.09685) adds ΔW = s·B·A to a frozen weight W, with B of
// shape (out, r) and A of shape (r, in); PEFT's merge computes (B@A)*s densely in fp32 and
// adds it (huggingface/peft tuners/lora/layer.py). This kernel never forms B·A:
// it walks W in strips of columns, keeps the strip's rank-r slice of R in L1 and each output
// element's dot product in registers, and rounds once into W. The caller chooses L and R:
//   W (out, in),  nn.Linear:              L = B (out×r),  R = A (r×in)
//   W (in, out),  fan_in_fan_out/embeddings: L = Aᵀ (in×r), R = Bᵀ (r×out)
//
//   edgefuse::lora_update(w, in, b, a, out, in, r, alpha / r);   // merge
//   edgefuse::lora_update(w, in, b, a, out, in, r, -alpha / r);  // unmerge
#pragma once

#include <cstddef>

#include "edgefuse/core/dtype.h"

namespace edgefuse {

// For i < rows, j < cols: with acc = -0 and then acc = acc + l[i·rank + k]·rt[k·cols + j]
// for k = 0 … rank-1 (fp32 multiply, then fp32 add: no FMA, so every SIMD target and the
// scalar loop give the same bits), d = acc·scale and
//   w[i·ldw + j] = (d == 0) ? w[i·ldw + j] : round(w[i·ldw + j] + d)
// with one round-to-nearest-even into W's type (a zero update keeps W's bits, −0 included).
// Unmerge is scale → −scale: w − d and w + (−d) are the same IEEE operation, so merge then
// unmerge restores an f32 W exactly whenever w + d is exact, and is otherwise within one
// rounding. Rows are processed in parallel (parallel.h); the result does not depend on the
// thread count. Requires ldw >= cols, non-null pointers for non-empty sizes, `w` disjoint from
// `l` and `rt`, finite `scale`; throws edgefuse::Error otherwise. Does not allocate.
void lora_update(float* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                 std::size_t cols, std::size_t rank, float scale);
void lora_update(BFloat16* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                 std::size_t cols, std::size_t rank, float scale);
void lora_update(Float16* w, std::size_t ldw, const float* l, const float* rt, std::size_t rows,
                 std::size_t cols, std::size_t rank, float scale);

}  // namespace edgefuse
