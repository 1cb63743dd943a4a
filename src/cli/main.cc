// The edgefuse command-line program. Subcommands so far: demo, inspect.
// Exit status: 0 success, 1 a check failed (demo verification), 2 bad arguments or input,
// 3 an internal error.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "src/cli/demo.h"
#include "src/cli/inspect.h"

int main(int argc, char** argv) {
  CLI::App app{"edgefuse: fuse many small edge-device models into one large target model"};
  app.require_subcommand(1);

  edgefuse::cli::DemoOptions demo;
  std::size_t threads = edgefuse::num_threads();
  CLI::App* demo_cmd = app.add_subcommand(
      "demo", "Fuse 8 rolling-window client updates into a ~56M-parameter Llama-shaped bf16 "
              "target in memory, verify a sample against a scalar recomputation, and report "
              "time and bandwidth per step");
  demo_cmd->add_option("--scale", demo.scale, "Target size: small (~56M params) or tiny")
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
  } catch (const edgefuse::Error& e) {
    // One line: io errors read "<file>: <what is wrong> (<Rule>)".
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgefuse: internal error: %s\n", e.what());
    return 3;
  }
  return 0;
}
