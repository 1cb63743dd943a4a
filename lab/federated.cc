// The methods of an experiment, round by round (lab/federated.h).
#include "lab/federated.h"

#include <fmt/format.h>

#include <chrono>
#include <fstream>

#include "edgefuse/core/parallel.h"
#include "edgefuse/distill/signals.h"
#include "edgefuse/distill/teacher.h"
#include "edgefuse/engine/fuse.h"
#include "edgefuse/interop/distill.h"
#include "edgefuse/plan/plan.h"
#include "edgefuse/plan/schema.h"
#include "lab/byte_llama.h"

namespace edgefuse::lab {
namespace {

namespace fs = std::filesystem;

bool uses_weights(Method m) { return m != Method::kKD && m != Method::kCentral; }
bool uses_logits(Method m) { return m == Method::kKD || m == Method::kHybrid; }

// The sub-model policy of a method: "heterofl" (static prefixes) or "fedrolex" (rolling).
std::string policy_of(Method m, const Experiment& x) {
  if (m == Method::kHeteroFL) return "heterofl";
  if (m == Method::kFedRolex) return "fedrolex";
  return x.distill.policy;
}

// The client's plan: every width axis (hidden, KV groups with their query heads, MLP) at its
// width, the layers at its depth; static prefixes or windows rolled by the round.
std::string plan_json(const ClientSpec& c, const std::string& policy, int round) {
  std::vector<std::string> parts;
  if (c.width < 1.0) {
    const std::string p =
        policy == "fedrolex"
            ? fmt::format(R"({{"policy": "fedrolex", "rate": {}, "round": {}}})", c.width, round)
            : fmt::format(R"({{"policy": "heterofl", "rate": {}}})", c.width);
    for (const char* axis : {"hidden", "kv_heads", "mlp"})
      parts.push_back(fmt::format(R"("{}": {})", axis, p));
  }
  if (c.layers < 1.0) {
    parts.push_back(
        policy == "fedrolex"
            ? fmt::format(R"("layers": {{"policy": "rolling", "rate": {}, "round": {}}})", c.layers,
                          round)
            : fmt::format(R"("layers": {{"policy": "prefix", "rate": {}}})", c.layers));
  }
  std::string j = "{";
  for (std::size_t i = 0; i < parts.size(); ++i) j += (i ? ", " : "") + parts[i];
  return j + "}";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out.flush()) detail::fail("cannot write ", path.string());
}

// Seeds of the random streams: distinct per (seed, client or server, round).
std::uint64_t client_seed(std::uint64_t seed, std::size_t client, int round) {
  return seed * 1000003 + client * 1009 + static_cast<std::uint64_t>(round) * 7 + 1;
}
std::uint64_t server_seed(std::uint64_t seed, int round) {
  return seed * 1000003 + 999983 + static_cast<std::uint64_t>(round) * 7;
}

void evaluate(const StateDict& model, const EvalSets& eval, std::int64_t head_dim, RoundResult& r) {
  std::vector<double> bpc(eval.groups.size());
  parallel_for(eval.groups.size(), 1, [&](std::size_t b, std::size_t e) {
    for (std::size_t g = b; g < e; ++g)
      bpc[g] = bits_per_character(model, eval.windows[g], head_dim);
  });
  double sum = 0.0;
  for (std::size_t g = 0; g < bpc.size(); ++g) {
    r.group_bpc[eval.groups[g]] = bpc[g];
    sum += bpc[g];
  }
  r.overall = sum / static_cast<double>(bpc.size());
}

// The server's distillation step: the target trained against the clients' aggregated logits
// on the proxy windows (teacher row w * context + t is window w's position t).
void distill_into(StateDict& model, const Windows& proxy, const std::vector<fs::path>& signal_files,
                  const std::vector<std::string>& names, const std::vector<double>& weights,
                  const Experiment& x, std::uint64_t seed) {
  std::vector<TeacherSignal> signals;
  for (std::size_t k = 0; k < signal_files.size(); ++k)
    signals.push_back(load_teacher_signal(signal_files[k], names[k]));
  std::vector<WeightedSignal> weighted;
  for (std::size_t k = 0; k < signals.size(); ++k) weighted.push_back({&signals[k], weights[k]});
  TeacherOptions topts;
  topts.rule = parse_teacher_rule(x.distill.rule);
  topts.temperature = x.distill.temperature;
  const TeacherTarget teacher = aggregate_teachers(weighted, topts);
  signals.clear();

  LossOptions loss;
  loss.temperature = x.distill.temperature;
  std::vector<torch::Tensor> params;
  for (auto& item : model) params.push_back(item.value().set_requires_grad(true));
  torch::optim::Adam opt(params, torch::optim::AdamOptions(x.distill.lr));
  const std::int64_t n = proxy.size(), T = x.model.context;
  std::int64_t position = 0, pass = -1;
  std::vector<std::int64_t> order;
  for (int s = 0; s < x.distill.steps; ++s) {
    std::vector<std::int64_t> idx;
    std::vector<std::size_t> rows;
    for (std::int64_t b = 0; b < x.distill.batch; ++b, ++position) {
      if (position / n != pass) {
        pass = position / n;
        order = shuffled(n, seed * 1000003 + static_cast<std::uint64_t>(pass));
      }
      const std::int64_t w = order[static_cast<std::size_t>(position % n)];
      idx.push_back(w);
      for (std::int64_t t = 0; t < T; ++t) rows.push_back(static_cast<std::size_t>(w * T + t));
    }
    const TeacherTarget batch_teacher = select_rows(teacher, rows);
    opt.zero_grad();
    const torch::Tensor logits = forward(
        model, proxy.x.index_select(0, torch::tensor(idx, torch::kLong)), x.model.head_dim());
    distill_loss(logits, batch_teacher, 0, loss).backward();
    opt.step();
  }
  for (auto& t : params) t.set_requires_grad(false);
}

std::int64_t payload_bytes(const StateDict& model) { return parameter_count(model) * 4; }

}  // namespace

