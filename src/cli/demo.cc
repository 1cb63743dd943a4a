// `edgefuse demo`: one FedRolex-style fusion round over an in-memory Llama-shaped target.
//
// Each client owns a rolling window (Alam et al., FedRolex, NeurIPS 2022) of half of every
// width axis: hidden size, attention heads, KV heads and MLP width; the vocabulary is shared.
// Client k's windows start k/8 of the way along each axis and wrap around, so a window is
// one or two runs. A client's update to a 2-D weight is the dense [rows in window, columns
// in window] block; flattened, the block's rows are the runs of accumulate_runs. The fused
// target is the coverage-weighted FedAvg of the deltas (finalize, delta mode, lr 1).
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include "edgefuse/edgefuse.h"
#include "src/cli/commands.h"

namespace edgefuse::cli {
namespace {

struct DemoOptions {
  std::string scale = "small";  // "small" (~56M params) or "tiny" (for tests)
  std::size_t clients = 8;
  std::size_t samples = 100000;  // elements recomputed by the scalar check
  std::uint64_t seed = 2026;
};

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Config {
  std::size_t hidden, layers, heads, kv_heads, head_dim, mlp, vocab;
};

Config config_for(const std::string& scale) {
  if (scale == "tiny") return {64, 2, 4, 2, 16, 176, 1000};
  return {512, 8, 8, 4, 64, 1408, 32000};  // 56.2M parameters
}

// A window of `width` positions out of `size`, starting at `start`, in units of `unit`
// (a head is head_dim rows). Wraps around the end of the axis.
std::vector<Run> window(std::size_t size, std::size_t width, std::size_t start, std::size_t unit) {
  start %= size;
  std::vector<Run> runs;
  const std::size_t first = std::min(width, size - start);
  runs.push_back({start * unit, first * unit});
  if (first < width) runs.push_back({0, (width - first) * unit});
  return runs;
}

std::size_t total_length(const std::vector<Run>& runs) {
  std::size_t n = 0;
  for (const Run& r : runs) n += r.length;
  return n;
}

// Which window of each axis a tensor dimension follows.
enum class Axis { kFull, kHidden, kHeads, kKvHeads, kMlp };

struct TargetTensor {
  std::string name;
  std::size_t rows, cols;  // cols == 1 for vectors
  Axis row_axis, col_axis;
  Tensor weight;  // bf16, rows x cols
};

struct ClientBlock {
  std::vector<Run> runs;  // into the flattened tensor
  Tensor delta;           // bf16, packed in run order
};

// Counter-based random values: the same (seed, stream, index) gives the same value whatever
// the thread count.
float hashed_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
  std::uint64_t z = seed ^ (stream * 0x9E3779B97F4A7C15ull) ^ (i + 0x632BE59BD9B4E019ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-23f - 1.0f;  // [-1, 1)
}

void fill_random(BFloat16* p, std::size_t n, float scale, std::uint64_t seed,
                 std::uint64_t stream) {
  parallel_for(n, std::size_t{1} << 16, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) p[i] = to_bf16(scale * hashed_uniform(seed, stream, i));
  });
}

struct Row {
  std::string step;
  double params, seconds, bytes;
};

