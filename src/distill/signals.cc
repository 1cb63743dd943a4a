// Teacher signals: construction, validation, top-k selection and safetensors files.
#include "edgefuse/distill/signals.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>
#include <utility>

#include "edgefuse/core/error.h"
#include "edgefuse/core/tensor.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/kernels/convert.h"
#include "src/core/parse_number.h"

namespace edgefuse {
namespace {

constexpr const char* kLogits = "logits";
constexpr const char* kIds = "topk_ids";
constexpr const char* kValues = "topk_values";
constexpr const char* kLse = "logsumexp";

template <typename... Args>
[[noreturn]] void bad_signal(const TeacherSignal& s, const Args&... args) {
  detail::fail("teacher signal of client '", s.client, "': ", args...);
}

// Index of the first non-finite value, or n.
std::size_t first_nonfinite(const std::vector<float>& v) {
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (!std::isfinite(v[i])) return i;
  }
  return v.size();
}

std::string format_double(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

}  // namespace

void validate_signal(const TeacherSignal& s) {
  if (s.rows == 0) bad_signal(s, "it has no rows");
  if (s.vocab == 0) bad_signal(s, "vocabulary size 0");
  if (s.vocab > static_cast<std::size_t>(INT32_MAX)) {
    bad_signal(s, "vocabulary size ", s.vocab, " exceeds 2^31 - 1");
  }
  if (!(s.temperature > 0.0) || !std::isfinite(s.temperature)) {
    bad_signal(s, "temperature ", s.temperature, " is not a finite value > 0");
  }
  if (s.dense()) {
    if (s.logits.size() != s.rows * s.vocab) {
      bad_signal(s, "logits hold ", s.logits.size(), " values, expected rows x vocab = ", s.rows,
                 " x ", s.vocab);
    }
    const std::size_t bad = first_nonfinite(s.logits);
    if (bad != s.logits.size()) {
      bad_signal(s, "logit at row ", bad / s.vocab, ", id ", bad % s.vocab, " is ", s.logits[bad],
                 " (not finite)");
    }
    return;
  }
  if (s.k > s.vocab) bad_signal(s, "k = ", s.k, " exceeds the vocabulary size ", s.vocab);
  if (s.ids.size() != s.rows * s.k || s.values.size() != s.rows * s.k) {
    bad_signal(s, "top-k ids/values hold ", s.ids.size(), "/", s.values.size(),
               " entries, expected rows x k = ", s.rows, " x ", s.k);
  }
  if (!s.logsumexp.empty() && s.logsumexp.size() != s.rows) {
    bad_signal(s, "logsumexp holds ", s.logsumexp.size(), " values for ", s.rows, " rows");
  }
  std::size_t bad = first_nonfinite(s.values);
  if (bad != s.values.size()) {
    bad_signal(s, "top-k value at row ", bad / s.k, ", entry ", bad % s.k, " is ", s.values[bad],
               " (not finite)");
  }
  bad = first_nonfinite(s.logsumexp);
  if (bad != s.logsumexp.size()) {
    bad_signal(s, "logsumexp of row ", bad, " is ", s.logsumexp[bad], " (not finite)");
  }
  std::vector<std::int32_t> row(s.k);
  for (std::size_t r = 0; r < s.rows; ++r) {
    const std::int32_t* ids = s.ids.data() + r * s.k;
    for (std::size_t j = 0; j < s.k; ++j) {
      if (ids[j] < 0 || static_cast<std::size_t>(ids[j]) >= s.vocab) {
        bad_signal(s, "row ", r, " has id ", ids[j], " outside the vocabulary [0, ", s.vocab, ") (",
                   kIds, ")");
      }
    }
    std::copy(ids, ids + s.k, row.begin());
    std::sort(row.begin(), row.end());
    const auto dup = std::adjacent_find(row.begin(), row.end());
    if (dup != row.end()) bad_signal(s, "row ", r, " repeats id ", *dup, " (", kIds, ")");
    if (s.value_kind == TopKValues::kLogProbs) {
      double mass = 0.0;
      for (std::size_t j = 0; j < s.k; ++j) mass += std::exp(double{s.values[r * s.k + j]});
      if (mass > 1.0 + 1e-4) {
        bad_signal(s, "row ", r, " has log-probabilities of total mass ", mass, " > 1 (", kValues,
                   ")");
      }
    }
    if (!s.logsumexp.empty() && s.value_kind == TopKValues::kLogits) {
      // Each kept logit's probability exp(z/T - lse) is at most 1.
      for (std::size_t j = 0; j < s.k; ++j) {
        const double lp = double{s.values[r * s.k + j]} / s.temperature - s.logsumexp[r];
        if (lp > 1e-4) {
          bad_signal(s, "row ", r, ": logit ", s.values[r * s.k + j],
                     " exceeds the row's logsumexp ", s.logsumexp[r], " (", kLse, ")");
        }
      }
    }
  }
}

TeacherSignal dense_signal(std::string client, std::size_t rows, std::size_t vocab,
                           std::vector<float> logits) {
  TeacherSignal s;
  s.client = std::move(client);
  s.rows = rows;
  s.vocab = vocab;
  s.logits = std::move(logits);
  validate_signal(s);
  return s;
}

TeacherSignal topk_signal(std::string client, std::size_t rows, std::size_t vocab, std::size_t k,
                          std::vector<std::int32_t> ids, std::vector<float> values, TopKValues kind,
                          std::vector<float> logsumexp, double temperature) {
  TeacherSignal s;
  s.client = std::move(client);
  s.rows = rows;
  s.vocab = vocab;
  s.k = k;
  s.ids = std::move(ids);
  s.values = std::move(values);
  s.value_kind = kind;
  s.logsumexp = std::move(logsumexp);
  s.temperature = temperature;
  if (k == 0) bad_signal(s, "top-k signal with k = 0");
  validate_signal(s);
  return s;
}

TeacherSignal top_k_of(const TeacherSignal& dense, std::size_t k, bool with_logsumexp,
                       double temperature) {
  if (!dense.dense()) bad_signal(dense, "top_k_of needs a dense signal");
  if (k == 0 || k > dense.vocab) {
    bad_signal(dense, "top_k_of: k = ", k, " is not in [1, vocab = ", dense.vocab, "]");
  }
  TeacherSignal s;
  s.client = dense.client;
  s.rows = dense.rows;
  s.vocab = dense.vocab;
  s.k = k;
  s.temperature = temperature;
  s.ids.resize(s.rows * k);
  s.values.resize(s.rows * k);
  if (with_logsumexp) s.logsumexp.resize(s.rows);
  std::vector<std::int32_t> order(dense.vocab);
  for (std::size_t r = 0; r < s.rows; ++r) {
    const float* z = dense.logits.data() + r * dense.vocab;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(
        order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(),
        [z](std::int32_t a, std::int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
    for (std::size_t j = 0; j < k; ++j) {
      s.ids[r * k + j] = order[j];
      s.values[r * k + j] = z[order[j]];
    }
    if (with_logsumexp) {
      const double m = double{z[order[0]]} / temperature;
      double sum = 0.0;
      for (std::size_t i = 0; i < dense.vocab; ++i) sum += std::exp(double{z[i]} / temperature - m);
      s.logsumexp[r] = static_cast<float>(m + std::log(sum));
    }
  }
  validate_signal(s);
  return s;
}

// ---------------------------------------------------------------- files

namespace {

std::vector<float> read_floats(const Checkpoint& ckpt, const std::string& file,
                               const std::string& name, const Shape& want) {
  const ConstTensorView v = ckpt.view(name);
  if (v.shape() != want) {
    throw CheckpointError(CheckpointRule::kTensorInvalidInfo, file, name,
                          "shape " + v.shape().to_string() + ", expected " + want.to_string());
  }
  std::vector<float> out(v.numel());
  if (v.dtype() == DType::kF32) {
    std::memcpy(out.data(), v.bytes(), v.nbytes());
  } else if (v.dtype() == DType::kBF16) {
    // The mapping gives no alignment guarantee beyond the file's: copy the bits first.
    std::vector<BFloat16> tmp(v.numel());
    std::memcpy(tmp.data(), v.bytes(), v.nbytes());
    convert(tmp.data(), out.data(), tmp.size());
  } else {
    throw CheckpointError(CheckpointRule::kTensorInvalidInfo, file, name,
                          "dtype " + std::string(dtype_name(v.dtype())) + ", expected F32 or BF16");
  }
  return out;
}

std::size_t parse_count(const std::string& file, const std::string& key, const std::string& text) {
  std::size_t used = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || text[0] == '-') {
    throw CheckpointError(CheckpointRule::kInvalidHeaderDeserialization, file, "",
                          "__metadata__ '" + key + "' = '" + text + "' is not a count");
  }
  return static_cast<std::size_t>(v);
}

double parse_real(const std::string& file, const std::string& key, const std::string& text) {
  double v = 0;
  const std::size_t used = detail::parse_double_prefix(text, &v);
  if (used == 0 || used != text.size()) {
    throw CheckpointError(CheckpointRule::kInvalidHeaderDeserialization, file, "",
                          "__metadata__ '" + key + "' = '" + text + "' is not a number");
  }
  return v;
}

}  // namespace

TeacherSignal load_teacher_signal(const std::filesystem::path& path, std::string client) {
  const Checkpoint ckpt = Checkpoint::open(path);
  const std::string file = ckpt.path().string();
  if (ckpt.shards().size() != 1) {
    throw CheckpointError(CheckpointRule::kInvalidArgument, file, "",
                          "a teacher signal is one safetensors file, found " +
                              std::to_string(ckpt.shards().size()) + " shards");
  }
  const auto& meta = ckpt.shards()[0].metadata();
  auto get = [&](const std::string& key) -> const std::string* {
    const auto it = meta.find(key);
    return it == meta.end() ? nullptr : &it->second;
  };
  TeacherSignal s;
  s.client = client.empty() ? path.string() : std::move(client);
  const std::string* kind = get("edgefuse.signal");
  const bool dense = kind == nullptr ? ckpt.find(kLogits) != nullptr : *kind == "dense";
  if (kind != nullptr && *kind != "dense" && *kind != "topk") {
    throw CheckpointError(
        CheckpointRule::kInvalidHeaderDeserialization, file, "",
        "__metadata__ 'edgefuse.signal' = '" + *kind + "', expected 'dense' or 'topk'");
  }
  if (const std::string* t = get("temperature"))
    s.temperature = parse_real(file, "temperature", *t);
  if (dense) {
    const ConstTensorView v = ckpt.view(kLogits);
    if (v.rank() != 2) {
      throw CheckpointError(CheckpointRule::kTensorInvalidInfo, file, kLogits,
                            "rank " + std::to_string(v.rank()) + ", expected [rows, vocab]");
    }
    s.rows = v.shape()[0];
    s.vocab = v.shape()[1];
    s.logits = read_floats(ckpt, file, kLogits, v.shape());
  } else {
    const ConstTensorView ids = ckpt.view(kIds);
    if (ids.rank() != 2) {
      throw CheckpointError(CheckpointRule::kTensorInvalidInfo, file, kIds,
                            "rank " + std::to_string(ids.rank()) + ", expected [rows, k]");
    }
    s.rows = ids.shape()[0];
    s.k = ids.shape()[1];
    const std::string* vocab = get("vocab_size");
    if (vocab == nullptr) {
      throw CheckpointError(CheckpointRule::kInvalidHeaderDeserialization, file, "",
                            "a top-k signal needs __metadata__ 'vocab_size'");
    }
    s.vocab = parse_count(file, "vocab_size", *vocab);
    if (const std::string* values = get("values")) {
      if (*values == "logprobs") {
        s.value_kind = TopKValues::kLogProbs;
      } else if (*values != "logits") {
        throw CheckpointError(
            CheckpointRule::kInvalidHeaderDeserialization, file, "",
            "__metadata__ 'values' = '" + *values + "', expected 'logits' or 'logprobs'");
      }
    }
    s.ids.resize(ids.numel());
    if (ids.dtype() == DType::kI32) {
      std::memcpy(s.ids.data(), ids.bytes(), ids.nbytes());
    } else if (ids.dtype() == DType::kI64) {
      std::vector<std::int64_t> wide(ids.numel());
      std::memcpy(wide.data(), ids.bytes(), ids.nbytes());
      for (std::size_t i = 0; i < wide.size(); ++i) {
        // Out-of-range ids become -1 and are reported by validate_signal with their row.
        s.ids[i] = (wide[i] < 0 || wide[i] > INT32_MAX) ? -1 : static_cast<std::int32_t>(wide[i]);
      }
    } else {
      throw CheckpointError(
          CheckpointRule::kTensorInvalidInfo, file, kIds,
          "dtype " + std::string(dtype_name(ids.dtype())) + ", expected I32 or I64");
    }
    s.values = read_floats(ckpt, file, kValues, ids.shape());
    if (ckpt.find(kLse) != nullptr) s.logsumexp = read_floats(ckpt, file, kLse, Shape{s.rows});
    if (s.k == 0) bad_signal(s, file, ": top-k signal with k = 0");
  }
  try {
    validate_signal(s);
  } catch (const Error& e) {
    throw Error(file + ": " + e.what());
  }
  return s;
}

void save_teacher_signal(const std::filesystem::path& folder, const TeacherSignal& signal,
                         DType values_dtype, bool replace) {
  validate_signal(signal);
  if (values_dtype != DType::kF32 && values_dtype != DType::kBF16) {
    bad_signal(signal, "values can be saved as F32 or BF16, not ", dtype_name(values_dtype));
  }
  WriteOptions options;
  options.file_stem = "teacher";
  options.replace_existing = replace;
  options.metadata = {{"format", "pt"},
                      {"edgefuse.signal", signal.dense() ? "dense" : "topk"},
                      {"temperature", format_double(signal.temperature)}};
  if (!signal.dense()) {
    options.metadata["vocab_size"] = std::to_string(signal.vocab);
    options.metadata["values"] = signal.value_kind == TopKValues::kLogProbs ? "logprobs" : "logits";
  }
  CheckpointWriter writer(folder, std::move(options));
  // Tensors stored as BF16 are converted up front (signals are proxy-set sized, not models).
  std::vector<Tensor> keep;
  auto add_floats = [&](const char* name, const std::vector<float>& v, const Shape& shape,
                        DType dtype) {
    if (dtype == DType::kF32) {
      writer.add(name, ConstTensorView(v.data(), DType::kF32, shape));
      return;
    }
    Tensor t = Tensor::empty(DType::kBF16, shape);
    convert(v.data(), t.view().data_as<BFloat16>(), v.size());
    writer.add(name, std::as_const(t).view());
    keep.push_back(std::move(t));
  };
  if (signal.dense()) {
    add_floats(kLogits, signal.logits, Shape{signal.rows, signal.vocab}, values_dtype);
  } else {
    writer.add(kIds, ConstTensorView(signal.ids.data(), DType::kI32, Shape{signal.rows, signal.k}));
    add_floats(kValues, signal.values, Shape{signal.rows, signal.k}, values_dtype);
    if (!signal.logsumexp.empty()) {
      add_floats(kLse, signal.logsumexp, Shape{signal.rows}, DType::kF32);
    }
  }
  writer.commit();
}

}  // namespace edgefuse