EvalSets make_eval_sets(const Experiment& x, const Corpus& corpus) {
  EvalSets e;
  for (const auto& g : corpus.groups) {
    e.groups.push_back(g);
    e.windows.push_back(make_windows(corpus.heldout.at(g), x.model.context, x.model.context));
  }
  return e;
}

MethodRun run_method(const Experiment& x, const Corpus& corpus, const EvalSets& eval, Method method,
                     std::uint64_t seed, const fs::path& work,
                     const std::function<void(const std::string&)>& progress) {
  const std::int64_t head_dim = x.model.head_dim();
  const std::string config = config_json(x.model);
  const ModelConfig cfg = parse_model_config(config, "config.json");
  const ModelLayout layout =
      Schema::preset("llama", cfg).bind(llama_tensor_metas(cfg, DType::kF32));
  const std::size_t n_clients = x.clients.size();
  fs::create_directories(work);

  std::vector<Windows> train(n_clients);
  for (std::size_t k = 0; k < n_clients; ++k)
    train[k] = make_windows(corpus.train[k], x.model.context, x.model.context / 2);
  Windows proxy;
  if (uses_logits(method)) proxy = make_windows(corpus.proxy, x.model.context, x.model.context);

  MethodRun run{method, seed, {}};
  StateDict model = initial_model(x.model, seed);
  RoundResult r0;
  r0.bytes_up.assign(n_clients, 0);
  r0.bytes_down.assign(n_clients, 0);
  evaluate(model, eval, head_dim, r0);
  run.rounds.push_back(r0);

  // central: the union of the clients' training text, one optimizer for the whole run.
  Windows all;
  std::unique_ptr<Trainer> central;
  if (method == Method::kCentral) {
    std::string text;
    for (const auto& t : corpus.train) text += t;
    all = make_windows(text, x.model.context, x.model.context / 2);
    central = std::make_unique<Trainer>(model, x.lr);
  }

  fs::path target = work / "global-0";
  if (method != Method::kCentral) save_model(model, target, config);
  for (int round = 1; round <= x.rounds; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    RoundResult r;
    r.round = round;
    r.bytes_up.assign(n_clients, 0);
    r.bytes_down.assign(n_clients, 0);
    if (method == Method::kCentral) {
      central->steps(all, x.local_steps * static_cast<int>(n_clients), x.batch, seed, head_dim);
      if (round == 1) {
        for (std::size_t k = 0; k < n_clients; ++k)
          r.bytes_up[k] = static_cast<std::int64_t>(corpus.train[k].size());
      }
    } else {
      const fs::path round_dir = work / "round";
      fs::remove_all(round_dir);
      fs::create_directories(round_dir);
      const fs::path next = work / ("global-" + std::to_string(round % 2));
      std::vector<std::size_t> taking;
      for (std::size_t k = 0; k < n_clients; ++k) {
        if (method != Method::kLargestAlone || x.clients[k].full_size()) taking.push_back(k);
      }
      const std::string policy = policy_of(method, x);
      const NamedViews global = views_of(model);
      // Each client: its sub-model, local training, and what it sends (files in round_dir).
      parallel_for(taking.size(), 1, [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i) {
          const std::size_t k = taking[i];
          const ClientSpec& c = x.clients[k];
          const std::string plan_text = plan_json(c, policy, round - 1);
          const Plan plan = parse_plan(plan_text, layout, c.name);
          StateDict local = extract_state_dict(global, layout, plan, DType::kF32);
          r.bytes_down[k] = payload_bytes(local);
          if (uses_logits(method) && round == 1)
            r.bytes_down[k] += static_cast<std::int64_t>(corpus.proxy.size());
          const StateDict before = clone(local);
          train_steps(local, train[k], x.local_steps, x.batch, x.lr, client_seed(seed, k, round),
                      head_dim);
          if (uses_weights(method)) {
            StateDict delta;
            for (const auto& item : local)
              delta.insert(item.key(), (item.value() - before[item.key()]).contiguous());
            save_model(delta, round_dir / (c.name + ".update"), "");
            write_text(round_dir / (c.name + ".plan.json"), plan_text);
            r.bytes_up[k] += payload_bytes(delta);
          }
          if (uses_logits(method)) {
            torch::NoGradGuard no_grad;
            std::vector<float> logits;
            logits.reserve(static_cast<std::size_t>(proxy.y.numel() * kByteVocab));
            for (std::int64_t w = 0; w < proxy.size(); w += 64) {
              const torch::Tensor z =
                  forward(local, proxy.x.slice(0, w, std::min(proxy.size(), w + 64)), head_dim)
                      .contiguous();
              logits.insert(logits.end(), z.data_ptr<float>(), z.data_ptr<float>() + z.numel());
            }
            const auto rows = static_cast<std::size_t>(proxy.y.numel());
            save_teacher_signal(round_dir / (c.name + ".logits"),
                                dense_signal(c.name, rows, kByteVocab, std::move(logits)),
                                DType::kBF16, true);
            r.bytes_up[k] += static_cast<std::int64_t>(rows) * kByteVocab * 2;
          }
        }
      });
      if (uses_weights(method)) {
        std::string clients;
        for (std::size_t k : taking) {
          const ClientSpec& c = x.clients[k];
          clients += fmt::format(
              R"({}{{"name": "{}", "update": "{}.update", "plan": "{}.plan.json", "weight": {}}})",
              clients.empty() ? "" : ", ", c.name, c.name, c.name, corpus.train[k].size());
        }
        const fs::path job = round_dir / "job.json";
        write_text(
            job,
            fmt::format(
                R"({{"target": "{}", "schema": "llama", "output": "{}", "replace": true, "mode": "delta", )"
                R"("memory_budget": "256MiB", "clients": [{}]}})",
                fs::absolute(target).string(), fs::absolute(next).string(), clients));
        const FusionReport rep = run_fusion(parse_fusion_job(job));
        if (!rep.rejected.empty()) {
          detail::fail(method_name(method), " round ", round, ": the engine rejected client '",
                       rep.rejected[0].name, "': ", rep.rejected[0].reason);
        }
        model = load_model(next);
      }
      if (uses_logits(method)) {
        std::vector<fs::path> files;
        std::vector<std::string> names;
        std::vector<double> weights;
        for (std::size_t k : taking) {
          files.push_back(round_dir / (x.clients[k].name + ".logits"));
          names.push_back(x.clients[k].name);
          weights.push_back(static_cast<double>(corpus.train[k].size()));
        }
        distill_into(model, proxy, files, names, weights, x, server_seed(seed, round));
        save_model(model, next, config);
      }
      fs::remove_all(round_dir);
      target = next;
    }
    evaluate(model, eval, head_dim, r);
    r.seconds = seconds_since(t0);
    std::string groups;
    for (const auto& [g, v] : r.group_bpc)
      groups += fmt::format("{}{} {:.3f}", groups.empty() ? "" : ", ", g, v);
    progress(fmt::format("{} seed {} round {}/{}: {:.3f} bits/char ({}), {:.1f} s",
                         method_name(method), seed, round, x.rounds, r.overall, groups, r.seconds));
    run.rounds.push_back(std::move(r));
  }
  save_model(model, work / "final", config);
  for (const char* d : {"global-0", "global-1"}) fs::remove_all(work / d);
  return run;
}

}  // namespace edgefuse::lab
