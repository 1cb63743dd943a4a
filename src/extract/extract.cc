// Sub-model extraction (extract/extract.h).
#include "edgefuse/extract/extract.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>

#include "edgefuse/core/error.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/kernels/convert.h"
#include "src/extract/client_views.h"
#include "src/extract/gather.h"
#include "src/plan/slicing.h"

namespace edgefuse {

using detail::fail;

NamedViews views_of(const Checkpoint& checkpoint) {
  NamedViews out;
  out.reserve(checkpoint.size());
  for (const auto& e : checkpoint.tensors()) {
    out.push_back({e.info->name, checkpoint.view(e.info->name)});
  }
  return out;
}

NamedViews views_of(const std::vector<NamedTensor>& tensors) {
  NamedViews out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back({t.name, t.tensor.view()});
  return out;
}

namespace detail {

void convert_elements(DType from, const void* src, DType to, void* dst, std::size_t n) {
  if (from == to) {
    std::memcpy(dst, src, static_cast<std::size_t>(dtype_bytes(from, n)));
    return;
  }
  const bool ok = is_aggregatable(from) && is_aggregatable(to);
  if (!ok) fail("cannot convert ", dtype_name(from), " to ", dtype_name(to));
  if (from == DType::kF32) {
    if (to == DType::kBF16)
      convert(static_cast<const float*>(src), static_cast<BFloat16*>(dst), n);
    else
      convert(static_cast<const float*>(src), static_cast<Float16*>(dst), n);
    return;
  }
  if (to == DType::kF32) {
    if (from == DType::kBF16)
      convert(static_cast<const BFloat16*>(src), static_cast<float*>(dst), n);
    else
      convert(static_cast<const Float16*>(src), static_cast<float*>(dst), n);
    return;
  }
  // bf16 <-> f16 through f32, in blocks (widening is exact, so one rounding).
  constexpr std::size_t kBlock = 4096;
  float tmp[kBlock];
  const std::size_t esize = 2;
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t len = std::min(kBlock, n - b);
    const auto* s = static_cast<const std::byte*>(src) + b * esize;
    auto* d = static_cast<std::byte*>(dst) + b * esize;
    convert_elements(from, s, DType::kF32, tmp, len);
    convert_elements(DType::kF32, tmp, to, d, len);
  }
}

const ConstTensorView& find_target(
    const std::map<std::string_view, const ConstTensorView*>& by_name,
    const ModelLayout::Tensor& t) {
  auto it = by_name.find(t.meta.name);
  if (it == by_name.end()) fail("target: tensor '", t.meta.name, "' of the layout is missing");
  const ConstTensorView& v = *it->second;
  if (v.shape() != t.meta.shape || v.dtype() != t.meta.dtype) {
    fail("target: tensor '", t.meta.name, "' is ", dtype_name(v.dtype()), " ",
         v.shape().to_string(), " but the layout was bound to ", dtype_name(t.meta.dtype), " ",
         t.meta.shape.to_string());
  }
  return v;
}

std::map<std::string_view, const ConstTensorView*> index_views(const NamedViews& views) {
  std::map<std::string_view, const ConstTensorView*> m;
  for (const auto& v : views) m.emplace(v.name, &v.view);
  return m;
}

Gather::Gather(const Slice& slice, const ConstTensorView& src) : src_(src) {
  const int rank = src.shape().rank();
  esize_ = static_cast<std::size_t>(dtype_bytes(src.dtype(), 1));
  if (rank == 0) {
    rows_ = 1;
    row_len_ = 1;
    runs_.push_back({0, 0, 1});
    return;
  }
  // Strides of the target, in elements.
  std::vector<std::uint64_t> stride(static_cast<std::size_t>(rank), 1);
  for (int d = rank - 2; d >= 0; --d) stride[d] = stride[d + 1] * src.shape()[d + 1];
  const auto& last = slice.elems.back();
  row_len_ = last.size();
  for (std::size_t i = 0; i < last.size();) {
    std::size_t j = i + 1;
    while (j < last.size() && last[j] == last[j - 1] + 1) ++j;
    runs_.push_back({i, last[i], j - i});
    i = j;
  }
  // Row offsets of the outer dimensions (odometer over dims 0..rank-2).
  rows_ = 1;
  for (int d = 0; d + 1 < rank; ++d) rows_ *= slice.elems[d].size();
  row_offset_.resize(rows_);
  std::vector<std::size_t> at(static_cast<std::size_t>(rank > 1 ? rank - 1 : 0), 0);
  for (std::uint64_t r = 0; r < rows_; ++r) {
    std::uint64_t off = 0;
    for (int d = 0; d + 1 < rank; ++d) off += slice.elems[d][at[d]] * stride[d];
    row_offset_[r] = off;
    for (int d = rank - 2; d >= 0; --d) {
      if (++at[d] < slice.elems[d].size()) break;
      at[d] = 0;
    }
  }
  if (rank == 1) row_offset_.assign(1, 0);
}

void Gather::rows(std::uint64_t r0, std::uint64_t r1, std::byte* dst) const {
  const std::byte* base = src_.bytes();
  for (std::uint64_t r = r0; r < r1; ++r) {
    const std::byte* row = base + row_offset_[r] * esize_;
    std::byte* out = dst + (r - r0) * row_len_ * esize_;
    for (const auto& run : runs_) {
      std::memcpy(out + run.local * esize_, row + run.target * esize_, run.len * esize_);
    }
  }
}

}  // namespace detail

