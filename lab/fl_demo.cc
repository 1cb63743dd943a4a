// `edgefuse-lab demo` (lab/fl_demo.h): heterogeneous federated learning of a character-level
// Llama, every round fused by the engine from files, as a deployment would.
//
// The target: a Llama-style model (RMSNorm, RoPE, grouped-query attention with 8 heads over 4
// KV heads, SwiGLU MLP, tied embeddings; hidden 128, 4 layers, MLP 384, 0.8M parameters) over
// the 97 character ids of examples/common/fortunes.h, held in F32 as a Hugging Face llama
// checkpoint with config.json, so the engine's "llama" schema binds it.
//
// Six clients each hold two categories of the Debian fortunes corpus (non-IID) and a device
// of one of three capacity tiers: width 1/4, 1/2 or the whole model (two clients per tier;
// width applies to hidden size, KV groups, heads and MLP, as the budget chooser's plans do).
// Each round every client gets its sub-model cut out of the current target (extract), trains
// it locally (Adam, next-character loss), and sends its delta as a safetensors update with
// its plan; the server writes a job and runs the fusion engine (run_fusion, delta mode,
// weights = the client's training characters), whose output is the next round's target.
//
// Three runs from the same initial model and data:
//   fedrolex  - rolling windows that move one index per round (Alam et al., NeurIPS 2022);
//   heterofl  - static prefixes (Diao et al., ICLR 2021);
//   largest   - only the two full-size clients take part (the others' devices are too small).
// Held-out bits per character (text of every category that no client trained on) are
// printed per round, written to <out>/bpc.tsv and plotted to <out>/bpc.png with gnuplot.
#include <torch/torch.h>

#include "lab/fl_demo.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "edgefuse/engine/fuse.h"
#include "edgefuse/interop/torch.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/plan/plan.h"
#include "edgefuse/plan/schema.h"
#include "examples/common/fortunes.h"

namespace edgefuse::lab {
namespace {

namespace fs = std::filesystem;
using examples::kCharVocab;

constexpr std::int64_t kHidden = 128, kLayers = 4, kHeads = 8, kKvHeads = 4, kHeadDim = 16,
                       kMlp = 384, kContext = 64, kBatch = 16;

std::string config_json() {
  return fmt::format(
      R"({{"model_type": "llama", "hidden_size": {}, "num_hidden_layers": {}, "num_attention_heads": {}, )"
      R"("num_key_value_heads": {}, "head_dim": {}, "intermediate_size": {}, "vocab_size": {}, )"
      R"("tie_word_embeddings": true, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}})",
      kHidden, kLayers, kHeads, kKvHeads, kHeadDim, kMlp, kCharVocab);
}

std::string layer(std::int64_t l, const char* rest) { return "model.layers." + std::to_string(l) + "." + rest; }

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w) {
  return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-5) * w;
}

// HF Llama's rotary embedding (rotate_half form) over [B, heads, T, head_dim].
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto half = x.size(-1) / 2;
  const auto rotated = torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// Logits [B, T, vocab] of a (sub-)model given by its tensors; shapes come from the tensors.
torch::Tensor forward(const StateDict& p, const torch::Tensor& ids) {
  const auto B = ids.size(0), T = ids.size(1);
  const torch::Tensor& emb = p["model.embed_tokens.weight"];
  torch::Tensor h = emb.index_select(0, ids.flatten()).view({B, T, -1});
  const auto inv = torch::pow(10000.0, -torch::arange(0, kHeadDim, 2, torch::kFloat) / kHeadDim);
  const auto freqs = torch::outer(torch::arange(T, torch::kFloat), inv);
  const auto cos = torch::cat({freqs, freqs}, -1).cos(), sin = torch::cat({freqs, freqs}, -1).sin();
  const auto mask = torch::full({T, T}, -INFINITY).triu(1);
  for (std::int64_t l = 0; l < kLayers; ++l) {
    const torch::Tensor a = rms_norm(h, p[layer(l, "input_layernorm.weight")]);
    const torch::Tensor& wq = p[layer(l, "self_attn.q_proj.weight")];
    const torch::Tensor& wk = p[layer(l, "self_attn.k_proj.weight")];
    const auto H = wq.size(0) / kHeadDim, KV = wk.size(0) / kHeadDim;
    auto q = torch::matmul(a, wq.t()).view({B, T, H, kHeadDim}).transpose(1, 2);
    auto k = torch::matmul(a, wk.t()).view({B, T, KV, kHeadDim}).transpose(1, 2);
    auto v = torch::matmul(a, p[layer(l, "self_attn.v_proj.weight")].t()).view({B, T, KV, kHeadDim}).transpose(1, 2);
    q = rope(q, cos, sin);
    k = rope(k, cos, sin).repeat_interleave(H / KV, 1);
    v = v.repeat_interleave(H / KV, 1);
    const auto att = torch::softmax(torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(kHeadDim)) + mask, -1);
    const auto o = torch::matmul(att, v).transpose(1, 2).reshape({B, T, H * kHeadDim});
    h = h + torch::matmul(o, p[layer(l, "self_attn.o_proj.weight")].t());
    const torch::Tensor m = rms_norm(h, p[layer(l, "post_attention_layernorm.weight")]);
    const auto gate = torch::silu(torch::matmul(m, p[layer(l, "mlp.gate_proj.weight")].t()));
    const auto up = torch::matmul(m, p[layer(l, "mlp.up_proj.weight")].t());
    h = h + torch::matmul(gate * up, p[layer(l, "mlp.down_proj.weight")].t());
  }
  return torch::matmul(rms_norm(h, p["model.norm.weight"]), emb.t());
}

