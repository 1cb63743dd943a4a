// The outputs of an experiment run (lab/report.h).
#include "lab/report.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>

#include "edgefuse/core/error.h"

namespace edgefuse::lab {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

const MethodRun& find_run(const std::vector<MethodRun>& runs, Method m, std::uint64_t seed) {
  for (const auto& r : runs) {
    if (r.method == m && r.seed == seed) return r;
  }
  detail::fail("no run of ", method_name(m), " for seed ", seed);
}

bool has_method(const Experiment& x, Method m) {
  return std::find(x.methods.begin(), x.methods.end(), m) != x.methods.end();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out.flush()) detail::fail("cannot write ", path.string());
}

std::string spread_text(const Spread& s, int digits) {
  return fmt::format("{:.{}f} [{:.{}f}, {:.{}f}]", s.mean, digits, s.min, digits, s.max, digits);
}

}  // namespace

double gap_closed(double largest_alone, double central, double method) {
  const double gap = largest_alone - central;
  if (!(gap > 0.0)) return std::numeric_limits<double>::quiet_NaN();
  return (largest_alone - method) / gap;
}

Spread spread_of(const std::vector<double>& v) {
  Spread s;
  if (v.empty()) return s;
  s.min = *std::min_element(v.begin(), v.end());
  s.max = *std::max_element(v.begin(), v.end());
  double sum = 0.0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  return s;
}

