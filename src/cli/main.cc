// The edgefuse command-line program. Subcommands: demo, inspect, plan, extract, fuse (alias
// aggregate), simulate, merge-lora, unmerge-lora. It links no LibTorch (what trains is edgefuse-lab).
// Exit status: 0 success, 1 a check failed (demo verification), 2 bad arguments or input,
// 3 an internal error.
#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdio>
#include <exception>
#include <new>
#include <string>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "src/cli/demo.h"
#include "src/cli/inspect.h"
#include "src/cli/fuse.h"
#include "src/cli/lora.h"
#include "src/cli/simulate.h"
#include "src/cli/submodel.h"

namespace {

// An error line of at most kMaxErrorBytes: a 4000-character name or a 10,000-digit number in
// the input does not make a 10 KB line.
constexpr std::size_t kMaxErrorBytes = 1000;
std::string capped(const char* what) {
  std::string s = what;
  if (s.size() <= kMaxErrorBytes) return s;
  const std::size_t more = s.size() - kMaxErrorBytes;
  s.resize(kMaxErrorBytes);
  return s + "... (" + std::to_string(more) + " more bytes)";
}

}  // namespace

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) makes write() fail with EFBIG instead of killing the
  // process, so the writer's error path runs and keeps what is resumable.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"edgefuse: fuse many small edge-device models into one large target model"};
  app.require_subcommand(1);

  edgefuse::cli::DemoOptions demo;
  std::size_t threads = edgefuse::num_threads();
  bool synthetic = false;
  CLI::App* demo_cmd = app.add_subcommand(
      "demo", "One FedRolex round over a ~56M-parameter bf16 target in memory, verified against "
              "a scalar recomputation (the federated-learning demo that trains with LibTorch is "
              "`edgefuse-lab demo`)");
  demo_cmd->add_flag("--synthetic", synthetic, "Accepted for compatibility: this is the only demo here");
  demo_cmd->add_option("--scale", demo.scale, "Synthetic: target size, small (~56M params) or tiny")
      ->check(CLI::IsMember({"small", "tiny"}));
  demo_cmd->add_option("--clients", demo.clients, "Number of clients")
      ->check(CLI::Range(std::size_t{1}, std::size_t{64}));
  demo_cmd->add_option("--samples", demo.samples, "Elements checked against the scalar path")
      ->check(CLI::Range(std::size_t{1}, std::size_t{100000000}));
  demo_cmd->add_option("--seed", demo.seed, "Seed of the random target and updates");
  demo_cmd->add_option("--threads", threads, "Worker threads (default: all cores)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{4096}));

  std::string inspect_path;
  CLI::App* inspect_cmd = app.add_subcommand(
      "inspect", "List the tensors (name, dtype, shape, bytes) of a .safetensors file, an index "
                 "JSON, a checkpoint folder or a PEFT adapter folder (with its adapter config)");
  inspect_cmd->add_option("path", inspect_path, "File or folder to inspect")->required();

  auto schema_options = [](CLI::App* cmd, edgefuse::cli::SchemaArgs& a, bool target_required) {
    cmd->add_option("--schema", a.schema, "llama, gpt2, mlp, or a schema JSON file")->required();
    cmd->add_option("--config", a.config,
                    "HF config.json for the llama/gpt2 presets (default: beside the target)");
    auto* t = cmd->add_option("--target", a.target, "Target checkpoint: file, folder or index");
    if (target_required) t->required();
  };
  edgefuse::cli::SchemaArgs plan_args;
  std::string plan_file;
  CLI::App* plan_cmd = app.add_subcommand(
      "plan", "Resolve a client plan's policies against a schema and print it as explicit JSON "
              "index lists");
  schema_options(plan_cmd, plan_args, false);
  plan_cmd->add_option("--plan", plan_file, "Plan JSON file")->required();

  edgefuse::cli::SchemaArgs extract_args;
  std::string extract_plan, extract_out, extract_dtype;
  CLI::App* extract_cmd = app.add_subcommand(
      "extract", "Cut a client's sub-model out of the target through its plan (streamed)");
  schema_options(extract_cmd, extract_args, true);
  extract_cmd->add_option("--plan", extract_plan, "Plan JSON file")->required();
  extract_cmd->add_option("--out", extract_out,
                          "Output: a .safetensors file, or a checkpoint folder")->required();
  extract_cmd->add_option("--dtype", extract_dtype, "Convert float tensors to f32, bf16 or f16")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  bool extract_replace = false;
  extract_cmd->add_flag("--replace", extract_replace,
                        "Replace an existing output (a .safetensors file, or a checkpoint folder)");

  std::string fuse_job;
  bool fuse_quiet = false;
  CLI::App* fuse_cmd = app.add_subcommand(
      "fuse", "Run a fusion job: sub-model updates and LoRA adapters fused into the target, "
              "streamed within a memory budget, with progress and a JSON report");
  fuse_cmd->alias("aggregate");
  fuse_cmd->add_option("job", fuse_job, "Job JSON file")->required();
  fuse_cmd->add_flag("--quiet", fuse_quiet, "No progress on stderr");
  edgefuse::cli::SimulateArgs sim;
  CLI::App* sim_cmd = app.add_subcommand(
      "simulate", "Run a whole fusion round over a generated Llama-shaped target and generated "
                  "sub-model clients at any scale (e.g. 100e9 target params, 1000 clients of "
                  "100e6) within a memory budget; print params/s, the fraction of the triad "
                  "and an XXH3 checksum of the fused model");
  sim_cmd->add_option("--target-params", sim.options.target_params, "Target size in parameters")
      ->check(CLI::Range(1e5, 1e13));
  sim_cmd->add_option("--client-params", sim.options.client_params, "Each client's sub-model size")
      ->check(CLI::Range(1.0, 1e13));
  sim_cmd->add_option("--clients", sim.options.clients, "Number of clients")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1000000}));
  sim_cmd->add_option("--seed", sim.options.seed, "Seed of every generated value");
  sim_cmd->add_option("--round", sim.options.round, "FedRolex round of the windows");
  sim_cmd->add_option("--server-lr", sim.options.server_lr, "Server learning rate (delta mode)");
  sim_cmd->add_option("--memory-budget", sim.memory_budget, "e.g. 2GiB (default), 512MiB");
  sim_cmd->add_option("--verify", sim.options.verify_rows,
                      "Recompute this many sampled rows with the scalar reference")
      ->check(CLI::Range(std::size_t{0}, std::size_t{1000}));
  sim_cmd->add_flag("--dry-run", sim.dry_run, "Print the chosen shapes only");
  sim_cmd->add_flag("--quiet", sim.quiet, "No progress on stderr");
  edgefuse::cli::LoraArgs lora_args;
  auto lora_options = [&lora_args](CLI::App* c) {
    auto& a = lora_args;
    c->add_option("--base", a.base, "Base checkpoint: file, folder or index");
    c->add_option("--adapter", a.adapters, "PEFT adapter folder (repeat for several)")->required();
    c->add_option("--weight", a.weights, "Weight of each adapter, in order (default 1 each)");
    c->add_option("--combine", a.combine,
                  "Combination type: cat, linear, svd, ties, ties_svd, dare_linear, dare_ties, "
                  "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd, "
                  "mergekit_ties_svd, mergekit_dare_linear_svd, mergekit_dare_ties_svd "
                  "(default: plain merge of one adapter, cat of several)");
    c->add_option("--density", a.density, "Kept fraction for the pruning types, in (0, 1]");
    c->add_option("--majority-sign", a.majority_sign, "total or frequency (TIES sign election)");
    c->add_option("--svd-rank", a.svd_rank, "Rank of the *_svd types (default: largest input rank)")
        ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1} << 20));
    c->add_option("--svd-clamp", a.svd_clamp, "Quantile clamp of the *_svd factors, in (0, 1]");
    c->add_flag("--exact-svd-scaling", a.exact_svd_scaling,
                "*_svd types target sum w*s*B*A (federated average) instead of PEFT's sum w*s^2*B*A");
    c->add_option("--seed", a.seed, "Seed of the DARE masks");
    c->add_option("--out", a.out, "Output checkpoint folder (written atomically)");
    c->add_flag("--replace", a.replace, "Replace an existing output folder");
  };
  CLI::App* merge_cmd = app.add_subcommand(
      "merge-lora", "Merge LoRA adapters (one, or several combined) into a base checkpoint, "
                    "streamed tensor by tensor, or write the combined adapter");
  lora_options(merge_cmd);
  merge_cmd->add_option("--out-adapter", lora_args.out_adapter,
                        "Write the combined adapter as a PEFT folder instead of merging");
  CLI::App* unmerge_cmd = app.add_subcommand(
      "unmerge-lora", "Subtract LoRA adapters (same arguments as merge-lora) from a checkpoint");
  lora_options(unmerge_cmd);
  for (CLI::App* c : {plan_cmd, extract_cmd, fuse_cmd, sim_cmd, merge_cmd, unmerge_cmd}) {
    c->add_option("--threads", threads, "Worker threads (default: all cores)")
        ->check(CLI::Range(std::size_t{1}, std::size_t{4096}));
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version exit 0; every usage error exits 2, like invalid input.
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    edgefuse::set_num_threads(threads);
    if (demo_cmd->parsed()) return edgefuse::cli::run_demo(demo);
    if (inspect_cmd->parsed()) return edgefuse::cli::run_inspect(inspect_path);
    if (plan_cmd->parsed()) return edgefuse::cli::run_plan(plan_args, plan_file);
    if (extract_cmd->parsed()) {
      return edgefuse::cli::run_extract(extract_args, extract_plan, extract_out, extract_dtype,
                                        extract_replace);
    }
    if (fuse_cmd->parsed()) {
      const bool given = fuse_cmd->get_option("--threads")->count() > 0;
      return edgefuse::cli::run_fuse(fuse_job, given ? threads : 0, fuse_quiet);
    }
    if (sim_cmd->parsed()) {
      if (sim_cmd->get_option("--threads")->count() > 0) sim.options.threads = threads;
      return edgefuse::cli::run_simulate(sim);
    }
    if (merge_cmd->parsed()) return edgefuse::cli::run_merge_lora(lora_args, 1.0);
    if (unmerge_cmd->parsed()) return edgefuse::cli::run_merge_lora(lora_args, -1.0);
  } catch (const edgefuse::Error& e) {
    // One line: io errors read "<file>: <what is wrong> (<Rule>)".
    std::fprintf(stderr, "error: %s\n", capped(e.what()).c_str());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory (the address-space or memory limit of this process "
                         "is too small for this command; lower its memory_budget or raise the limit)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgefuse: internal error: %s\n", capped(e.what()).c_str());
    return 3;
  }
  return 0;
}
