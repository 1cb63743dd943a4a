// A fusion round over generated tensors (engine/simulate.h).
#include "edgefuse/engine/simulate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "edgefuse/core/dtype.h"
#include "edgefuse/aggregate/tile_memory.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/extract/extract.h"
#include "edgefuse/kernels/convert.h"
#include "edgefuse/kernels/triad.h"
#include "edgefuse/plan/plan.h"
#include "src/core/splitmix.h"
#include "src/plan/slicing.h"
#include "src/engine/simulate_values.h"
#include "src/kernels/generate.h"

namespace edgefuse {

using detail::fail;

namespace {

using detail::kSimDeltaScale;
using detail::kSimTargetScale;
using detail::sim_client_key;
using detail::sim_client_plan_json;
using detail::sim_client_weight;
using detail::sim_state_key;
using detail::sim_target_key;
// Target elements made at a time: a chunk of rows, its bf16 copy and the fused bf16 output.
constexpr std::uint64_t kMaxChunkElements = std::uint64_t{4} << 20;

std::uint64_t round_up(std::uint64_t x, std::uint64_t m) { return (x + m - 1) / m * m; }

std::uint64_t llama_params(const ModelConfig& c) {
  std::uint64_t n = 0;
  for (const auto& m : llama_tensor_metas(c, DType::kBF16)) n += m.shape.numel();
  return n;
}

// The Llama shape of this hidden size closest to `params`, and its exact parameter count
// (from the counts of one and two layers, so a huge layer count is never materialised).
std::pair<ModelConfig, std::uint64_t> shape_for(std::uint64_t hidden, double params) {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden = hidden;
  c.head_dim = std::min<std::uint64_t>(128, hidden / 4);
  c.heads = hidden / c.head_dim;
  c.kv_heads = 1;
  for (std::uint64_t k = std::min<std::uint64_t>(8, c.heads); k >= 1; --k) {
    if (c.heads % k == 0) {
      c.kv_heads = k;
      break;
    }
  }
  c.intermediate = round_up(hidden * 7 / 2, 256);
  const double vocab_cap = params / 8.0 / 2.0 / static_cast<double>(hidden);
  c.vocab = static_cast<std::uint64_t>(std::min(32000.0, std::floor(vocab_cap / 64.0) * 64.0));
  c.vocab = std::max<std::uint64_t>(c.vocab, 64);
  c.layers = 1;
  const std::uint64_t one = llama_params(c);  // embeddings, head, final norm, one layer
  c.layers = 2;
  const std::uint64_t per_layer = llama_params(c) - one;
  const double rest = params - static_cast<double>(one - per_layer);
  c.layers = static_cast<std::uint64_t>(
      std::clamp(std::round(rest / static_cast<double>(per_layer)), 1.0, 1e6));
  return {c, one + (c.layers - 1) * per_layer};
}

std::uint64_t peak_rss() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

// A sampled row: the target's row as generated and the engine's fused row.
struct Check {
  std::size_t tensor;
  std::uint64_t row;
  std::vector<BFloat16> base, got;
};

// The scalar reference for the sampled rows: every covering client's generated value added
// in client order as acc = fl(acc + fl(w * x)), wsum = fl(wsum + w) (the plan's index maps
// from slice_of), then the delta finalize written out: out = base + lr * (acc / wsum) rounded
// once to bf16; uncovered elements and a zero increment keep base. Clients are the outer loop,
// so only one client's index lists exist at a time.
void verify_checks(const SimulationShape& shape, const SimulationOptions& o,
                   const ModelLayout& layout, const std::vector<Check>& checks) {
  std::vector<std::vector<float>> acc(checks.size()), wsum(checks.size());
  for (std::size_t k = 0; k < checks.size(); ++k) {
    acc[k].assign(checks[k].base.size(), -0.0f);
    wsum[k].assign(checks[k].base.size(), 0.0f);
  }
  for (std::size_t c = 0; c < o.clients; ++c) {
    const detail::PlanLists lists(
        layout, parse_plan(sim_client_plan_json(shape, c, o.round), layout, "client"));
    const float w = sim_client_weight(c);
    for (std::size_t k = 0; k < checks.size(); ++k) {
      const auto& t = layout.tensors()[checks[k].tensor];
      const detail::Slice s = detail::slice_of(layout, t, lists, true);
      if (!s.included) continue;
      const bool matrix = t.meta.shape.rank() >= 2;
      std::uint64_t lrow = 0;
      if (matrix) {
        const auto& rows = s.elems[0];
        const auto it = std::find(rows.begin(), rows.end(), checks[k].row);
        if (it == rows.end()) continue;
        lrow = static_cast<std::uint64_t>(it - rows.begin());
      }
      const std::vector<std::uint32_t>& cols = matrix ? s.elems[1] : s.elems[0];
      const std::uint64_t key = sim_client_key(o.seed, c, checks[k].tensor);
      for (std::size_t lc = 0; lc < cols.size(); ++lc) {
        const float x = detail::uniform_at(key, lrow * cols.size() + lc, kSimDeltaScale);
        const float p = w * x;
        acc[k][cols[lc]] = acc[k][cols[lc]] + p;
        wsum[k][cols[lc]] = wsum[k][cols[lc]] + w;
      }
    }
  }
  for (std::size_t k = 0; k < checks.size(); ++k) {
    const Check& ch = checks[k];
    for (std::size_t j = 0; j < ch.base.size(); ++j) {
      BFloat16 want = ch.base[j];
      if (wsum[k][j] > 0.0f) {
        const float q = acc[k][j] / wsum[k][j];
        const float inc = o.server_lr * q;
        if (inc != 0.0f) want = to_bf16(to_f32(ch.base[j]) + inc);
      }
      if (want.bits != ch.got[j].bits) {
        fail("verify: '", layout.tensors()[ch.tensor].meta.name, "' row ", ch.row, " column ", j,
             ": the engine gives bf16 bits ", ch.got[j].bits, " but the scalar reference ",
             want.bits);
      }
    }
  }
}

}  // namespace

// Client c's plan: rolling windows of the chosen width over hidden, KV groups and MLP, and of
// the chosen depth over layers. Clients take the layer windows first (c mod S_l, S_l windows
// tile the layers), then the hidden windows, then the KV-group and MLP windows, so that the
// round's clients cover different blocks of every weight before any block twice.
std::string detail::sim_client_plan_json(const SimulationShape& s, std::size_t c,
                                         std::uint64_t round) {
  const ModelConfig& t = s.target;
  const Rational w = s.client.width;
  const std::uint64_t kl = s.client.layers, kh = w.count(t.hidden), kg = w.count(t.kv_heads),
                      kf = w.count(t.intermediate);
  const std::uint64_t sl = (t.layers + kl - 1) / kl, sh = (t.hidden + kh - 1) / kh,
                      sg = (t.kv_heads + kg - 1) / kg;
  const std::uint64_t slot_l = c % sl, slot_h = c / sl % sh, slot_g = c / sl / sh % sg;
  auto window = [&](const char* axis, std::uint64_t n, std::uint64_t count, std::uint64_t slot) {
    return std::string("\"") + axis +
           "\": {\"policy\": \"rolling\", \"count\": " + std::to_string(count) +
           ", \"round\": " + std::to_string(round) +
           ", \"offset\": " + std::to_string(slot * count % n) + "}";
  };
  return "{" + window("hidden", t.hidden, kh, slot_h) + ", " +
         window("kv_heads", t.kv_heads, kg, slot_g) + ", " +
         window("mlp", t.intermediate, kf, slot_g) + ", " + window("layers", t.layers, kl, slot_l) +
         "}";
}

ModelConfig llama_config_for(double params) {
  if (!(params >= 1e5) || !(params <= 1e13)) {
    fail("target size of ", params, " parameters is outside [1e5, 1e13]");
  }
  ModelConfig best;
  double best_score = std::numeric_limits<double>::infinity();
  for (std::uint64_t h : {64,   128,  256,  384,  512,  768,  1024,  1536,  2048,  2560, 3072,
                          4096, 5120, 6144, 7168, 8192, 9216, 10240, 12288, 14336, 16384}) {
    const auto [c, count] = shape_for(h, params);
    const double n = static_cast<double>(count);
    const double size_err = std::fabs(n - params) / params;
    const double aspect =
        std::fabs(std::log(static_cast<double>(h) / static_cast<double>(c.layers) / 110.0));
    const double score = aspect + 50.0 * std::max(0.0, size_err - 0.01);  // size first, then aspect
    if (score < best_score) {
      best_score = score;
      best = c;
    }
  }
  return best;
}

SimulationShape simulation_shape(const SimulationOptions& o) {
  if (o.clients == 0 || o.clients > 1000000) fail("clients = ", o.clients, " must be in [1, 10^6]");
  SimulationShape s;
  s.target = llama_config_for(o.target_params);
  s.target_params = shape_for(s.target.hidden, o.target_params).second;
  s.tensors = llama_tensor_metas(s.target, DType::kBF16).size();
  if (!(o.client_params >= 1) || o.client_params > static_cast<double>(s.target_params)) {
    fail("client size of ", o.client_params, " parameters must be in [1, target size ",
         s.target_params, "]");
  }
  s.client = choose_budget(s.target, static_cast<std::uint64_t>(o.client_params));
  return s;
}

SimulationReport run_simulation(const SimulationOptions& o, const SimulationSink& sink,
                                const std::function<void(const SimulationProgress&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  const ScopedNumThreads threads_for_this_run(o.threads);  // the caller's count comes back on exit
  if (!(o.server_lr - o.server_lr == 0.0f)) fail("server_lr = ", o.server_lr, " is not finite");

  SimulationReport rep;
  rep.shape = simulation_shape(o);
  rep.clients = o.clients;
  rep.threads = num_threads();
  rep.memory_budget = o.memory_budget;
  const SimulationShape& shape = rep.shape;

  if (o.verify_rows > 0 && (o.robust || o.server)) {
    fail(
        "simulate: verify recomputes the weighted mean; it does not check a robust aggregate or "
        "a server optimizer's step");
  }
  const bool has_v = o.server && server_rule_has_v(o.server->rule);
  // Memory: a chunk of target rows in bf16 twice (base and fused) and its f32 scratch, with a
  // server optimizer its m (and v) rows, plus one tile per thread; the clients' plans (index
  // lists) come on top, counted in peak RSS.
  const std::uint64_t per_chunk_element = 8 + (o.server ? (has_v ? 8 : 4) : 0);
  rep.chunk_elements =
      std::min<std::uint64_t>(kMaxChunkElements, o.memory_budget / 4 / per_chunk_element);
  const std::uint64_t fixed = rep.chunk_elements * per_chunk_element;
  if (o.memory_budget < fixed + rep.threads * tile_bytes_per_element(true) * kMinTileElements ||
      rep.chunk_elements < 4096) {
    fail("memory budget of ", o.memory_budget,
         " bytes is too small for a chunk of target rows and ", rep.threads, " tiles");
  }
  rep.tile_elements = tile_elements_for((o.memory_budget - fixed) / 4, rep.threads, true);

  const auto metas = llama_tensor_metas(shape.target, DType::kBF16);
  const ModelLayout layout = Schema::preset("llama", shape.target).bind(metas);
  AggregateOptions ao;
  ao.mode = AggregateMode::kDelta;
  ao.server_lr = o.server_lr;
  ao.tile_elements = rep.tile_elements;
  ao.robust = o.robust;
  if (o.server) {
    ao.server = *o.server;
    ao.server->delta = true;
  }
  Aggregator agg(layout, ao);
  // The clients' plans and one tensor's row lists count against the budget too, checked as
  // each client is added: a client count that cannot fit fails before it builds more state
  // than the budget holds.
  const std::uint64_t working =
      fixed + rep.threads * rep.tile_elements * tile_bytes_per_element(true);
  for (std::size_t c = 0; c < o.clients; ++c) {
    Plan plan =
        parse_plan(sim_client_plan_json(shape, c, o.round), layout, "client " + std::to_string(c));
    for (const auto& ct : client_tensors(layout, plan)) rep.client_values += ct.shape.numel();
    const std::uint64_t seed = o.seed;
    agg.add_rows(std::move(plan), sim_client_weight(c), "client " + std::to_string(c),
                 [seed, c](std::size_t ti, const std::uint32_t* rows, std::size_t n,
                           std::size_t row_len, float* dst) {
                   const std::uint64_t key = sim_client_key(seed, c, ti);
                   for (std::size_t r = 0; r < n; ++r) {
                     detail::generate_uniform(dst + r * row_len, row_len, key,
                                              std::uint64_t{rows[r]} * row_len, kSimDeltaScale);
                   }
                 });
    rep.client_state_bytes = agg.resident_bytes();
    if (working + rep.client_state_bytes > o.memory_budget) {
      const double all = static_cast<double>(rep.client_state_bytes) / static_cast<double>(c + 1) *
                         static_cast<double>(o.clients);
      fail("memory budget: after ", c + 1, " of ", o.clients,
           " clients their plans and row lists "
           "need ",
           rep.client_state_bytes, " bytes (all ", o.clients, " would need about ",
           static_cast<std::uint64_t>(all), "), which with ", working,
           " bytes of target chunks and tiles exceeds the memory budget of ", o.memory_budget,
           " bytes; raise --memory-budget or simulate fewer clients");
    }
  }
  rep.triad_bytes_per_second =
      measure_triad_if_memory_allows(static_cast<std::size_t>(std::min<std::uint64_t>(
                                         std::uint64_t{1} << 23, o.memory_budget / 4 / 12)),
                                     3);
  rep.bytes_moved = 2 * (2 * shape.target_params + rep.client_values) +
                    (o.server ? 2 * (has_v ? 8 : 4) * shape.target_params : 0);

  // Rows to verify: (tensor, row) pairs drawn from the seed, spread over the model.
  std::vector<std::vector<std::uint64_t>> verify(metas.size());
  {
    const std::uint64_t st = detail::stream_state(o.seed, "simulate/verify");
    for (std::size_t k = 0; k < o.verify_rows; ++k) {
      const std::size_t ti =
          static_cast<std::size_t>(detail::splitmix_at(st, 2 * k) % metas.size());
      const std::uint64_t rows = metas[ti].shape.rank() >= 2 ? metas[ti].shape[0] : 1;
      verify[ti].push_back(detail::splitmix_at(st, 2 * k + 1) % rows);
    }
  }
  std::vector<Check> checks;
  rep.setup_seconds = since(t0);

  const auto t1 = std::chrono::steady_clock::now();
  SimulationProgress prog;
  prog.tensors_total = metas.size();
  prog.params_total = shape.target_params;
  std::vector<BFloat16> base, out;
  std::vector<float> m_rows, v_rows;
  for (std::size_t ti = 0; ti < metas.size(); ++ti) {
    const auto& m = metas[ti];
    const std::uint64_t rows = m.shape.rank() >= 2 ? m.shape[0] : 1;
    const std::uint64_t row_len = rows ? m.shape.numel() / rows : 0;
    const std::uint64_t chunk_rows =
        std::max<std::uint64_t>(1, rep.chunk_elements / std::max<std::uint64_t>(row_len, 1));
    const std::uint64_t key = sim_target_key(o.seed, ti);
    for (std::uint64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
      const std::uint64_t r1 = std::min(rows, r0 + chunk_rows);
      const std::size_t n = static_cast<std::size_t>((r1 - r0) * row_len);
      base.resize(n);
      out.resize(n);
      parallel_for(n, std::size_t{1} << 16, [&](std::size_t b, std::size_t e) {
        thread_local std::vector<float> f;
        f.resize(e - b);
        detail::generate_uniform(f.data(), e - b, key, r0 * row_len + b, kSimTargetScale);
        convert(f.data(), base.data() + b, e - b);
      });
      if (o.server) {  // the previous state, generated like the target
        m_rows.resize(n);
        v_rows.resize(has_v ? n : 0);
        const std::uint64_t mk = sim_state_key(o.seed, ti, 0), vk = sim_state_key(o.seed, ti, 1);
        parallel_for(n, std::size_t{1} << 16, [&](std::size_t b, std::size_t e) {
          detail::generate_uniform(m_rows.data() + b, e - b, mk, r0 * row_len + b, 1e-3f);
          if (!has_v) return;
          detail::generate_uniform(v_rows.data() + b, e - b, vk, r0 * row_len + b, 5e-7f);
          for (std::size_t i = b; i < e; ++i) v_rows[i] += 5e-7f;  // in [0, 1e-6]
        });
      }
      agg.compute_rows(ti, reinterpret_cast<const std::byte*>(base.data()), r0, r1,
                       reinterpret_cast<std::byte*>(out.data()), o.server ? m_rows.data() : nullptr,
                       has_v ? v_rows.data() : nullptr);
      for (const std::uint64_t r : verify[ti]) {
        if (r < r0 || r >= r1) continue;
        const BFloat16* b = base.data() + (r - r0) * row_len;
        const BFloat16* g = out.data() + (r - r0) * row_len;
        checks.push_back(
            {ti, r, std::vector<BFloat16>(b, b + row_len), std::vector<BFloat16>(g, g + row_len)});
      }
      if (sink) {
        sink(ti, m.name, reinterpret_cast<const std::byte*>(out.data()), n * sizeof(BFloat16));
        if (o.server) {
          sink(ti, m.name + ".m", reinterpret_cast<const std::byte*>(m_rows.data()), n * 4);
          if (has_v)
            sink(ti, m.name + ".v", reinterpret_cast<const std::byte*>(v_rows.data()), n * 4);
        }
      }
      prog.params_done += n;
      if (r1 == rows) ++prog.tensors_done;
      if (progress) {
        prog.seconds = since(t1);
        progress(prog);
      }
    }
  }
  rep.seconds = since(t1);
  for (const auto& c : agg.report()) rep.covered += c.covered;
  rep.peak_rss_bytes = peak_rss();
  verify_checks(shape, o, layout, checks);
  rep.verified_rows = checks.size();
  return rep;
}

}  // namespace edgefuse
