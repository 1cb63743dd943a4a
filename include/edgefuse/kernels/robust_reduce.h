// edgefuse/kernels/robust_reduce.h — coordinate-wise robust aggregates over the clients that
// cover each element: the median and the trimmed mean (Yin et al., "Byzantine-Robust
// Distributed Learning", ICML 2018; Flower's FedMedian and FedTrimmedAvg).
//
// For element i the values are values[j * stride + i] for clients j < k; a NaN marks a client
// that does not cover the element (present values must be finite), so c, the number present,
// may differ from element to element. The present values are sorted in the total order of
// IEEE-754 bit patterns (-0 before +0), then
//   kMedian       out = s[(c-1)/2] for odd c, 0.5*s[c/2-1] + 0.5*s[c/2] for even c
//                 (halved before adding, so two large values cannot overflow)
//   kTrimmedMean  t = floor(beta*c) values dropped from each end, out = (s[t] + ... + s[c-t-1])
//                 / (c - 2t), summed in f32 in sorted order (scipy's trim_mean, which
//                 Flower's FedTrimmedAvg calls)
// and count[i] = c; out[i] = 0 where c = 0. Bitwise identical on every SIMD target and thread
// count (the sort is a data-oblivious network on integer keys; k > 64 sorts each element
// with the same order in scalar code).
#pragma once

#include <cstddef>
#include <cstdint>

namespace edgefuse {

enum class RobustRule : std::uint8_t { kMedian, kTrimmedMean };

// Throws Error (writing nothing) for k = 0, stride < n, beta outside [0, 0.5) (kTrimmedMean),
// a null pointer while n > 0, or out or count overlapping values or each other.
void robust_reduce(const float* values, std::size_t k, std::size_t stride, std::size_t n,
                   RobustRule rule, double beta, float* out, std::uint32_t* count);

// The weighted median: per element, its c present values (same layout and NaN rule as
// robust_reduce) sorted as there, client j's with weight weights[j] (finite, > 0); with W the
// present weights' sum and S_i the sum of the first i + 1 (in f64, sorted order), the first
// value with S_i >= W / 2, or 0.5·s_i + 0.5·s_(i+1) when S_i = W / 2 exactly and a next value
// exists. Equal weights give robust_reduce's median bit for bit. count[i] = c, out[i] = 0 where
// c = 0. Scalar, element by element. Throws Error as robust_reduce does, and for a weight that
// is not finite and > 0.
void weighted_median(const float* values, const float* weights, std::size_t k, std::size_t stride,
                     std::size_t n, float* out, std::uint32_t* count);

// Bulyan's coordinate-wise step (El Mhamdi et al., ICML 2018; Flower's Bulyan): per element, of
// its c present values (same layout and NaN rule as robust_reduce) the w = max(1, c - 2f)
// closest to their median (the median as kMedian computes it; a tie in distance goes to the
// lower value), averaged: summed in f32 in sorted order and divided by w. count[i] = c, out[i] =
// 0 where c = 0. Scalar, element by element; the same bits for any thread count. Throws Error
// as robust_reduce does.
void closest_to_median_mean(const float* values, std::size_t k, std::size_t stride, std::size_t n,
                            std::size_t f, float* out, std::uint32_t* count);

}  // namespace edgefuse