std::vector<MethodSummary> summarize(const Experiment& x, const std::vector<MethodRun>& runs) {
  const bool gaps = has_method(x, Method::kLargestAlone) && has_method(x, Method::kCentral);
  std::vector<MethodSummary> out;
  for (Method m : x.methods) {
    MethodSummary s{m, {}, {}};
    for (std::uint64_t seed : x.seeds) {
      const double final_bpc = find_run(runs, m, seed).rounds.back().overall;
      s.final_overall.push_back(final_bpc);
      if (gaps) {
        s.gap.push_back(
            gap_closed(find_run(runs, Method::kLargestAlone, seed).rounds.back().overall,
                       find_run(runs, Method::kCentral, seed).rounds.back().overall, final_bpc));
      }
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::string results_json(const Experiment& x, const std::vector<MethodRun>& runs,
                         const std::vector<std::int64_t>& client_parameters,
                         std::int64_t model_parameters) {
  ordered_json j;
  j["experiment"] = x.file.filename().string();
  j["model_parameters"] = model_parameters;
  j["seeds"] = x.seeds;
  ordered_json clients = ordered_json::array();
  for (std::size_t k = 0; k < x.clients.size(); ++k) {
    clients.push_back({{"name", x.clients[k].name},
                       {"group", x.clients[k].group},
                       {"width", x.clients[k].width},
                       {"layers", x.clients[k].layers},
                       {"parameters", client_parameters[k]}});
  }
  j["clients"] = clients;
  ordered_json methods = ordered_json::object();
  for (Method m : x.methods) {
    ordered_json seeds = ordered_json::object();
    for (std::uint64_t seed : x.seeds) {
      ordered_json rounds = ordered_json::array();
      for (const auto& r : find_run(runs, m, seed).rounds) {
        ordered_json groups = ordered_json::object();
        for (const auto& [g, v] : r.group_bpc) groups[g] = v;
        ordered_json up = ordered_json::object(), down = ordered_json::object();
        for (std::size_t k = 0; k < x.clients.size(); ++k) {
          up[x.clients[k].name] = r.bytes_up[k];
          down[x.clients[k].name] = r.bytes_down[k];
        }
        rounds.push_back({{"round", r.round},
                          {"overall_bpc", r.overall},
                          {"group_bpc", groups},
                          {"bytes_up", up},
                          {"bytes_down", down}});
      }
      seeds[std::to_string(seed)] = {{"rounds", rounds}};
    }
    methods[method_name(m)] = seeds;
  }
  j["methods"] = methods;
  ordered_json summary = ordered_json::object();
  for (const auto& s : summarize(x, runs)) {
    const Spread f = spread_of(s.final_overall);
    ordered_json e = {
        {"final_overall_bpc", s.final_overall}, {"mean", f.mean}, {"min", f.min}, {"max", f.max}};
    if (!s.gap.empty()) {
      ordered_json gaps = ordered_json::array();
      for (double g : s.gap)
        gaps.push_back(std::isnan(g) ? ordered_json(nullptr) : ordered_json(g));
      e["gap_closed"] = gaps;
    }
    summary[method_name(s.method)] = e;
  }
  j["summary"] = summary;
  return j.dump(1) + "\n";
}

std::string summary_table(const Experiment& x, const std::vector<MethodSummary>& summaries) {
  std::string t = fmt::format("{:<14} {:>27}  {:>27}\n", "method",
                              "final bits/char mean [min, max]", "gap closed mean [min, max]");
  for (const auto& s : summaries) {
    std::string gap = "-";
    if (!s.gap.empty() &&
        std::none_of(s.gap.begin(), s.gap.end(), [](double g) { return std::isnan(g); })) {
      gap = spread_text(spread_of(s.gap), 3);
    } else if (!s.gap.empty()) {
      gap = "n/a (central no better)";
    }
    t += fmt::format("{:<14} {:>31}  {:>27}\n", method_name(s.method),
                     spread_text(spread_of(s.final_overall), 3), gap);
  }
  t += fmt::format(
      "over {} seed(s); gap closed = (largest_alone - method) / (largest_alone - central), per "
      "seed\n",
      x.seeds.size());
  return t;
}

fs::path write_outputs(const fs::path& dir, const Experiment& x, const std::vector<MethodRun>& runs,
                       const std::vector<std::int64_t>& client_parameters,
                       std::int64_t model_parameters) {
  write_text(dir / "results.json", results_json(x, runs, client_parameters, model_parameters));
  ordered_json timing = ordered_json::object();
  for (Method m : x.methods) {
    ordered_json seeds = ordered_json::object();
    for (std::uint64_t seed : x.seeds) {
      ordered_json secs = ordered_json::array();
      for (const auto& r : find_run(runs, m, seed).rounds) secs.push_back(r.seconds);
      seeds[std::to_string(seed)] = secs;
    }
    timing[method_name(m)] = seeds;
  }
  write_text(dir / "timing.json", timing.dump(1) + "\n");

  std::string tsv = "round";
  for (Method m : x.methods) tsv += fmt::format("\t{0}_mean\t{0}_min\t{0}_max", method_name(m));
  tsv += "\n";
  for (int round = 0; round <= x.rounds; ++round) {
    tsv += std::to_string(round);
    for (Method m : x.methods) {
      std::vector<double> v;
      for (std::uint64_t seed : x.seeds)
        v.push_back(find_run(runs, m, seed).rounds[static_cast<std::size_t>(round)].overall);
      const Spread s = spread_of(v);
      tsv += fmt::format("\t{:.6f}\t{:.6f}\t{:.6f}", s.mean, s.min, s.max);
    }
    tsv += "\n";
  }
  write_text(dir / "bpc.tsv", tsv);

  std::string plot;
  for (std::size_t i = 0; i < x.methods.size(); ++i) {
    const std::size_t col = 2 + 3 * i;
    plot += fmt::format(
        "{}'bpc.tsv' using 1:{}:{} with filledcurves lc {} fs transparent solid 0.15 notitle, "
        "'' using 1:{} with lines lw 2 lc {} title '{}'",
        i ? ", " : "", col + 1, col + 2, i + 1, col, i + 1, method_name(x.methods[i]));
  }
  write_text(
      dir / "bpc.gp",
      fmt::format(
          "set terminal pngcairo size 900,560 noenhanced\nset output 'bpc.png'\n"
          "set title 'held-out bits per character (mean over {} seed(s), band: min-max)'\n"
          "set xlabel 'round'\nset ylabel 'bits per character'\nset key top right\nset grid\n"
          "plot {}\n",
          x.seeds.size(), plot));
  const std::string cmd =
      "cd '" + fs::absolute(dir).string() + "' && gnuplot bpc.gp >/dev/null 2>&1";
  if (std::system(cmd.c_str()) == 0 && fs::exists(dir / "bpc.png")) return dir / "bpc.png";
  return {};
}

}  // namespace edgefuse::lab
