// `edgefuse simulate`: a whole fusion round over a generated target at any scale.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstdio>
#include <memory>

#include <nlohmann/json.hpp>

#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/engine/fuse.h"
#include "edgefuse/engine/simulate.h"
#include "src/cli/commands.h"
#include "src/engine/job_rules.h"

namespace edgefuse::cli {

namespace {

struct SimulateArgs {
  SimulationOptions options;
  std::string memory_budget = "2GiB";
  bool dry_run = false;              // print the shapes only
  bool quiet = false;                // no progress lines
  std::string aggregation = "mean";  // a job file's "aggregation" value: a name or JSON object
  std::string server_optimizer;      // a rule name or a job file's JSON object; "": none
};

// A flag's value as the job file's JSON: an object or array as written, else a string.
nlohmann::json flag_json(const std::string& value) {
  if (!value.empty() && (value.front() == '{' || value.front() == '[')) {
    return nlohmann::json::parse(value);
  }
  return value;
}

std::string count(double n) {
  if (n >= 1e9) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

int run_simulate(SimulateArgs a) {
  a.options.memory_budget = parse_byte_size(a.memory_budget);
  const AggregationJob aggregation =
      detail::parse_aggregation(flag_json(a.aggregation), "--aggregation");
  if (aggregation.selection || aggregation.task_merge || aggregation.centered_clip) {
    detail::fail(
        "--aggregation: simulate runs mean, median or trimmed_mean (a client selection, centered "
        "clipping or a task merge reads every client's values more than once; run it with "
        "edgefuse fuse)");
  }
  a.options.robust = aggregation.robust;
  if (!a.server_optimizer.empty()) {
    nlohmann::json o = flag_json(a.server_optimizer);
    if (o.is_string()) o = nlohmann::json{{"rule", o}};
    a.options.server = detail::parse_server_optimizer(o, "--server-optimizer", ".").step;
  }
  const SimulationShape s = simulation_shape(a.options);
  const ModelConfig& t = s.target;
  fmt::print(
      "target: Llama-shaped, {} params: hidden {}, {} layers, {} heads ({} KV, head_dim {}), "
      "MLP {}, vocab {}, {} tensors, bf16\n",
      count(static_cast<double>(s.target_params)), t.hidden, t.layers, t.heads, t.kv_heads,
      t.head_dim, t.intermediate, t.vocab, s.tensors);
  fmt::print(
      "clients: {} x {} params: width {} (hidden {}, {} KV heads, MLP {}), {} of {} layers, "
      "rolling windows staggered across clients (round {})\n",
      a.options.clients, count(static_cast<double>(s.client.params)), s.client.width.to_string(),
      s.client.hidden, s.client.kv_heads, s.client.intermediate, s.client.layers, t.layers,
      a.options.round);
  if (a.dry_run) return 0;

  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(),
                                                                 &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  auto sink = [&](std::size_t, const std::string&, const std::byte* p, std::size_t n) {
    XXH3_64bits_update(state.get(), p, n);
  };
  int last_decile = -1;
  const bool tty = isatty(fileno(stderr)) != 0;
  auto progress = [&](const SimulationProgress& p) {
    const double frac =
        p.params_total ? static_cast<double>(p.params_done) / static_cast<double>(p.params_total)
                       : 1.0;
    const double rate = p.seconds > 0 ? static_cast<double>(p.params_done) / p.seconds : 0.0;
    const double eta = rate > 0 ? static_cast<double>(p.params_total - p.params_done) / rate : 0.0;
    const int decile = static_cast<int>(frac * 10);
    if (decile == last_decile) return;
    last_decile = decile;
    std::fprintf(stderr, "%sprogress %3.0f%%: tensors %zu/%zu, %s params/s, ETA %.0f s%s",
                 tty ? "\r" : "", 100 * frac, p.tensors_done, p.tensors_total, count(rate).c_str(),
                 eta, tty && frac < 1 ? " " : "\n");
  };
  const SimulationReport r = run_simulation(
      a.options, sink, a.quiet ? std::function<void(const SimulationProgress&)>() : progress);
  fmt::print(
      "round: {} target params fused from {} client values in {:.2f} s (setup {:.2f} s): "
      "{} params/s, {:.2f} GB/s = {:.2f} of the triad ({:.2f} GB/s), {} threads\n",
      count(static_cast<double>(s.target_params)), count(static_cast<double>(r.client_values)),
      r.seconds, r.setup_seconds, count(r.params_per_second()), r.bytes_per_second() / 1e9,
      r.triad_fraction(), r.triad_bytes_per_second / 1e9, r.threads);
  fmt::print(
      "coverage: {:.2f}% of the target's elements; memory: peak {:.2f} GiB (budget {:.2f} GiB, "
      "client state {:.1f} MiB, tiles of {} elements, chunks of {} elements)\n",
      100.0 * static_cast<double>(r.covered) / static_cast<double>(s.target_params),
      static_cast<double>(r.peak_rss_bytes) / (1u << 30),
      static_cast<double>(r.memory_budget) / (1u << 30),
      static_cast<double>(r.client_state_bytes) / (1u << 20), r.tile_elements, r.chunk_elements);
  if (a.options.robust || a.options.server) {
    fmt::print("rules: aggregation {}, server optimizer {}\n",
               !a.options.robust                               ? "mean"
               : a.options.robust->rule == RobustRule::kMedian ? "median"
                                                               : "trimmed_mean",
               a.options.server ? server_rule_name(a.options.server->rule) : "none");
  }
  if (a.options.verify_rows > 0) {
    fmt::print("verify: {} sampled rows equal the scalar reference bit for bit\n", r.verified_rows);
  }
  fmt::print("checksum: xxh3-64 {:016x}\n", XXH3_64bits_digest(state.get()));
  return 0;
}

}  // namespace

Command add_simulate(CLI::App& app) {
  auto sim = std::make_shared<SimulateArgs>();
  auto threads = std::make_shared<std::size_t>(num_threads());
  CLI::App* cmd = app.add_subcommand(
      "simulate",
      "Run a whole fusion round over a generated Llama-shaped target and generated "
      "sub-model clients at any scale (e.g. 100e9 target params, 1000 clients of "
      "100e6) within a memory budget; print params/s, the fraction of the triad "
      "and an XXH3 checksum of the fused model");
  cmd->add_option("--target-params", sim->options.target_params, "Target size in parameters")
      ->check(CLI::Range(1e5, 1e13));
  cmd->add_option("--client-params", sim->options.client_params, "Each client's sub-model size")
      ->check(CLI::Range(1.0, 1e13));
  cmd->add_option("--clients", sim->options.clients, "Number of clients")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1000000}));
  cmd->add_option("--seed", sim->options.seed, "Seed of every generated value");
  cmd->add_option("--round", sim->options.round, "FedRolex round of the windows");
  cmd->add_option("--server-lr", sim->options.server_lr, "Server learning rate (delta mode)");
  cmd->add_option("--memory-budget", sim->memory_budget, "e.g. 2GiB (default), 512MiB");
  cmd->add_option("--verify", sim->options.verify_rows,
                  "Recompute this many sampled rows with the scalar reference")
      ->check(CLI::Range(std::size_t{0}, std::size_t{1000}));
  cmd->add_option("--aggregation", sim->aggregation,
                  "mean (default), median, trimmed_mean, or a job file's JSON object such as "
                  "'{\"rule\": \"trimmed_mean\", \"beta\": 0.1}'");
  cmd->add_option("--server-optimizer", sim->server_optimizer,
                  "fedavgm, fedadam, fedyogi, fedadagrad or nesterov with the job file's "
                  "defaults, or a job file's JSON object; its state is generated and checksummed");
  cmd->add_flag("--dry-run", sim->dry_run, "Print the chosen shapes only");
  cmd->add_flag("--quiet", sim->quiet, "No progress on stderr");
  CLI::Option* given = add_threads_option(cmd, *threads);
  return {cmd, [sim, threads, given] {
            set_num_threads(*threads);
            if (given->count() > 0) sim->options.threads = *threads;
            return run_simulate(*sim);
          }};
}

}  // namespace edgefuse::cli
