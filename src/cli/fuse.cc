// `edgefuse fuse` (alias `aggregate`): run a fusion job with progress and print its report.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "edgefuse/core/parallel.h"
#include "edgefuse/engine/fuse.h"
#include "src/cli/commands.h"

namespace edgefuse::cli {

namespace {

std::string gb(double bytes) { return fmt::format("{:.2f} GB", bytes / 1e9); }

// A bar redrawn in place on a terminal; otherwise one plain line per 10% of the bytes.
struct ProgressPrinter {
  bool tty = isatty(fileno(stderr)) != 0;
  int last_decile = -1;
  double last_draw = -1.0;

  void operator()(const FusionProgress& p) {
    const double frac = p.bytes_total
                            ? static_cast<double>(p.bytes_done) / static_cast<double>(p.bytes_total)
                            : 1.0;
    const double rate = p.seconds > 0 ? static_cast<double>(p.bytes_done) / p.seconds : 0.0;
    const double eta = rate > 0 ? static_cast<double>(p.bytes_total - p.bytes_done) / rate : 0.0;
    const bool done = p.bytes_done >= p.bytes_total;
    if (tty) {
      if (!done && p.seconds - last_draw < 0.1) return;
      last_draw = p.seconds;
      const int width = 30, fill = static_cast<int>(frac * width);
      std::fprintf(stderr, "\r[%s%s] %5.1f%%  tensors %zu/%zu  %s/%s  %.2f GB/s  ETA %.0f s ",
                   std::string(static_cast<std::size_t>(fill), '#').c_str(),
                   std::string(static_cast<std::size_t>(width - fill), ' ').c_str(), 100 * frac,
                   p.tensors_done, p.tensors_total, gb(static_cast<double>(p.bytes_done)).c_str(),
                   gb(static_cast<double>(p.bytes_total)).c_str(), rate / 1e9, eta);
      if (done) std::fputc('\n', stderr);
      return;
    }
    const int decile = static_cast<int>(frac * 10);
    if (decile == last_decile && !done) return;
    last_decile = decile;
    std::fprintf(stderr, "progress %3.0f%%: tensors %zu/%zu, %s of %s, %.2f GB/s, ETA %.0f s\n",
                 100 * frac, p.tensors_done, p.tensors_total,
                 gb(static_cast<double>(p.bytes_done)).c_str(),
                 gb(static_cast<double>(p.bytes_total)).c_str(), rate / 1e9, eta);
  }
};

int run_fuse(const std::string& job_path, std::size_t threads, bool quiet) {
  FusionJob job = parse_fusion_job(job_path);
  if (threads > 0) job.threads = threads;
  ProgressPrinter printer;
  const FusionReport r =
      run_fusion(job, quiet ? std::function<void(const FusionProgress&)>()
                            : std::function<void(const FusionProgress&)>(std::ref(printer)));
  for (const auto& x : r.rejected) fmt::print(stderr, "rejected client {}: {}\n", x.name, x.reason);
  fmt::print("{:<48} {:>14} {:>9} {:>5} {:>5}\n", "tensor", "elements", "covered", "min", "max");
  for (const auto& c : r.coverage) {
    fmt::print("{:<48} {:>14} {:>8.2f}% {:>5} {:>5}\n", c.name, c.elements, 100 * c.fraction(),
               c.min_contributors, c.max_contributors);
  }
  fmt::print(
      "fused {} clients ({} rejected) into {} in {:.2f} s: read {}, wrote {}, {:.2f} GB/s "
      "= {:.2f} of the triad ({:.2f} GB/s), {} threads, tiles of {} elements\n",
      r.accepted.size(), r.rejected.size(), r.output.string(), r.seconds,
      gb(static_cast<double>(r.bytes_read)), gb(static_cast<double>(r.bytes_written)),
      r.bytes_per_second() / 1e9, r.triad_fraction(), r.triad_bytes_per_second / 1e9, r.threads,
      r.tile_elements);
  if (const auto& o = r.server_optimizer) {
    fmt::print(
        "server optimizer: {} step {} (lr {:g}, applied {:g}) from {}; wrote {} state "
        "tensors ({})\n",
        o->rule, o->step, o->lr, o->lr_applied,
        o->state_from.empty() ? std::string("zeros") : o->state_from.string(), o->state_tensors,
        gb(static_cast<double>(o->state_bytes)));
  }
  if (const auto& s = r.selection) {
    std::string kept;
    for (std::size_t i = 0; i < s->clients.size(); ++i) {
      if (s->selected[i]) kept += (kept.empty() ? "" : ", ") + s->clients[i];
    }
    fmt::print("client selection: {} with f = {} selected {} of {} clients: {}\n",
               r.aggregation.selection->rule == SelectionRule::kBulyan ? "bulyan" : "multi_krum",
               r.aggregation.selection->f, std::count(s->selected.begin(), s->selected.end(), true),
               s->clients.size(), kept);
  }
  if (const auto& c = r.centered_clip) {
    std::size_t clipped = 0;
    for (const double f : c->factors) clipped += f < 1.0 ? 1 : 0;
    fmt::print("centered clipping: tau {:g}, {} iteration(s): {} of {} clients clipped\n",
               r.aggregation.centered_clip->tau, r.aggregation.centered_clip->iterations, clipped,
               c->labels.size());
  }
  if (const auto& c = r.clip) {
    fmt::print("clip: {} norm {:g} (round {}){}: {} of {} clients clipped; next norm {:g}\n",
               c->rule, c->norm, c->round,
               c->noise_multiplier > 0 ? fmt::format(", noise multiplier {:g}", c->noise_multiplier)
                                       : std::string(),
               c->clients.size() - c->unclipped, c->clients.size(), c->next_norm);
  }
  if (r.resumed_tensors > 0) {
    fmt::print("resumed: {} tensors ({}) were kept from an interrupted run of this job\n",
               r.resumed_tensors, gb(static_cast<double>(r.resumed_bytes)));
  }
  fmt::print("report: {}\n", r.report_file.string());
  return 0;
}

}  // namespace

Command add_fuse(CLI::App& app) {
  struct Args {
    std::string job;
    bool quiet = false;
    std::size_t threads = num_threads();
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand(
      "fuse",
      "Run a fusion job: sub-model updates and LoRA adapters fused into the target, "
      "streamed within a memory budget, with progress and a JSON report");
  cmd->alias("aggregate");
  cmd->add_option("job", a->job, "Job JSON file")->required();
  cmd->add_flag("--quiet", a->quiet, "No progress on stderr");
  CLI::Option* threads = add_threads_option(cmd, a->threads);
  return {cmd, [a, threads] {
            set_num_threads(a->threads);
            return run_fuse(a->job, threads->count() > 0 ? a->threads : 0, a->quiet);
          }};
}

}  // namespace edgefuse::cli