// The initial target: N(0, 0.02) weights (output projections scaled by 1/sqrt(2 layers)),
// unit norms, in the order of the llama preset.
StateDict initial_model(std::uint64_t seed) {
  torch::manual_seed(seed);
  const auto metas = llama_tensor_metas(parse_model_config(config_json(), "config.json"), DType::kF32);
  StateDict p;
  for (const auto& m : metas) {
    std::vector<std::int64_t> shape(m.shape.begin(), m.shape.end());
    torch::Tensor t;
    if (m.shape.rank() == 1) {
      t = torch::ones(shape);
    } else {
      const bool out_proj = m.name.find("o_proj") != std::string::npos || m.name.find("down_proj") != std::string::npos;
      t = torch::randn(shape) * (out_proj ? 0.02 / std::sqrt(2.0 * kLayers) : 0.02);
    }
    p.insert(m.name, t.contiguous());
  }
  return p;
}

void save_model(const StateDict& p, const fs::path& dir, bool with_config) {
  WriteOptions wo;
  wo.replace_existing = true;
  CheckpointWriter w(dir, wo);
  for (const auto& item : p) w.add(item.key(), view_of(item.value()));
  if (with_config) w.add_file("config.json", config_json());
  w.commit();
}

StateDict load_model(const fs::path& dir) {
  const Checkpoint c = Checkpoint::open(dir);
  StateDict p;
  for (const auto& e : c.tensors()) {
    const auto v = c.view(e.info->name);
    std::vector<std::int64_t> shape(v.shape().begin(), v.shape().end());
    p.insert(e.info->name, torch::from_blob(const_cast<std::byte*>(v.bytes()), shape, torch::kFloat).clone());
  }
  return p;
}

// Windows of `text` of kContext + 1 characters, as inputs and next-character labels.
struct Batches {
  torch::Tensor x, y;
};
Batches windows(const std::vector<std::int64_t>& text, std::int64_t stride) {
  const std::int64_t n = (static_cast<std::int64_t>(text.size()) - kContext - 1) / stride + 1;
  torch::Tensor all = torch::from_blob(const_cast<std::int64_t*>(text.data()),
                                       {static_cast<std::int64_t>(text.size())}, torch::kLong);
  torch::Tensor w = all.unfold(0, kContext + 1, stride).slice(0, 0, n);
  return {w.slice(1, 0, kContext).contiguous(), w.slice(1, 1).contiguous()};
}

