// Private: the subcommands of the `edgefuse` program. Each src/cli/<command>.cc adds its own
// subcommand and options to the program and returns how to run it once the command line is
// parsed; main() only parses, dispatches and turns errors into exit codes.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace edgefuse::cli {

struct Command {
  CLI::App* cli;
  std::function<int()> run;  // exit status: 0 ok, 1 a check failed, 2 bad input
};

// --threads N (1 to 4096), all cores by default.
CLI::Option* add_threads_option(CLI::App* command, std::size_t& threads);

Command add_demo(CLI::App& app);
Command add_inspect(CLI::App& app);
Command add_plan(CLI::App& app);
Command add_extract(CLI::App& app);
Command add_fuse(CLI::App& app);  // also named `aggregate`
Command add_simulate(CLI::App& app);
std::vector<Command> add_merge_lora(CLI::App& app);  // merge-lora and unmerge-lora

}  // namespace edgefuse::cli
