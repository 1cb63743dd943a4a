// LoRA adapters in memory and merging them into base weights (lora/adapter.h).
#include "edgefuse/lora/adapter.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <set>
#include <string>

#include "edgefuse/core/error.h"
#include "edgefuse/kernels/convert.h"
#include "edgefuse/kernels/lora_update.h"
#include "src/lora/operands.h"
#include "src/core/finite.h"
#include "src/lora/lora_util.h"

namespace edgefuse {

using detail::fail;

namespace detail {

MatD to_mat(const Tensor& t) {
  const auto& s = t.shape();
  MatD m(static_cast<Eigen::Index>(s[0]), static_cast<Eigen::Index>(s[1]));
  const float* p = t.view().data_as<float>();
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = p[i];
  return m;
}

Tensor to_tensor(const MatD& m) {
  Tensor t = Tensor::empty(DType::kF32, Shape{static_cast<std::uint64_t>(m.rows()),
                                              static_cast<std::uint64_t>(m.cols())});
  float* p = t.view().data_as<float>();
  for (Eigen::Index i = 0; i < m.size(); ++i) p[i] = static_cast<float>(m.data()[i]);
  return t;
}

}  // namespace detail

namespace {

// Any float view -> a fresh F32 tensor of the same shape.
Tensor widen(ConstTensorView v) {
  Tensor t = Tensor::empty(DType::kF32, v.shape());
  float* dst = t.view().data_as<float>();
  const auto n = static_cast<std::size_t>(v.numel());
  switch (v.dtype()) {
    case DType::kF32:
      std::memcpy(dst, v.bytes(), n * sizeof(float));
      break;
    case DType::kBF16:
      convert(reinterpret_cast<const BFloat16*>(v.bytes()), dst, n);
      break;
    case DType::kF16:
      convert(reinterpret_cast<const Float16*>(v.bytes()), dst, n);
      break;
    default:
      fail("LoRA factors must be F32, BF16 or F16, found ", dtype_name(v.dtype()));
  }
  return t;
}

Tensor transpose(const Tensor& t) {
  const auto rows = t.shape()[0], cols = t.shape()[1];
  Tensor out = Tensor::empty(DType::kF32, Shape{cols, rows});
  const float* s = t.view().data_as<float>();
  float* d = out.view().data_as<float>();
  for (std::uint64_t i = 0; i < rows; ++i) {
    for (std::uint64_t j = 0; j < cols; ++j) d[j * rows + i] = s[i * cols + j];
  }
  return out;
}

Tensor copy_of(const Tensor& t) {
  Tensor c = Tensor::empty(t.dtype(), t.shape());
  if (t.nbytes()) std::memcpy(c.view().bytes(), t.view().bytes(), t.nbytes());
  return c;
}

void update_rows(const detail::LoraOperands& op, std::byte* rows_data, DType dtype, std::uint64_t row0,
                 std::uint64_t rows, float s, const std::string& module) {
  if (row0 + rows > op.rows) {
    fail("merge_lora: rows [", row0, ", ", row0 + rows, ") are outside '", module,
         "' weight's ", op.rows, " rows");
  }
  const float* l = op.l.view().data_as<float>() + row0 * op.rank;
  const float* r = op.r.view().data_as<float>();
  const auto n = static_cast<std::size_t>(rows), c = static_cast<std::size_t>(op.cols),
             k = static_cast<std::size_t>(op.rank);
  switch (dtype) {
    case DType::kF32:
      lora_update(reinterpret_cast<float*>(rows_data), c, l, r, n, c, k, s);
      break;
    case DType::kBF16:
      lora_update(reinterpret_cast<BFloat16*>(rows_data), c, l, r, n, c, k, s);
      break;
    case DType::kF16:
      lora_update(reinterpret_cast<Float16*>(rows_data), c, l, r, n, c, k, s);
      break;
    default:
      fail("merge_lora: the weight of '", module, "' is ", dtype_name(dtype),
           "; LoRA merges into F32, BF16 or F16 weights");
  }
}

float merge_scale(const LoraModule& m, double factor) {
  const double s = factor * m.scaling;
  if (!std::isfinite(s)) fail("merge_lora: scaling ", s, " of '", m.module, "' is not finite");
  return static_cast<float>(s);
}

std::string escape_regex(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (std::strchr(".^$|()[]{}*+?\\", c) != nullptr) out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

Shape LoraModule::weight_shape() const {
  return transposed() ? Shape{in_features(), out_features()} : Shape{out_features(), in_features()};
}

LoraModule clone(const LoraModule& m) {
  LoraModule c;
  c.module = m.module;
  c.kind = m.kind;
  c.fan_in_fan_out = m.fan_in_fan_out;
  c.a = copy_of(m.a);
  c.b = copy_of(m.b);
  c.scaling = m.scaling;
  return c;
}

LoraAdapter clone(const LoraAdapter& a) {
  LoraAdapter c;
  c.config = a.config;
  c.label = a.label;
  for (const auto& m : a.modules) c.modules.push_back(clone(m));
  return c;
}

LoraModule make_lora_module(std::string module, ConstTensorView a, ConstTensorView b,
                            double scaling, std::string_view label, LoraPair::Kind kind,
                            bool fan_in_fan_out) {
  if (a.shape().rank() != 2 || b.shape().rank() != 2) {
    fail(label, ": module '", module, "': lora_A ", a.shape().to_string(), " and lora_B ",
         b.shape().to_string(), " must both be 2-D");
  }
  if (a.shape()[0] != b.shape()[1]) {
    fail(label, ": module '", module, "': lora_A ", a.shape().to_string(), " has rank ",
         a.shape()[0], " but lora_B ", b.shape().to_string(), " has rank ", b.shape()[1]);
  }
  if (!std::isfinite(scaling)) fail(label, ": module '", module, "': scaling is not finite");
  LoraModule m;
  m.module = std::move(module);
  m.kind = kind;
  m.fan_in_fan_out = fan_in_fan_out;
  m.scaling = scaling;
  for (const auto& [v, factor] : {std::pair{a, "A"}, std::pair{b, "B"}}) {
    if (const std::size_t bad = detail::first_nonfinite(v); bad != detail::kNoIndex) {
      fail(label, ": module '", m.module, "': lora_", factor,
           " holds a non-finite value at element ", bad);
    }
  }
  m.a = widen(a);
  m.b = widen(b);
  return m;
}

const LoraModule* LoraAdapter::find(std::string_view module) const noexcept {
  auto it = std::lower_bound(modules.begin(), modules.end(), module,
                             [](const LoraModule& m, std::string_view k) { return m.module < k; });
  return it != modules.end() && it->module == module ? &*it : nullptr;
}

namespace detail {
void reject_unmergeable(const PeftAdapter& peft, const std::string& label) {
  // DoRA magnitudes and lora_B biases change the merged weight too; they are refused until
  // supported in the streamed merge.
  // PEFT names the magnitude `<module>.lora_magnitude_vector` in older releases and
  // `<module>.lora_magnitude_vector.weight` in newer ones; other exporters add the adapter
  // name (`.default`, `.default.weight`).
  auto has_part = [](const std::string& name, std::string_view part) {
    for (std::size_t at = name.find(part); at != std::string::npos; at = name.find(part, at + 1)) {
      const std::size_t end = at + part.size();
      if (end == name.size() || name[end] == '.') return true;
    }
    return false;
  };
  for (const auto& name : peft.other_tensors()) {
    const bool dora = has_part(name, ".lora_magnitude_vector");
    if (dora || has_part(name, ".lora_B.bias")) {
      fail("adapter '", label, "': tensor '", name, "' is a ", dora ? "DoRA magnitude" : "lora_bias term",
           "; merging DoRA and lora_bias adapters is not supported");
    }
  }
  // Anything else changes the merged model too (modules_to_save copies, trainable tokens):
  // merging without it would be as silently wrong.
  if (!peft.other_tensors().empty()) {
    const std::string& name = peft.other_tensors().front();
    fail("adapter '", label, "': tensor '", name, "' is not a LoRA factor (a modules_to_save copy "
         "or another PEFT extra); merging it is not supported");
  }
  if (const auto it = peft.config().other.find("use_dora"); it != peft.config().other.end() && it->second == "true") {
    fail("adapter '", label, "': adapter_config.json sets use_dora but the folder holds no magnitude "
         "tensor; merging DoRA adapters is not supported");
  }
}
}  // namespace detail

LoraAdapter load_lora_adapter(const std::filesystem::path& folder) {
  const PeftAdapter peft = PeftAdapter::open(folder);
  LoraAdapter out;
  out.config = peft.config();
  out.label = folder.string();
  detail::reject_unmergeable(peft, out.label);
  for (const auto& p : peft.pairs()) {
    out.modules.push_back(make_lora_module(p.module, peft.a(p), peft.b(p), p.scaling,
                                           "adapter '" + out.label + "'", p.kind,
                                           peft.config().fan_in_fan_out));
  }
  return out;
}

std::vector<std::string> save_lora_adapter(const std::filesystem::path& folder,
                                           const LoraAdapter& adapter, WriteOptions options) {
  LoraConfig c = adapter.config;
  std::uint64_t r = 0;
  std::set<std::string> leaves;
  for (const auto& m : adapter.modules) {
    r = std::max(r, m.rank());
    leaves.insert(m.module.substr(m.module.rfind('.') + 1));
  }
  if (r == 0) fail("save_lora_adapter: adapter '", adapter.label, "' has no module of rank > 0");
  c.r = static_cast<int>(r);
  c.lora_alpha = static_cast<double>(r);
  c.use_rslora = false;
  c.rank_pattern.clear();
  c.alpha_pattern.clear();
  c.target_modules.assign(leaves.begin(), leaves.end());
  c.target_modules_pattern.reset();
  for (const auto& m : adapter.modules) {
    const std::string key = escape_regex(m.module);
    if (m.rank() != r) c.rank_pattern.push_back({key, static_cast<int>(m.rank())});
    const double rm = static_cast<double>(m.rank());
    if (c.lora_alpha / rm != m.scaling) c.alpha_pattern.push_back({key, rm * m.scaling});
  }
  std::vector<LoraFactors> factors;
  for (const auto& m : adapter.modules) {
    factors.push_back({m.module, m.a.view(), m.b.view(), m.kind});
  }
  return write_peft_adapter(folder, c, factors, std::move(options));
}

void merge_lora(TensorView weight, const LoraModule& m, double factor) {
  if (weight.shape() != m.weight_shape()) {
    fail("merge_lora: '", m.module, "' weight is ", weight.shape().to_string(),
         " but its adapter (A ", m.a.shape().to_string(), ", B ", m.b.shape().to_string(),
         m.transposed() ? ", stored (in, out)" : "", ") needs ", m.weight_shape().to_string());
  }
  const auto op = detail::lora_operands(m);
  update_rows(*op, weight.bytes(), weight.dtype(), 0, op->rows, merge_scale(m, factor), m.module);
}

namespace {
// W (out, in) or its transpose as doubles: element (i, j) of the (out, in) view.
double load_at(const TensorView& w, std::uint64_t e) {
  switch (w.dtype()) {
    case DType::kF32: return w.data_as<float>()[e];
    case DType::kBF16: return to_f32(w.data_as<BFloat16>()[e]);
    default: return to_f32(w.data_as<Float16>()[e]);
  }
}
void store_at(const TensorView& w, std::uint64_t e, double v) {
  const float f = static_cast<float>(v);
  switch (w.dtype()) {
    case DType::kF32: w.data_as<float>()[e] = f; break;
    case DType::kBF16: w.data_as<BFloat16>()[e] = to_bf16(f); break;
    default: w.data_as<Float16>()[e] = to_f16(f); break;
  }
}

// Applies fn(i, row) to each output row i of V = W + sign·s·B·A in double, then writes
// scale_i·V_i + shift·s·(B·A)_i back, where fn returns (scale_i, shift).
template <typename Fn>
void dora_rows(TensorView weight, const LoraModule& m, const std::vector<float>& magnitude,
               const char* fn, Fn&& row_fn) {
  if (m.kind == LoraPair::Kind::kEmbedding) fail(fn, ": '", m.module, "' is an embedding; DoRA merges Linear weights");
  if (weight.shape() != m.weight_shape()) {
    fail(fn, ": '", m.module, "' weight is ", weight.shape().to_string(), " but its adapter needs ",
         m.weight_shape().to_string());
  }
  if (weight.dtype() != DType::kF32 && weight.dtype() != DType::kBF16 && weight.dtype() != DType::kF16) {
    fail(fn, ": '", m.module, "' weight is ", dtype_name(weight.dtype()), "; DoRA merges into F32, BF16 or F16");
  }
  const std::uint64_t out = m.out_features(), in = m.in_features(), r = m.rank();
  if (magnitude.size() != out) {
    fail(fn, ": '", m.module, "' has ", magnitude.size(), " magnitudes for ", out, " output features");
  }
  for (std::uint64_t i = 0; i < out; ++i) {
    if (!std::isfinite(magnitude[i]) || magnitude[i] < 0) {
      fail(fn, ": '", m.module, "' magnitude ", i, " = ", magnitude[i], " must be finite and >= 0");
    }
  }
  // Into a copy, so that an error on a later row leaves the weight untouched.
  Tensor result = Tensor::empty(weight.dtype(), weight.shape());
  const TensorView res = result.view();
  const float* a = m.a.view().data_as<float>();
  const float* b = m.b.view().data_as<float>();
  std::vector<double> delta(in), v(in);
  for (std::uint64_t i = 0; i < out; ++i) {
    for (std::uint64_t j = 0; j < in; ++j) {
      double d = 0;
      for (std::uint64_t k = 0; k < r; ++k) d += double{b[i * r + k]} * a[k * in + j];
      delta[j] = m.scaling * d;
      v[j] = load_at(weight, m.fan_in_fan_out ? j * out + i : i * in + j);
    }
    const auto [scale, shift] = row_fn(i, v, delta);
    for (std::uint64_t j = 0; j < in; ++j) {
      store_at(res, m.fan_in_fan_out ? j * out + i : i * in + j, scale * v[j] + shift * delta[j]);
    }
  }
  std::memcpy(weight.bytes(), res.bytes(), res.nbytes());
}
}  // namespace

std::vector<double> merge_dora(TensorView weight, const LoraModule& m, const std::vector<float>& magnitude) {
  std::vector<double> norms;
  dora_rows(weight, m, magnitude, "merge_dora",
            [&](std::uint64_t i, std::vector<double>& v, const std::vector<double>& delta) {
              double n2 = 0;
              for (std::size_t j = 0; j < v.size(); ++j) {
                v[j] += delta[j];
                n2 += v[j] * v[j];
              }
              const double n = std::sqrt(n2);
              if (!(n > 0)) fail("merge_dora: '", m.module, "' row ", i, " of W + ΔW has norm 0");
              norms.push_back(n);
              return std::pair<double, double>{magnitude[i] / n, 0.0};
            });
  return norms;
}

void unmerge_dora(TensorView weight, const LoraModule& m, const std::vector<float>& magnitude,
                  const std::vector<double>& weight_norm) {
  if (weight_norm.size() != m.out_features()) {
    fail("unmerge_dora: '", m.module, "' has ", weight_norm.size(), " cached norms for ",
         m.out_features(), " output features");
  }
  dora_rows(weight, m, magnitude, "unmerge_dora",
            [&](std::uint64_t i, std::vector<double>&, const std::vector<double>&) {
              if (!(magnitude[i] > 0) || !(weight_norm[i] > 0)) {
                fail("unmerge_dora: '", m.module, "' row ", i, ": magnitude ", magnitude[i],
                     " and norm ", weight_norm[i], " must be > 0 to divide by m/n");
              }
              return std::pair<double, double>{weight_norm[i] / magnitude[i], -1.0};
            });
}

void check_lora_targets(const Checkpoint& base, const LoraAdapter& adapter) {
  for (const auto& m : adapter.modules) {
    const auto* e = base.find(m.weight_name());
    if (e == nullptr) {
      fail("adapter '", adapter.label, "': module '", m.module, "' targets '", m.weight_name(),
           "', which the base checkpoint ", base.path().string(), " does not have");
    }
    const TensorInfo& t = *e->info;
    if (t.shape != m.weight_shape()) {
      fail("adapter '", adapter.label, "': module '", m.module, "' (A ", m.a.shape().to_string(),
           ", B ", m.b.shape().to_string(), ") needs '", m.weight_name(), "' of shape ",
           m.weight_shape().to_string(), " but the base has ", t.shape.to_string());
    }
    if (t.dtype != DType::kF32 && t.dtype != DType::kBF16 && t.dtype != DType::kF16) {
      fail("adapter '", adapter.label, "': base tensor '", m.weight_name(), "' is ",
           dtype_name(t.dtype), "; LoRA merges into F32, BF16 or F16 weights");
    }
  }
}

void merge_lora_into(CheckpointWriter& writer, const Checkpoint& base, const LoraAdapter& adapter,
                     double factor) {
  check_lora_targets(base, adapter);
  std::map<std::string, const LoraModule*> by_weight;
  for (const auto& m : adapter.modules) by_weight[m.weight_name()] = &m;
  for (const auto& e : base.tensors()) {
    const TensorInfo& t = *e.info;
    const ConstTensorView src = base.view(t.name);
    auto it = by_weight.find(t.name);
    if (it == by_weight.end()) {
      writer.add(t.name, src);
      continue;
    }
    const LoraModule& m = *it->second;
    const auto op = detail::lora_operands(m);
    const float s = merge_scale(m, factor);
    const std::uint64_t row_bytes = dtype_bytes(t.dtype, op->cols);
    auto scratch = std::make_shared<std::vector<std::byte>>();
    const std::string module = m.module;
    const DType dtype = t.dtype;
    writer.add(t.name, t.dtype, t.shape,
               [op, s, src, row_bytes, scratch, module, dtype](std::uint64_t offset, std::byte* dst,
                                                               std::size_t len) {
                 const std::uint64_t r0 = offset / row_bytes;
                 const std::uint64_t r1 = (offset + len + row_bytes - 1) / row_bytes;
                 if (offset % row_bytes == 0 && len % row_bytes == 0) {
                   std::memcpy(dst, src.bytes() + offset, len);
                   update_rows(*op, dst, dtype, r0, r1 - r0, s, module);
                   return;
                 }
                 // A piece that cuts rows: compute whole rows aside, copy the piece out.
                 scratch->resize(static_cast<std::size_t>((r1 - r0) * row_bytes));
                 std::memcpy(scratch->data(), src.bytes() + r0 * row_bytes, scratch->size());
                 update_rows(*op, scratch->data(), dtype, r0, r1 - r0, s, module);
                 std::memcpy(dst, scratch->data() + (offset - r0 * row_bytes), len);
               });
  }
}

std::shared_ptr<const detail::LoraOperands> detail::lora_operands(const LoraModule& m) {
  auto op = std::make_shared<LoraOperands>();
  op->rank = m.rank();
  if (m.transposed()) {
    op->l = transpose(m.a);  // (in, r)
    op->r = transpose(m.b);  // (r, out)
    op->rows = m.in_features();
    op->cols = m.out_features();
  } else {
    op->l = copy_of(m.b);
    op->r = copy_of(m.a);
    op->rows = m.out_features();
    op->cols = m.in_features();
  }
  return op;
}

}  // namespace edgefuse
