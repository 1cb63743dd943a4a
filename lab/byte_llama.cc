// The byte-level Llama of the lab (lab/byte_llama.h).
#include "lab/byte_llama.h"

#include <fmt/format.h>

#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include "edgefuse/io/checkpoint.h"
#include "edgefuse/plan/schema.h"

namespace edgefuse::lab {
namespace {

std::string layer(std::int64_t l, const char* rest) {
  return "model.layers." + std::to_string(l) + "." + rest;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w) {
  return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-5) * w;
}

// HF Llama's rotary embedding (rotate_half form) over [B, heads, T, head_dim].
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto half = x.size(-1) / 2;
  const auto rotated = torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

std::int64_t layer_count(const StateDict& p) {
  std::int64_t n = 0;
  while (p.contains(layer(n, "input_layernorm.weight"))) ++n;
  return n;
}

torch::Tensor next_byte_loss(const torch::Tensor& logits, const torch::Tensor& labels, bool sum) {
  namespace F = torch::nn::functional;
  const auto flat_logits = logits.reshape({-1, kByteVocab});
  const auto flat_labels = labels.reshape({-1});
  if (sum)
    return F::cross_entropy(flat_logits, flat_labels,
                            F::CrossEntropyFuncOptions().reduction(torch::kSum));
  return F::cross_entropy(flat_logits, flat_labels,
                          F::CrossEntropyFuncOptions().reduction(torch::kMean));
}

}  // namespace

std::string config_json(const ModelShape& s) {
  return fmt::format(
      R"({{"model_type": "llama", "hidden_size": {}, "num_hidden_layers": {}, "num_attention_heads": {}, )"
      R"("num_key_value_heads": {}, "head_dim": {}, "intermediate_size": {}, "vocab_size": {}, )"
      R"("tie_word_embeddings": true, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, )"
      R"("max_position_embeddings": {}}})",
      s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim(), s.mlp, kByteVocab, s.context);
}

torch::Tensor forward(const StateDict& p, const torch::Tensor& ids, std::int64_t head_dim) {
  const auto B = ids.size(0), T = ids.size(1);
  const torch::Tensor& emb = p["model.embed_tokens.weight"];
  torch::Tensor h = emb.index_select(0, ids.flatten()).view({B, T, -1});
  const auto inv = torch::pow(10000.0, -torch::arange(0, head_dim, 2, torch::kFloat) / head_dim);
  const auto freqs = torch::outer(torch::arange(T, torch::kFloat), inv);
  const auto cos = torch::cat({freqs, freqs}, -1).cos(), sin = torch::cat({freqs, freqs}, -1).sin();
  const auto mask = torch::full({T, T}, -INFINITY).triu(1);
  const std::int64_t layers = layer_count(p);
  for (std::int64_t l = 0; l < layers; ++l) {
    const torch::Tensor a = rms_norm(h, p[layer(l, "input_layernorm.weight")]);
    const torch::Tensor& wq = p[layer(l, "self_attn.q_proj.weight")];
    const torch::Tensor& wk = p[layer(l, "self_attn.k_proj.weight")];
    const auto H = wq.size(0) / head_dim, KV = wk.size(0) / head_dim;
    auto q = torch::matmul(a, wq.t()).view({B, T, H, head_dim}).transpose(1, 2);
    auto k = torch::matmul(a, wk.t()).view({B, T, KV, head_dim}).transpose(1, 2);
    auto v = torch::matmul(a, p[layer(l, "self_attn.v_proj.weight")].t())
                 .view({B, T, KV, head_dim})
                 .transpose(1, 2);
    q = rope(q, cos, sin);
    k = rope(k, cos, sin).repeat_interleave(H / KV, 1);
    v = v.repeat_interleave(H / KV, 1);
    const auto att = torch::softmax(
        torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(head_dim)) + mask, -1);
    const auto o = torch::matmul(att, v).transpose(1, 2).reshape({B, T, H * head_dim});
    h = h + torch::matmul(o, p[layer(l, "self_attn.o_proj.weight")].t());
    const torch::Tensor m = rms_norm(h, p[layer(l, "post_attention_layernorm.weight")]);
    const auto gate = torch::silu(torch::matmul(m, p[layer(l, "mlp.gate_proj.weight")].t()));
    const auto up = torch::matmul(m, p[layer(l, "mlp.up_proj.weight")].t());
    h = h + torch::matmul(gate * up, p[layer(l, "mlp.down_proj.weight")].t());
  }
  return torch::matmul(rms_norm(h, p["model.norm.weight"]), emb.t());
}

