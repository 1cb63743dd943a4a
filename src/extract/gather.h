// Private: gathering the rows of a sliced tensor, and dtype conversion of element buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "edgefuse/extract/extract.h"
#include "src/plan/slicing.h"

namespace edgefuse::detail {

// The local tensor as rows of its last dimension: row r is target row row_offset_[r] read
// through runs of consecutive target indices.
class Gather {
 public:
  Gather(const Slice& slice, const ConstTensorView& src);
  std::uint64_t num_rows() const noexcept { return rows_; }
  std::uint64_t row_len() const noexcept { return row_len_; }
  std::size_t row_bytes() const noexcept { return static_cast<std::size_t>(row_len_ * esize_); }
  DType dtype() const noexcept { return src_.dtype(); }
  // Local rows [r0, r1) in the source dtype into dst.
  void rows(std::uint64_t r0, std::uint64_t r1, std::byte* dst) const;

 private:
  struct RowRun {
    std::uint64_t local, target, len;
  };
  ConstTensorView src_;
  std::size_t esize_ = 1;
  std::uint64_t rows_ = 0, row_len_ = 0;
  std::vector<std::uint64_t> row_offset_;
  std::vector<RowRun> runs_;
};

// dst = src converted (F32/BF16/F16, rounding to nearest even), or copied when equal.
void convert_elements(DType from, const void* src, DType to, void* dst, std::size_t n);

}  // namespace edgefuse::detail
