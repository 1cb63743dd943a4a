// Running an experiment into its output folder (lab/run_experiment.h).
#include "lab/run_experiment.h"

#include <fmt/format.h>
#include <fmt/ostream.h>

#include <chrono>
#include <ostream>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/plan/plan.h"
#include "edgefuse/plan/schema.h"
#include "edgefuse/interop/torch.h"
#include "lab/byte_llama.h"
#include "lab/corpus.h"
#include "lab/federated.h"
#include "lab/report.h"

namespace edgefuse::lab {
namespace {

namespace fs = std::filesystem;

void check_output(const fs::path& out, bool replace) {
  std::error_code ec;
  const auto st = fs::symlink_status(out, ec);
  if (!fs::exists(st)) return;
  if (!replace)
    detail::fail("output ", out.string(), " exists (pass --replace to replace an earlier run)");
  if (!fs::is_directory(st) || !fs::is_regular_file(fs::symlink_status(out / "results.json", ec))) {
    detail::fail("output ", out.string(),
                 " is not an earlier edgefuse-lab run (no results.json in it): not replaced");
  }
}

// Parameters of each client's sub-model (its plan of round 0 cut from the full model).
std::vector<std::int64_t> client_parameters(const Experiment& x, std::int64_t& model_parameters) {
  const StateDict init = initial_model(x.model, 0);
  model_parameters = parameter_count(init);
  const ModelConfig cfg = parse_model_config(config_json(x.model), "config.json");
  const ModelLayout layout =
      Schema::preset("llama", cfg).bind(llama_tensor_metas(cfg, DType::kF32));
  std::vector<std::int64_t> out;
  for (const auto& c : x.clients) {
    std::string plan = "{";
    if (c.width < 1.0) {
      for (const char* axis : {"hidden", "kv_heads", "mlp"}) {
        plan += fmt::format(R"({}"{}": {{"policy": "heterofl", "rate": {}}})",
                            plan.size() > 1 ? ", " : "", axis, c.width);
      }
    }
    if (c.layers < 1.0)
      plan += fmt::format(R"({}"layers": {{"policy": "prefix", "rate": {}}})",
                          plan.size() > 1 ? ", " : "", c.layers);
    plan += "}";
    out.push_back(parameter_count(
        extract_state_dict(views_of(init), layout, parse_plan(plan, layout, c.name), DType::kF32)));
  }
  return out;
}

}  // namespace

int run_experiment(const Experiment& x, const RunOptions& opt, std::ostream& log) {
  const auto t0 = std::chrono::steady_clock::now();
  check_output(opt.out, opt.replace);
  const Corpus corpus = read_corpus(x);
  const EvalSets eval = make_eval_sets(x, corpus);
  std::int64_t model_parameters = 0;
  const std::vector<std::int64_t> params = client_parameters(x, model_parameters);

  const fs::path out = fs::absolute(opt.out).lexically_normal();
  const fs::path staging = out.parent_path() / ("." + out.filename().string() + ".lab-staging");
  fs::remove_all(staging);
  fs::create_directories(staging);
  try {
    fmt::print(log,
               "experiment {}: target {} parameters (hidden {}, {} layers, {} heads over {} KV "
               "heads, MLP {}, "
               "context {}), {} rounds of {} local steps, {} seed(s), {} threads\n",
               x.file.string(), model_parameters, x.model.hidden, x.model.layers, x.model.heads,
               x.model.kv_heads, x.model.mlp, x.model.context, x.rounds, x.local_steps,
               x.seeds.size(), num_threads());
    for (std::size_t k = 0; k < x.clients.size(); ++k) {
      fmt::print(log,
                 "  client {:<12} group {:<6} width {:<6} layers {:<5} {:>8} parameters {:>8} "
                 "training bytes\n",
                 x.clients[k].name, x.clients[k].group, x.clients[k].width, x.clients[k].layers,
                 params[k], corpus.train[k].size());
    }
    for (std::size_t g = 0; g < eval.groups.size(); ++g) {
      fmt::print(log, "  held-out {:<6} {:>8} bytes, {:>8} characters\n", eval.groups[g],
                 corpus.heldout.at(eval.groups[g]).size(), eval.windows[g].characters);
    }
    if (!corpus.proxy.empty()) fmt::print(log, "  proxy text {} bytes\n", corpus.proxy.size());
    std::vector<MethodRun> runs;
    for (std::uint64_t seed : x.seeds) {
      for (Method m : x.methods) {
        const fs::path work = staging / "models" / fmt::format("{}-seed{}", method_name(m), seed);
        runs.push_back(run_method(x, corpus, eval, m, seed, work, [&](const std::string& line) {
          if (!opt.quiet) fmt::print(log, "{}\n", line);
          log.flush();
        }));
      }
    }
    const fs::path plot = write_outputs(staging, x, runs, params, model_parameters);
    fmt::print(log, "\n{}", summary_table(x, summarize(x, runs)));
    if (fs::exists(out)) {
      const fs::path old = out.parent_path() / ("." + out.filename().string() + ".lab-old");
      fs::remove_all(old);
      fs::rename(out, old);
      fs::rename(staging, out);
      fs::remove_all(old);
    } else {
      fs::rename(staging, out);
    }
    fmt::print(log, "results: {}\nplot: {}\ntotal {:.0f} s\n", (out / "results.json").string(),
               plot.empty() ? std::string("not drawn (install gnuplot-nox); data in ") +
                                  (out / "bpc.tsv").string()
                            : (out / "bpc.png").string(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  } catch (...) {
    std::error_code ec;
    fs::remove_all(staging, ec);
    throw;
  }
  return 0;
}

}  // namespace edgefuse::lab