StateDict initial_model(const ModelShape& shape, std::uint64_t seed) {
  torch::manual_seed(seed);
  const auto metas =
      llama_tensor_metas(parse_model_config(config_json(shape), "config.json"), DType::kF32);
  StateDict p;
  for (const auto& m : metas) {
    std::vector<std::int64_t> dims(m.shape.begin(), m.shape.end());
    torch::Tensor t;
    if (m.shape.rank() == 1) {
      t = torch::ones(dims);
    } else {
      const bool out_proj = m.name.find("o_proj") != std::string::npos ||
                            m.name.find("down_proj") != std::string::npos;
      t = torch::randn(dims) *
          (out_proj ? 0.02 / std::sqrt(2.0 * static_cast<double>(shape.layers)) : 0.02);
    }
    p.insert(m.name, t.contiguous());
  }
  return p;
}

void save_model(const StateDict& p, const std::filesystem::path& dir, const std::string& config) {
  WriteOptions wo;
  wo.replace_existing = true;
  CheckpointWriter w(dir, wo);
  for (const auto& item : p) w.add(item.key(), view_of(item.value()));
  if (!config.empty()) w.add_file("config.json", config);
  w.commit();
}

StateDict load_model(const std::filesystem::path& dir) {
  const Checkpoint c = Checkpoint::open(dir);
  StateDict p;
  for (const auto& e : c.tensors()) {
    const ConstTensorView v = c.view(e.info->name);
    if (v.dtype() != DType::kF32)
      throw std::runtime_error(fmt::format("{}: tensor '{}' is {}, but the lab's models are F32",
                                           dir.string(), e.info->name, dtype_name(v.dtype())));
    const std::vector<std::int64_t> shape(v.shape().begin(), v.shape().end());
    p.insert(e.info->name,
             torch::from_blob(const_cast<std::byte*>(v.bytes()), shape, torch::kFloat).clone());
  }
  return p;
}

StateDict clone(const StateDict& model) {
  StateDict out;
  for (const auto& item : model) out.insert(item.key(), item.value().detach().clone());
  return out;
}

std::int64_t parameter_count(const StateDict& model) {
  std::int64_t n = 0;
  for (const auto& item : model) n += item.value().numel();
  return n;
}

std::vector<std::int64_t> shuffled(std::int64_t n, std::uint64_t seed) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  std::mt19937_64 rng(seed);
  for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
  return order;
}

Trainer::Trainer(StateDict& m, double lr)
    : model(m),
      params([&] {
        std::vector<torch::Tensor> ps;
        for (auto& item : m) ps.push_back(item.value());
        return ps;
      }()),
      optimizer(params, torch::optim::AdamOptions(lr)) {}

void Trainer::steps(const Windows& data, int steps, std::int64_t batch, std::uint64_t seed,
                    std::int64_t head_dim) {
  for (auto& t : params) t.set_requires_grad(true);
  const std::int64_t n = data.size();
  // One order per pass over the windows: pass k is shuffled from (seed, k).
  std::int64_t pass = -1;
  std::vector<std::int64_t> order;
  for (int s = 0; s < steps; ++s) {
    std::vector<std::int64_t> idx;
    for (std::int64_t b = 0; b < batch; ++b, ++position) {
      if (position / n != pass) {
        pass = position / n;
        order = shuffled(n, seed * 1000003 + static_cast<std::uint64_t>(pass));
      }
      idx.push_back(order[static_cast<std::size_t>(position % n)]);
    }
    const auto sel = torch::tensor(idx, torch::kLong);
    optimizer.zero_grad();
    const auto loss = next_byte_loss(forward(model, data.x.index_select(0, sel), head_dim),
                                     data.y.index_select(0, sel), false);
    loss.backward();
    optimizer.step();
  }
  for (auto& t : params) t.set_requires_grad(false);
}

void train_steps(StateDict& model, const Windows& data, int steps, std::int64_t batch, double lr,
                 std::uint64_t seed, std::int64_t head_dim) {
  Trainer t(model, lr);
  t.steps(data, steps, batch, seed, head_dim);
}

double bits_per_character(const StateDict& model, const Windows& test, std::int64_t head_dim) {
  torch::NoGradGuard no_grad;
  double nats = 0.0;
  const std::int64_t n = test.size();
  for (std::int64_t b = 0; b < n; b += 64) {
    const std::int64_t e = std::min(n, b + 64);
    nats +=
        next_byte_loss(forward(model, test.x.slice(0, b, e), head_dim), test.y.slice(0, b, e), true)
            .item<double>();
  }
  return nats / static_cast<double>(test.characters) / std::log(2.0);
}

}  // namespace edgefuse::lab