std::vector<ClientTensor> client_tensors(const ModelLayout& layout, const Plan& plan,
                                         std::optional<DType> dtype) {
  return detail::client_tensors(layout, detail::PlanLists(layout, plan), dtype);
}

std::vector<ClientTensor> detail::client_tensors(const ModelLayout& layout, const PlanLists& lists,
                                                 std::optional<DType> dtype) {
  std::vector<ClientTensor> out;
  for (std::size_t i = 0; i < layout.tensors().size(); ++i) {
    const auto& t = layout.tensors()[i];
    auto s = detail::slice_shape_of(layout, t, lists);
    if (!s.included) continue;
    const DType d = dtype && detail::is_aggregatable(t.meta.dtype) ? *dtype : t.meta.dtype;
    out.push_back({std::move(s.local_name), t.meta.name, i, d, s.local_shape});
  }
  return out;
}

namespace {

void check_out_dtype(std::optional<DType> dtype) {
  if (dtype && !detail::is_aggregatable(*dtype)) {
    fail("extract: output dtype ", dtype_name(*dtype), " is not F32, BF16 or F16");
  }
}

}  // namespace

std::vector<NamedTensor> extract(const NamedViews& target, const ModelLayout& layout,
                                 const Plan& plan, std::optional<DType> dtype) {
  check_out_dtype(dtype);
  validate_plan(plan, layout, "extract: plan");
  const auto by_name = detail::index_views(target);
  const detail::PlanLists lists(layout, plan);
  std::vector<NamedTensor> out;
  for (const auto& t : layout.tensors()) {
    const auto s = detail::slice_of(layout, t, lists, false);
    if (!s.included) continue;
    const ConstTensorView& src = detail::find_target(by_name, t);
    const DType to = dtype && detail::is_aggregatable(t.meta.dtype) ? *dtype : t.meta.dtype;
    Tensor dst = Tensor::empty(to, s.local_shape);
    const detail::Gather g(s, src);
    if (to == src.dtype()) {
      g.rows(0, g.num_rows(), dst.view().bytes());
    } else {
      std::vector<std::byte> row(g.row_bytes());
      const std::size_t out_row = static_cast<std::size_t>(dtype_bytes(to, g.row_len()));
      for (std::uint64_t r = 0; r < g.num_rows(); ++r) {
        g.rows(r, r + 1, row.data());
        detail::convert_elements(src.dtype(), row.data(), to, dst.view().bytes() + r * out_row,
                                 g.row_len());
      }
    }
    out.push_back({s.local_name, std::move(dst)});
  }
  return out;
}

void extract_to(CheckpointWriter& writer, const NamedViews& target, const ModelLayout& layout,
                const Plan& plan, std::optional<DType> dtype) {
  check_out_dtype(dtype);
  validate_plan(plan, layout, "extract: plan");
  const auto by_name = detail::index_views(target);
  const detail::PlanLists lists(layout, plan);
  for (const auto& t : layout.tensors()) {
    auto s = detail::slice_of(layout, t, lists, false);
    if (!s.included) continue;
    const ConstTensorView& src = detail::find_target(by_name, t);
    const DType to = dtype && detail::is_aggregatable(t.meta.dtype) ? *dtype : t.meta.dtype;
    auto g = std::make_shared<detail::Gather>(s, src);
    const std::size_t out_row = static_cast<std::size_t>(dtype_bytes(to, g->row_len()));
    // Pieces need not start on row boundaries: whole rows are gathered (and converted) into
    // a scratch row and the requested bytes copied out.
    auto produce = [g, to, out_row, scratch = std::make_shared<std::vector<std::byte>>(),
                    conv = std::make_shared<std::vector<std::byte>>()](
                       std::uint64_t offset, std::byte* dst, std::size_t len) {
      if (out_row == 0) return;
      scratch->resize(g->row_bytes());
      conv->resize(out_row);
      std::uint64_t pos = offset;
      const std::uint64_t end = offset + len;
      while (pos < end) {
        const std::uint64_t r = pos / out_row, in_row = pos % out_row;
        const std::uint64_t take = std::min<std::uint64_t>(out_row - in_row, end - pos);
        g->rows(r, r + 1, scratch->data());
        const std::byte* row = scratch->data();
        if (to != g->dtype()) {
          detail::convert_elements(g->dtype(), scratch->data(), to, conv->data(), g->row_len());
          row = conv->data();
        }
        std::memcpy(dst + (pos - offset), row + in_row, take);
        pos += take;
      }
    };
    writer.add(s.local_name, to, s.local_shape, std::move(produce));
  }
}

}  // namespace edgefuse
