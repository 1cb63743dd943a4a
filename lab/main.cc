// edgefuse-lab: the experiments that train models with LibTorch around the library, kept out
// of the core `edgefuse` program so that it never loads LibTorch.
// Subcommands: demo (federated learning of a character-level Llama, fused by the engine).
// Exit status: 0 success, 2 bad arguments or input, 3 an internal error.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "lab/fl_demo.h"

int main(int argc, char** argv) {
  CLI::App app{"edgefuse-lab: experiments that train with LibTorch and fuse with edgefuse"};
  app.require_subcommand(1);
  edgefuse::lab::FlDemoOptions fl;
  std::size_t threads = edgefuse::num_threads();
  CLI::App* demo_cmd = app.add_subcommand(
      "demo", "Federated learning of a character-level Llama (LibTorch) by six clients of three "
              "capacity tiers on the fortunes corpus, fused each round by the engine: FedRolex vs "
              "HeteroFL vs the largest tier alone, held-out bits per character by round and a plot");
  demo_cmd->add_option("--out", fl.out, "Output folder (rounds, bpc.tsv, bpc.png)");
  demo_cmd->add_option("--rounds", fl.rounds, "FL rounds")->check(CLI::Range(1, 1000));
  demo_cmd->add_option("--fortunes", fl.fortunes, "The fortunes corpus folder");
  demo_cmd->add_flag("--quick", fl.quick, "3 short rounds (a smoke run)");
  demo_cmd->add_option("--threads", threads, "Worker threads (default: all cores)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{4096}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    edgefuse::set_num_threads(threads);
    if (demo_cmd->parsed()) return edgefuse::lab::run_fl_demo(fl);
  } catch (const edgefuse::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgefuse-lab: internal error: %s\n", e.what());
    return 3;
  }
  return 0;
}
