// edgefuse-lab: experiments that train models with LibTorch around the library, kept out of
// the core `edgefuse` program so that it never loads LibTorch.
// Subcommands: run (an experiment file, lab/experiment.h), demo (the short multilingual
// experiment, lab/experiments/demo.json).
// Exit status: 0 success, 2 bad arguments or input, 3 an internal error.
#include <torch/torch.h>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <iostream>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "lab/experiment.h"
#include "lab/run_experiment.h"

#ifndef EDGEFUSE_LAB_EXPERIMENTS
#define EDGEFUSE_LAB_EXPERIMENTS "lab/experiments"
#endif

int main(int argc, char** argv) {
  CLI::App app{"edgefuse-lab: experiments that train with LibTorch and fuse with edgefuse"};
  app.require_subcommand(1);
  std::string experiment_file;
  edgefuse::lab::RunOptions run_opts;
  int threads = -1;
  CLI::App* run_cmd = app.add_subcommand(
      "run",
      "Run an experiment file: federated learning of a byte-level Llama by heterogeneous clients, "
      "each method for each seed; writes results.json, timing.json, bpc.tsv and bpc.png into "
      "--out");
  run_cmd->add_option("experiment", experiment_file, "The experiment file (JSON)")->required();
  run_cmd->add_option("--out", run_opts.out, "Output folder (must not exist, unless --replace)")
      ->required();
  run_cmd->add_flag("--replace", run_opts.replace, "Replace an earlier run's output folder");
  run_cmd->add_flag("--quiet", run_opts.quiet, "No per-round progress lines");
  run_cmd
      ->add_option("--threads", threads,
                   "Worker threads, overriding the file's \"threads\" (0: all cores)")
      ->check(CLI::Range(0, 4096));
  edgefuse::lab::RunOptions demo_opts;
  demo_opts.out = "demo-run";
  demo_opts.replace = true;
  CLI::App* demo_cmd = app.add_subcommand(
      "demo",
      "The short multilingual experiment (one seed): English laptops and German, Italian and "
      "Spanish "
      "tablets and phones teach one target; prints the table and the plot's path");
  demo_cmd->add_option("--out", demo_opts.out, "Output folder (an earlier demo's is replaced)");
  demo_cmd->add_option("--threads", threads, "Worker threads (0: all cores)")
      ->check(CLI::Range(0, 4096));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  try {
    // One LibTorch thread per client: clients train concurrently on the library's threads
    // (on these small matrices two intra-op threads were 3x slower per step on 2 cores).
    torch::set_num_threads(1);
    const bool demo = demo_cmd->parsed();
    const edgefuse::lab::Experiment x = edgefuse::lab::read_experiment(
        demo ? std::string(EDGEFUSE_LAB_EXPERIMENTS) + "/demo.json" : experiment_file);
    const int n = threads >= 0 ? threads : x.threads;
    if (n > 0) edgefuse::set_num_threads(static_cast<std::size_t>(n));
    return edgefuse::lab::run_experiment(x, demo ? demo_opts : run_opts, std::cout);
  } catch (const edgefuse::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgefuse-lab: internal error: %s\n", e.what());
    return 3;
  }
}
