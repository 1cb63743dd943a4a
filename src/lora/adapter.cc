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
#include "src/kernels/nonfinite.h"
#include "src/lora/operands.h"
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

void update_rows(const detail::LoraOperands& op, std::byte* rows_data, DType dtype,
                 std::uint64_t row0, std::uint64_t rows, float s, const std::string& module) {
  if (row0 + rows > op.rows) {
    fail("merge_lora: rows [", row0, ", ", row0 + rows, ") are outside '", module, "' weight's ",
         op.rows, " rows");
  }
  const float* l = op.l.view().data_as<float>() + row0 * op.rank;
  const float* r = op.r.view().data_as<float>();
  const auto n = static_cast<std::size_t>(rows), c = static_cast<std::size_t>(op.cols),
             k = static_cast<std::size_t>(op.rank);
  // A merged value that is not representable in the weight's dtype (factors of 1e20 make
  // B.A overflow; a bf16 or f16 weight plus its update may leave the range) is an error
  // naming it, never a silent Inf. Checked where the base rows are finite (a base that holds
  // NaN or Inf keeps them, as the update adds to them).
  const ConstTensorView all(rows_data, dtype, Shape{static_cast<std::uint64_t>(n * c)});
  const bool base_finite = detail::first_nonfinite(all, 0, n * c) == detail::kNoIndex;
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
  const std::size_t bad = base_finite ? detail::first_nonfinite(all, 0, n * c) : detail::kNoIndex;
  if (bad != detail::kNoIndex) {
    const std::size_t i = bad / c, j = bad % c;
    double update = 0.0;
    for (std::size_t q = 0; q < k; ++q) {
      update += static_cast<double>(l[i * k + q]) * static_cast<double>(r[q * c + j]);
    }
    fail("merge_lora: '", module, "' weight element [", row0 + i, ", ", j,
         "]: the merged value is "
         "not representable in ",
         dtype_name(dtype), " (the update scale x (B.A) there is ", static_cast<double>(s) * update,
         ")");
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
  c.magnitude = m.magnitude;
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

std::string dora_magnitude_module(const std::string& tensor) {
  // PEFT names the magnitude `base_model.model.<module>.lora_magnitude_vector` in older
  // releases and `….lora_magnitude_vector.weight` in newer ones; other exporters keep the
  // adapter name (`.default`, `.default.weight`).
  static constexpr std::string_view kPart = ".lora_magnitude_vector";
  static constexpr std::string_view kPrefix = "base_model.model.";
  const std::size_t at = tensor.rfind(kPart);
  if (at == std::string::npos) return "";
  const std::string_view rest = std::string_view(tensor).substr(at + kPart.size());
  if (rest != "" && rest != ".weight" && rest != ".default" && rest != ".default.weight") return "";
  std::string module = tensor.substr(0, at);
  if (module.compare(0, kPrefix.size(), kPrefix) == 0) module.erase(0, kPrefix.size());
  return module;
}

void reject_dora(const char* fn, const LoraAdapter& adapter) {
  for (const auto& m : adapter.modules) {
    if (m.dora()) {
      fail(fn, ": adapter '", adapter.label, "': module '", m.module,
           "' is a DoRA module (it has "
           "a magnitude vector); only merging applies to DoRA adapters");
    }
  }
}

void reject_unmergeable(const PeftAdapter& peft, const std::string& label, bool allow_dora) {
  for (const auto& name : peft.other_tensors()) {
    if (!dora_magnitude_module(name).empty()) {
      if (allow_dora) continue;
      fail("adapter '", label, "': tensor '", name,
           "' is a DoRA magnitude; a DoRA adapter rescales "
           "whole rows and does not fuse as a delta (merge it with merge-lora)");
    }
    // lora_B biases change the merged weight too, and anything else changes the merged model
    // (modules_to_save copies, trainable tokens): merging without them would be silently wrong.
    const std::string_view bias = ".lora_B.bias";
    if (name.find(bias) != std::string::npos) {
      fail("adapter '", label, "': tensor '", name,
           "' is a lora_bias term; merging lora_bias "
           "adapters is not supported");
    }
    fail("adapter '", label, "': tensor '", name,
         "' is not a LoRA factor (a modules_to_save copy "
         "or another PEFT extra); merging it is not supported");
  }
  if (const auto it = peft.config().other.find("use_dora");
      !allow_dora && it != peft.config().other.end() && it->second == "true") {
    fail("adapter '", label,
         "': adapter_config.json sets use_dora; a DoRA adapter rescales whole "
         "rows and does not fuse as a delta (merge it with merge-lora)");
  }
}
}  // namespace detail

LoraAdapter load_lora_adapter(const std::filesystem::path& folder) {
  const PeftAdapter peft = PeftAdapter::open(folder);
  LoraAdapter out;
  out.config = peft.config();
  out.label = folder.string();
  detail::reject_unmergeable(peft, out.label, /*allow_dora=*/true);
  const std::string where = "adapter '" + out.label + "'";
  std::map<std::string, std::string> magnitudes;  // module -> tensor
  for (const auto& name : peft.other_tensors()) {
    const std::string module = detail::dora_magnitude_module(name);
    if (!magnitudes.emplace(module, name).second) {
      fail(where, ": tensors '", magnitudes.at(module), "' and '", name,
           "' are both the DoRA magnitude of '", module, "'");
    }
  }
  const auto it = peft.config().other.find("use_dora");
  const bool use_dora = it != peft.config().other.end() && it->second == "true";
  for (const auto& p : peft.pairs()) {
    LoraModule m = make_lora_module(p.module, peft.a(p), peft.b(p), p.scaling, where, p.kind,
                                    peft.config().fan_in_fan_out);
    const auto mag = magnitudes.find(p.module);
    if (mag != magnitudes.end()) {
      if (m.kind == LoraPair::Kind::kEmbedding) {
        fail(where, ": tensor '", mag->second, "' is a DoRA magnitude of the embedding '", p.module,
             "'; DoRA merges Linear weights only");
      }
      const ConstTensorView v = peft.checkpoint().view(mag->second);
      if (v.shape() != Shape{m.out_features()}) {
        fail(where, ": tensor '", mag->second, "' holds ", v.shape().to_string(), " but module '",
             p.module, "' has ", m.out_features(), " output features");
      }
      if (const std::size_t bad = detail::first_nonfinite(v); bad != detail::kNoIndex) {
        fail(where, ": tensor '", mag->second, "' holds a non-finite value at element ", bad);
      }
      const Tensor f = widen(v);
      m.magnitude.assign(f.view().data_as<float>(), f.view().data_as<float>() + f.numel());
      magnitudes.erase(mag);
    } else if (use_dora) {
      fail(where, ": adapter_config.json sets use_dora but module '", p.module,
           "' has no lora_magnitude_vector");
    }
    out.modules.push_back(std::move(m));
  }
  if (!magnitudes.empty()) {
    fail(where, ": tensor '", magnitudes.begin()->second, "' is a DoRA magnitude of '",
         magnitudes.begin()->first, "', which has no lora_A / lora_B pair");
  }
  return out;
}

std::vector<std::string> save_lora_adapter(const std::filesystem::path& folder,
                                           const LoraAdapter& adapter, WriteOptions options) {
  detail::reject_dora("save_lora_adapter", adapter);
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
  if (m.dora()) {
    if (factor != 1.0) {
      fail("merge_lora: '", m.module,
           "' is a DoRA module; only factor 1 (merge) applies, and "
           "unmerging needs the row norms merge_dora returns (unmerge_dora)");
    }
    merge_dora(weight, m, m.magnitude);
    return;
  }
  if (weight.shape() != m.weight_shape()) {
    fail("merge_lora: '", m.module, "' weight is ", weight.shape().to_string(),
         " but its adapter (A ", m.a.shape().to_string(), ", B ", m.b.shape().to_string(),
         m.transposed() ? ", stored (in, out)" : "", ") needs ", m.weight_shape().to_string());
  }
  const auto op = detail::lora_operands(m);
  update_rows(*op, weight.bytes(), weight.dtype(), 0, op->rows, merge_scale(m, factor), m.module);
}

namespace {
double load_at(const std::byte* w, DType dt, std::uint64_t e) {
  switch (dt) {
    case DType::kF32:
      return reinterpret_cast<const float*>(w)[e];
    case DType::kBF16:
      return to_f32(reinterpret_cast<const BFloat16*>(w)[e]);
    default:
      return to_f32(reinterpret_cast<const Float16*>(w)[e]);
  }
}
void store_at(std::byte* w, DType dt, std::uint64_t e, double v) {
  const float f = static_cast<float>(v);
  switch (dt) {
    case DType::kF32:
      reinterpret_cast<float*>(w)[e] = f;
      break;
    case DType::kBF16:
      reinterpret_cast<BFloat16*>(w)[e] = to_bf16(f);
      break;
    default:
      reinterpret_cast<Float16*>(w)[e] = to_f16(f);
      break;
  }
}

// Where element (i, j) of the (out, in) view is stored: (in, out) for fan_in_fan_out.
std::uint64_t stored_at(const LoraModule& m, std::uint64_t i, std::uint64_t j) {
  return m.fan_in_fan_out ? j * m.out_features() + i : i * m.in_features() + j;
}
// s·(B·A)[i][j] in double, k ascending: the one definition every DoRA path uses.
double dora_delta(const LoraModule& m, std::uint64_t i, std::uint64_t j) {
  const float* a = m.a.view().data_as<float>();
  const float* b = m.b.view().data_as<float>();
  const std::uint64_t r = m.rank(), in = m.in_features();
  double d = 0;
  for (std::uint64_t k = 0; k < r; ++k) d += double{b[i * r + k]} * a[k * in + j];
  return m.scaling * d;
}

void check_dora(const char* fn, const LoraModule& m, const Shape& shape, DType dtype,
                const std::vector<float>& magnitude) {
  if (m.kind == LoraPair::Kind::kEmbedding)
    fail(fn, ": '", m.module, "' is an embedding; DoRA merges Linear weights");
  if (shape != m.weight_shape()) {
    fail(fn, ": '", m.module, "' weight is ", shape.to_string(), " but its adapter needs ",
         m.weight_shape().to_string());
  }
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    fail(fn, ": '", m.module, "' weight is ", dtype_name(dtype),
         "; DoRA merges into F32, BF16 or F16");
  }
  if (magnitude.size() != m.out_features()) {
    fail(fn, ": '", m.module, "' has ", magnitude.size(), " magnitudes for ", m.out_features(),
         " output features");
  }
  for (std::size_t i = 0; i < magnitude.size(); ++i) {
    if (!std::isfinite(magnitude[i]) || magnitude[i] < 0) {
      fail(fn, ": '", m.module, "' magnitude ", i, " = ", magnitude[i], " must be finite and >= 0");
    }
  }
}

// n_i = ‖row i of W + s·B·A‖ (the (out, in) view), each checked > 0.
std::vector<double> dora_norms(const char* fn, const std::byte* w, DType dt, const LoraModule& m) {
  std::vector<double> norms(m.out_features());
  for (std::uint64_t i = 0; i < m.out_features(); ++i) {
    double n2 = 0;
    for (std::uint64_t j = 0; j < m.in_features(); ++j) {
      const double v = load_at(w, dt, stored_at(m, i, j)) + dora_delta(m, i, j);
      n2 += v * v;
    }
    norms[i] = std::sqrt(n2);
    if (!(norms[i] > 0)) fail(fn, ": '", m.module, "' row ", i, " of W + ΔW has norm 0");
  }
  return norms;
}

// The merged value of stored element e: (m_i / n_i)·(w + s·(B·A)[i][j]).
double dora_merged(const LoraModule& m, const std::vector<float>& magnitude,
                   const std::vector<double>& norms, double w, std::uint64_t e) {
  const std::uint64_t i = m.fan_in_fan_out ? e % m.out_features() : e / m.in_features();
  const std::uint64_t j = m.fan_in_fan_out ? e / m.out_features() : e % m.in_features();
  return (magnitude[i] / norms[i]) * (w + dora_delta(m, i, j));
}
}  // namespace