int run_demo(const DemoOptions& opt) {
  const Config c = config_for(opt.scale);
  const std::size_t K = opt.clients;
  fmt::print(
      "edgefuse demo: Llama-shaped bf16 target ({} layers, hidden {}, {} heads / {} KV "
      "heads of {}, MLP {}, vocab {})\n",
      c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.mlp, c.vocab);
  std::vector<Row> rows;

  // The roofline every step is compared with.
  const std::size_t triad_n = opt.scale == "tiny" ? (std::size_t{1} << 20) : (std::size_t{1} << 25);
  const double triad_bw = measure_triad_bytes_per_second(triad_n, 5);
  rows.push_back({"STREAM triad (best of 5)", static_cast<double>(triad_n),
                  12.0 * triad_n / triad_bw, 12.0 * triad_n});

  // ---- the target
  auto t0 = Clock::now();
  std::vector<TargetTensor> target;
  auto add = [&](std::string name, std::size_t r, std::size_t cols, Axis ra, Axis ca) {
    target.push_back({std::move(name), r, cols, ra, ca, Tensor::empty(DType::kBF16, {r, cols})});
  };
  const std::size_t qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim;
  add("model.embed_tokens.weight", c.vocab, c.hidden, Axis::kFull, Axis::kHidden);
  for (std::size_t l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "self_attn.q_proj.weight", qd, c.hidden, Axis::kHeads, Axis::kHidden);
    add(p + "self_attn.k_proj.weight", kvd, c.hidden, Axis::kKvHeads, Axis::kHidden);
    add(p + "self_attn.v_proj.weight", kvd, c.hidden, Axis::kKvHeads, Axis::kHidden);
    add(p + "self_attn.o_proj.weight", c.hidden, qd, Axis::kHidden, Axis::kHeads);
    add(p + "mlp.gate_proj.weight", c.mlp, c.hidden, Axis::kMlp, Axis::kHidden);
    add(p + "mlp.up_proj.weight", c.mlp, c.hidden, Axis::kMlp, Axis::kHidden);
    add(p + "mlp.down_proj.weight", c.hidden, c.mlp, Axis::kHidden, Axis::kMlp);
    add(p + "input_layernorm.weight", c.hidden, 1, Axis::kHidden, Axis::kFull);
    add(p + "post_attention_layernorm.weight", c.hidden, 1, Axis::kHidden, Axis::kFull);
  }
  add("model.norm.weight", c.hidden, 1, Axis::kHidden, Axis::kFull);
  add("lm_head.weight", c.vocab, c.hidden, Axis::kFull, Axis::kHidden);
  std::size_t target_params = 0;
  for (std::size_t t = 0; t < target.size(); ++t) {
    TargetTensor& tt = target[t];
    fill_random(tt.weight.view().data_as<BFloat16>(), tt.weight.numel(), 0.05f, opt.seed, t);
    target_params += tt.weight.numel();
  }
  rows.push_back(
      {"build target", static_cast<double>(target_params), seconds_since(t0), 2.0 * target_params});
  fmt::print("target: {} tensors, {:.1f}M parameters, {:.1f} MB in bf16\n", target.size(),
             target_params / 1e6, 2.0 * target_params / 1e6);

  // ---- the clients' rolling windows and updates
  t0 = Clock::now();
  auto axis_window = [&](Axis a, std::size_t k, std::size_t full) -> std::vector<Run> {
    switch (a) {
      case Axis::kHidden:
        return window(c.hidden, c.hidden / 2, k * c.hidden / 8, 1);
      case Axis::kHeads:
        return window(c.heads, c.heads / 2, k * c.heads / 8, c.head_dim);
      case Axis::kKvHeads:
        return window(c.kv_heads, c.kv_heads / 2, k * c.kv_heads / 8, c.head_dim);
      case Axis::kMlp:
        return window(c.mlp, c.mlp / 2, k * c.mlp / 8, 1);
      case Axis::kFull:
        break;
    }
    return {{0, full}};
  };
  std::vector<float> client_weight(K);
  std::vector<std::vector<ClientBlock>> blocks(K);  // [client][tensor]
  std::size_t client_params = 0;
  for (std::size_t k = 0; k < K; ++k) {
    client_weight[k] = static_cast<float>(1 + k % 3);  // e.g. local sample counts
    for (std::size_t t = 0; t < target.size(); ++t) {
      const TargetTensor& tt = target[t];
      const std::vector<Run> rr = axis_window(tt.row_axis, k, tt.rows);
      const std::vector<Run> cr = axis_window(tt.col_axis, k, tt.cols);
      ClientBlock b;
      for (const Run& r : rr) {
        for (std::size_t i = r.dst_start; i < r.dst_start + r.length; ++i) {
          for (const Run& col : cr) b.runs.push_back({i * tt.cols + col.dst_start, col.length});
        }
      }
      const std::size_t n = total_length(b.runs);
      b.delta = Tensor::empty(DType::kBF16, {n});
      fill_random(b.delta.view().data_as<BFloat16>(), n, 0.01f, opt.seed + 1 + k, t);
      client_params += n;
      blocks[k].push_back(std::move(b));
    }
  }
  rows.push_back({"make client updates", static_cast<double>(client_params), seconds_since(t0),
                  2.0 * client_params});
  fmt::print(
      "clients: {} with rolling windows of half of every width axis, {:.1f}M update "
      "values in all\n",
      K, client_params / 1e6);

  // ---- sample elements for the scalar check, with their old values
  struct Sample {
    std::size_t tensor, index;
    BFloat16 base;
  };
  std::mt19937_64 rng(opt.seed);
  std::vector<Sample> samples;
  for (std::size_t s = 0; s < opt.samples; ++s) {
    const std::size_t t = rng() % target.size();
    const std::size_t i = rng() % target[t].weight.numel();
    samples.push_back({t, i, target[t].weight.view().data_as<BFloat16>()[i]});
  }

  // ---- fuse: per tensor, every client in a fixed order, then finalize in place
  double acc_seconds = 0, fin_seconds = 0, acc_bytes = 0;
  std::size_t acc_params = 0;
  const auto fuse_t0 = Clock::now();
  std::size_t max_len = 0;
  for (const auto& cb : blocks)
    for (const auto& b : cb) max_len = std::max<std::size_t>(max_len, b.delta.numel());
  const std::vector<float> ones(max_len, 1.0f);
  for (std::size_t t = 0; t < target.size(); ++t) {
    TargetTensor& tt = target[t];
    const std::size_t n = tt.weight.numel();
    Tensor acc = Tensor::zeros(DType::kF32, {n});
    Tensor wsum = Tensor::zeros(DType::kF32, {n});
    float* a = acc.view().data_as<float>();
    float* ws = wsum.view().data_as<float>();
    auto t1 = Clock::now();
    for (std::size_t k = 0; k < K; ++k) {
      const ClientBlock& b = blocks[k][t];
      const std::size_t len = b.delta.numel();
      accumulate_runs(a, n, b.delta.view().data_as<BFloat16>(), len, b.runs.data(), b.runs.size(),
                      client_weight[k]);
      accumulate_runs(ws, n, ones.data(), len, b.runs.data(), b.runs.size(), client_weight[k]);
      acc_params += len;
      acc_bytes += len * (2.0 + 8.0) + len * (4.0 + 8.0);
    }
    acc_seconds += seconds_since(t1);
    t1 = Clock::now();
    BFloat16* w = tt.weight.view().data_as<BFloat16>();
    finalize(w, w, a, ws, n, FinalizeMode::kDelta, 1.0f);
    fin_seconds += seconds_since(t1);
  }
  const double fuse_seconds = seconds_since(fuse_t0);
  rows.push_back({"accumulate (runs, bf16 + weights)", static_cast<double>(acc_params), acc_seconds,
                  acc_bytes});
  rows.push_back({"finalize (delta, bf16, in place)", static_cast<double>(target_params),
                  fin_seconds, 12.0 * target_params});
  rows.push_back({"fuse total (with zeroing)", static_cast<double>(target_params), fuse_seconds,
                  acc_bytes + 12.0 * target_params + 8.0 * target_params});

  // ---- scalar recomputation of the sampled elements
  t0 = Clock::now();
  std::size_t mismatches = 0, uncovered = 0;
  for (const Sample& s : samples) {
    const TargetTensor& tt = target[s.tensor];
    float acc = 0.0f, wsum = 0.0f;
    for (std::size_t k = 0; k < K; ++k) {
      const ClientBlock& b = blocks[k][s.tensor];
      std::size_t offset = 0;
      for (const Run& r : b.runs) {
        if (s.index >= r.dst_start && s.index < r.dst_start + r.length) {
          const float x =
              to_f32(b.delta.view().data_as<BFloat16>()[offset + s.index - r.dst_start]);
          const float wx = client_weight[k] * x;
          acc = acc + wx;
          wsum = wsum + client_weight[k];
          break;
        }
        offset += r.length;
      }
    }
    BFloat16 want = s.base;
    if (wsum > 0.0f) {
      const float q = acc / wsum;
      want = to_bf16(to_f32(s.base) + 1.0f * q);
    } else {
      ++uncovered;
    }
    if (tt.weight.view().data_as<BFloat16>()[s.index].bits != want.bits) ++mismatches;
  }
  rows.push_back({"verify (scalar recomputation)", static_cast<double>(samples.size()),
                  seconds_since(t0), 0.0});

  fmt::print("SIMD target {}, {} thread(s)\n\n", simd_target_name(), num_threads());
  fmt::print("{:<36} {:>12} {:>10} {:>9} {:>9}\n", "step", "params", "seconds", "GB/s", "of triad");
  for (const Row& r : rows) {
    const double gbs = r.bytes > 0 && r.seconds > 0 ? r.bytes / r.seconds / 1e9 : 0.0;
    const std::string frac = r.bytes > 0 ? fmt::format("{:.2f}", gbs * 1e9 / triad_bw) : "-";
    const std::string gb = r.bytes > 0 ? fmt::format("{:.2f}", gbs) : "-";
    fmt::print("{:<36} {:>12} {:>10.4f} {:>9} {:>9}\n", r.step, static_cast<std::size_t>(r.params),
               r.seconds, gb, frac);
  }
  fmt::print(
      "\nverify: {} sampled elements ({} uncovered) recomputed in scalar f32, mismatches {}\n",
      samples.size(), uncovered, mismatches);
  return mismatches == 0 ? 0 : 1;
}
}  // namespace

Command add_demo(CLI::App& app) {
  auto opt = std::make_shared<DemoOptions>();
  auto threads = std::make_shared<std::size_t>(num_threads());
  auto synthetic = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand(
      "demo",
      "One FedRolex round over a ~56M-parameter bf16 target in memory, verified against "
      "a scalar recomputation (the federated-learning demo that trains with LibTorch is "
      "`edgefuse-lab demo`)");
  cmd->add_flag("--synthetic", *synthetic,
                "Accepted for compatibility: this is the only demo here");
  cmd->add_option("--scale", opt->scale, "Synthetic: target size, small (~56M params) or tiny")
      ->check(CLI::IsMember({"small", "tiny"}));
  cmd->add_option("--clients", opt->clients, "Number of clients")
      ->check(CLI::Range(std::size_t{1}, std::size_t{64}));
  cmd->add_option("--samples", opt->samples, "Elements checked against the scalar path")
      ->check(CLI::Range(std::size_t{1}, std::size_t{100000000}));
  cmd->add_option("--seed", opt->seed, "Seed of the random target and updates");
  add_threads_option(cmd, *threads);
  return {cmd, [opt, threads] {
            set_num_threads(*threads);
            return run_demo(*opt);
          }};
}

}  // namespace edgefuse::cli