double bits_per_char(const StateDict& p, const Batches& test) {
  torch::NoGradGuard no_grad;
  double nats = 0.0;
  const std::int64_t n = test.x.size(0);
  for (std::int64_t b = 0; b < n; b += 64) {
    const std::int64_t e = std::min(n, b + 64);
    const auto logits = forward(p, test.x.slice(0, b, e));
    nats += torch::nn::functional::cross_entropy(
                logits.reshape({-1, kCharVocab}), test.y.slice(0, b, e).reshape({-1}),
                torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                .item<double>();
  }
  return nats / static_cast<double>(test.y.numel()) / std::log(2.0);
}

struct Client {
  std::string name;
  std::vector<std::string> categories;
  std::string rate;  // "1/4", "1/2", "1"
  Batches train;
  std::int64_t chars = 0;
};

// The client's plan this round: every width axis at its rate, by rolling window or prefix.
std::string plan_json(const Client& c, const std::string& method, int round) {
  if (c.rate == "1") return "{}";
  const std::string policy = method == "fedrolex"
                                 ? R"("policy": "fedrolex", "round": )" + std::to_string(round) + ", "
                                 : std::string(R"("policy": "heterofl", )");
  std::string j = "{";
  for (const char* axis : {"hidden", "kv_heads", "mlp"}) {
    if (j.size() > 1) j += ", ";
    j += std::string("\"") + axis + "\": {" + policy + "\"rate\": \"" + c.rate + "\"}";
  }
  return j + "}";
}

// Local training: Adam on the sub-model's tensors, batches drawn by a per-(client, round)
// Fisher-Yates order.
void train(StateDict& p, const Batches& data, int steps, std::uint64_t seed) {
  std::vector<torch::Tensor> params;
  for (auto& item : p) {
    item.value().set_requires_grad(true);
    params.push_back(item.value());
  }
  torch::optim::Adam opt(params, torch::optim::AdamOptions(3e-3));
  const auto order = examples::shuffled(data.x.size(0), seed);
  for (int s = 0; s < steps; ++s) {
    std::vector<std::int64_t> idx;
    for (std::int64_t b = 0; b < kBatch; ++b) {
      idx.push_back(order[static_cast<std::size_t>((s * kBatch + b) % static_cast<std::int64_t>(order.size()))]);
    }
    const auto sel = torch::tensor(idx, torch::kLong);
    opt.zero_grad();
    const auto logits = forward(p, data.x.index_select(0, sel));
    const auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, kCharVocab}),
                                                           data.y.index_select(0, sel).reshape({-1}));
    loss.backward();
    opt.step();
  }
  for (auto& item : p) item.value().set_requires_grad(false);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int run_fl_demo(const FlDemoOptions& opt) {
  const int rounds = opt.quick ? 3 : opt.rounds;
  const int steps = opt.quick ? 5 : opt.local_steps;
  // One intra-op thread: on these small matrices two threads were 3x slower per step (measured
  // on the 2-core machine); the engine still uses every core.
  torch::set_num_threads(1);
  const fs::path out = opt.out;
  fs::create_directories(out);
  const fs::path corpus = opt.fortunes;

  // Six clients, two categories each; the held-out text comes from every category.
  const std::vector<std::pair<std::string, std::vector<std::string>>> holdings = {
      {"phone-a", {"computers", "science"}}, {"phone-b", {"literature", "songs-poems"}},
      {"tablet-a", {"food", "pets"}},        {"tablet-b", {"politics", "law"}},
      {"laptop-a", {"work", "education"}},   {"laptop-b", {"love", "people"}}};
  const std::vector<std::string> rates = {"1/4", "1/4", "1/2", "1/2", "1", "1"};
  std::vector<Client> clients;
  std::vector<std::int64_t> held_out;
  for (std::size_t i = 0; i < holdings.size(); ++i) {
    examples::Splits s;
    for (const auto& cat : holdings[i].second) examples::add_category(corpus / cat, s);
    Client c{holdings[i].first, holdings[i].second, rates[i], windows(s.train, kContext / 2),
             static_cast<std::int64_t>(s.train.size())};
    held_out.insert(held_out.end(), s.test.begin(), s.test.end());
    clients.push_back(std::move(c));
  }
  Batches test = windows(held_out, kContext);  // every 5th window: 1/5 of the held-out text
  test = {test.x.slice(0, 0, test.x.size(0), 5).contiguous(), test.y.slice(0, 0, test.y.size(0), 5).contiguous()};
  const StateDict init = initial_model(opt.seed);
  std::int64_t n_params = 0;
  for (const auto& item : init) n_params += item.value().numel();
  fmt::print("edgefuse demo: federated learning of a character-level Llama ({} parameters: hidden {}, "
             "{} layers, {} heads over {} KV heads, MLP {}, tied embeddings) on the Debian fortunes "
             "corpus\n", n_params, kHidden, kLayers, kHeads, kKvHeads, kMlp);
  for (const auto& c : clients) {
    fmt::print("  client {:<9} width {:<3} categories {:<22} {:>7} training chars\n", c.name, c.rate,
               c.categories[0] + ", " + c.categories[1], c.chars);
  }
  fmt::print("{} rounds of {} local Adam steps (batches of {} x {} characters); held-out text: {} "
             "characters of every category\n\n", rounds, steps, kBatch, kContext, test.y.numel());

  const std::vector<std::string> methods = {"fedrolex", "heterofl", "largest"};
  std::map<std::string, std::vector<double>> bpc;
  const auto layout = Schema::preset("llama", parse_model_config(config_json(), "config.json"))
                          .bind(llama_tensor_metas(parse_model_config(config_json(), "config.json"), DType::kF32));
  const auto t_all = std::chrono::steady_clock::now();
  for (const auto& method : methods) {
    const auto t0 = std::chrono::steady_clock::now();
    const fs::path dir = out / method;
    fs::remove_all(dir);
    fs::create_directories(dir);
    save_model(init, dir / "global-0", true);
    bpc[method].push_back(bits_per_char(init, test));
    for (int r = 0; r < rounds; ++r) {
      const fs::path target = dir / ("global-" + std::to_string(r % 2));
      const fs::path next = dir / ("global-" + std::to_string((r + 1) % 2));
      const Checkpoint global = Checkpoint::open(target);
      const fs::path round_dir = dir / "round";
      fs::remove_all(round_dir);
      fs::create_directories(round_dir);
      std::string job_clients;
      for (std::size_t k = 0; k < clients.size(); ++k) {
        const Client& c = clients[k];
        if (method == "largest" && c.rate != "1") continue;
        const std::string plan_text = plan_json(c, method, r);
        const Plan plan = parse_plan(plan_text, layout, c.name);
        StateDict local = extract_state_dict(views_of(global), layout, plan, DType::kF32);
        StateDict before;
        for (const auto& item : local) before.insert(item.key(), item.value().clone());
        train(local, c.train, steps, opt.seed * 1000003 + k * 1009 + static_cast<std::uint64_t>(r));
        StateDict delta;
        for (const auto& item : local) delta.insert(item.key(), (item.value() - before[item.key()]).contiguous());
        save_model(delta, round_dir / (c.name + ".update"), false);
        std::ofstream(round_dir / (c.name + ".plan.json")) << plan_text;
        job_clients += fmt::format(R"({}{{"name": "{}", "update": "{}.update", "plan": "{}.plan.json", "weight": {}}})",
                                   job_clients.empty() ? "" : ", ", c.name, c.name, c.name, c.chars);
      }
      const fs::path job = round_dir / "job.json";
      std::ofstream(job) << fmt::format(
          R"({{"target": "{}", "schema": "llama", "output": "{}", "replace": true, "mode": "delta", )"
          R"("memory_budget": "64MiB", "clients": [{}]}})",
          fs::absolute(target).string(), fs::absolute(next).string(), job_clients);
      const FusionReport rep = run_fusion(parse_fusion_job(job));
      if (!rep.rejected.empty()) {
        fmt::print(stderr, "round {}: client {} rejected: {}\n", r, rep.rejected[0].name, rep.rejected[0].reason);
      }
      bpc[method].push_back(bits_per_char(load_model(next), test));
    }
    fmt::print("{:<9} {} rounds in {:.1f} s\n", method, rounds, seconds_since(t0));
  }

  // The table: bits per character by round.
  std::ofstream tsv(out / "bpc.tsv");
  tsv << "round\tfedrolex\theterofl\tlargest\n";
  fmt::print("\nheld-out bits per character (lower is better)\n{:>5} {:>9} {:>9} {:>9}\n", "round",
             "fedrolex", "heterofl", "largest");
  for (int r = 0; r <= rounds; ++r) {
    const auto row = fmt::format("{:>5} {:>9.3f} {:>9.3f} {:>9.3f}", r, bpc["fedrolex"][r], bpc["heterofl"][r],
                                 bpc["largest"][r]);
    if (r == 0 || r == rounds || r % 5 == 0 || opt.quick) fmt::print("{}\n", row);
    tsv << r << '\t' << bpc["fedrolex"][r] << '\t' << bpc["heterofl"][r] << '\t' << bpc["largest"][r] << '\n';
  }
  tsv.close();
  const std::string best = bpc["fedrolex"].back() <= bpc["heterofl"].back() ? "fedrolex" : "heterofl";
  fmt::print("after {} rounds: fedrolex {:.3f}, heterofl {:.3f}, largest tier alone {:.3f} bits/char; "
             "all tiers ({}) vs largest tier alone: {:+.3f}\n",
             rounds, bpc["fedrolex"].back(), bpc["heterofl"].back(), bpc["largest"].back(), best,
             bpc[best].back() - bpc["largest"].back());

  // The plot, by gnuplot (Debian gnuplot-nox).
  std::ofstream(out / "bpc.gp")
      << "set terminal pngcairo size 800,500\nset output 'bpc.png'\n"
         "set title 'edgefuse demo: held-out bits per character by round'\n"
         "set xlabel 'round'\nset ylabel 'bits per character'\nset key top right\nset grid\n"
         "plot 'bpc.tsv' using 1:2 with linespoints title 'FedRolex (all tiers)', "
         "'' using 1:3 with linespoints title 'HeteroFL (all tiers)', "
         "'' using 1:4 with linespoints title 'largest tier alone'\n";
  const std::string cmd = "cd '" + fs::absolute(out).string() + "' && gnuplot bpc.gp 2>/dev/null";
  if (std::system(cmd.c_str()) == 0 && fs::exists(out / "bpc.png")) {
    fmt::print("plot: {}\n", (out / "bpc.png").string());
  } else {
    fmt::print("plot: not drawn (gnuplot is not installed: apt-get install gnuplot-nox); data in {}\n",
               (out / "bpc.tsv").string());
  }
  fmt::print("total {:.1f} s\n", seconds_since(t_all));
  return 0;
}

}  // namespace edgefuse::lab