std::vector<double> merge_dora(TensorView weight, const LoraModule& m,
                               const std::vector<float>& magnitude) {
  check_dora("merge_dora", m, weight.shape(), weight.dtype(), magnitude);
  // Every norm first: an error leaves the weight untouched.
  std::vector<double> norms = dora_norms("merge_dora", weight.bytes(), weight.dtype(), m);
  for (std::uint64_t e = 0; e < weight.numel(); ++e) {
    store_at(weight.bytes(), weight.dtype(), e,
             dora_merged(m, magnitude, norms, load_at(weight.bytes(), weight.dtype(), e), e));
  }
  return norms;
}

void unmerge_dora(TensorView weight, const LoraModule& m, const std::vector<float>& magnitude,
                  const std::vector<double>& weight_norm) {
  check_dora("unmerge_dora", m, weight.shape(), weight.dtype(), magnitude);
  if (weight_norm.size() != m.out_features()) {
    fail("unmerge_dora: '", m.module, "' has ", weight_norm.size(), " cached norms for ",
         m.out_features(), " output features");
  }
  for (std::uint64_t i = 0; i < m.out_features(); ++i) {
    if (!(magnitude[i] > 0) || !(weight_norm[i] > 0)) {
      fail("unmerge_dora: '", m.module, "' row ", i, ": magnitude ", magnitude[i], " and norm ",
           weight_norm[i], " must be > 0 to divide by m/n");
    }
  }
  for (std::uint64_t i = 0; i < m.out_features(); ++i) {
    for (std::uint64_t j = 0; j < m.in_features(); ++j) {
      const std::uint64_t e = stored_at(m, i, j);
      const double v = load_at(weight.bytes(), weight.dtype(), e);
      store_at(weight.bytes(), weight.dtype(), e,
               (weight_norm[i] / magnitude[i]) * v - dora_delta(m, i, j));
    }
  }
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
  // DoRA modules: checked and their row norms computed from the base before anything is
  // declared.
  std::map<std::string, std::shared_ptr<const std::vector<double>>> dora_norms_of;
  for (const auto& m : adapter.modules) {
    if (!m.dora()) continue;
    if (factor != 1.0) {
      fail("adapter '", adapter.label, "': module '", m.module,
           "' is a DoRA module; it can be "
           "merged but not unmerged (that needs the row norms cached at merge time)");
    }
    const ConstTensorView w = base.view(m.weight_name());
    check_dora("merge_lora_into", m, w.shape(), w.dtype(), m.magnitude);
    dora_norms_of[m.weight_name()] = std::make_shared<const std::vector<double>>(
        dora_norms("merge_lora_into", w.bytes(), w.dtype(), m));
  }
  for (const auto& e : base.tensors()) {
    const TensorInfo& t = *e.info;
    const ConstTensorView src = base.view(t.name);
    auto it = by_weight.find(t.name);
    if (it == by_weight.end()) {
      writer.add(t.name, src);
      continue;
    }
    const LoraModule& m = *it->second;
    if (m.dora()) {
      // Element by element as merge_dora computes them, so the bits agree; pieces may cut
      // elements, so whole elements are made aside.
      auto mod = std::make_shared<const LoraModule>(clone(m));
      auto norms = dora_norms_of.at(t.name);
      auto scratch = std::make_shared<std::vector<std::byte>>();
      const DType dtype = t.dtype;
      writer.add(
          t.name, t.dtype, t.shape,
          [mod, norms, src, scratch, dtype](std::uint64_t offset, std::byte* dst, std::size_t len) {
            const std::uint64_t esize = dtype_bytes(dtype, 1);
            const std::uint64_t e0 = offset / esize, e1 = (offset + len + esize - 1) / esize;
            scratch->resize(static_cast<std::size_t>((e1 - e0) * esize));
            for (std::uint64_t e = e0; e < e1; ++e) {
              store_at(
                  scratch->data(), dtype, e - e0,
                  dora_merged(*mod, mod->magnitude, *norms, load_at(src.bytes(), dtype, e), e));
            }
            std::memcpy(dst, scratch->data() + (offset - e0 * esize), len);
          });
      continue;
    }
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
