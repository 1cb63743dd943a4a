// Tests for edgefuse-lab (lab/): the experiment file's rules and messages, the held-out cut,
// characters per UTF-8 text, the gap arithmetic, and every method end to end on a tiny corpus,
// byte-identical for two thread counts. Torch first: glog's CHECK must not replace doctest's.
#include "lab/byte_llama.h"

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <sstream>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "edgefuse/core/parallel.h"
#include "error_of.h"
#include "lab/corpus.h"
#include "lab/experiment.h"
#include "lab/report.h"
#include "lab/run_experiment.h"

using namespace edgefuse;
using namespace edgefuse::lab;
using edgefuse_test::error_of;
namespace fs = std::filesystem;

namespace {

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void write(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

// A scratch folder with three small texts: English, German (UTF-8) and a proxy mix.
struct TinyCorpus {
  fs::path dir;
  TinyCorpus()
      : dir(fs::temp_directory_path() / ("edgefuse-lab-test-" + std::to_string(::getpid()))) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::string en, de, proxy;
    for (int i = 0; i < 60; ++i) {
      en += "the quick brown fox " + std::to_string(i % 7) + " jumps over the lazy dog\n";
      de += "Grüße aus München, " + std::to_string(i % 5) + " Bären über Straßen\n";
      if (i < 20) proxy += i % 2 ? "der Fuchs und der Bär\n" : "the fox and the bear\n";
    }
    write(dir / "en.txt", en);
    write(dir / "de.txt", de);
    write(dir / "proxy.txt", proxy);
    write(dir / "empty.txt", "");
  }
  ~TinyCorpus() { fs::remove_all(dir); }

  std::string experiment(const std::string& methods, const std::string& extra = "") const {
    return R"({"model": {"hidden": 16, "layers": 2, "heads": 4, "kv_heads": 2, "mlp": 32, "context": 16},
      "rounds": 2, "local_steps": 2, "batch": 4, "lr": 0.01, "seeds": [3, 4],
      "clients": [{"name": "laptop", "group": "en", "data": ["en.txt"]},
                  {"name": "tablet", "group": "de", "width": 0.5, "data": ["de.txt"]},
                  {"name": "phone", "group": "de", "width": 0.5, "layers": 0.5, "data": ["de.txt"]}],
      "proxy": {"files": ["proxy.txt"], "bytes": 200},
      "distill": {"steps": 2, "batch": 2},
      "methods": )" +
           methods + extra + "}";
  }
  Experiment parse(const std::string& text) const { return parse_experiment(text, dir / "x.json"); }
};

}  // namespace

TEST_CASE("lab: the held-out cut moves forward to just after a line end") {
  CHECK(heldout_cut("aaaa\nbbbb\ncccc\n", 0.5) == 10);  // point 7.5 -> 7, next line end at 9
  CHECK(heldout_cut("aaaa\nbbbb\ncccc\n", 0.1) == 15);  // the whole file is training text
  CHECK(heldout_cut("no line end", 0.5) == 11);
  CHECK(heldout_cut("ab\ncd\n", 0.9) == 3);
}

TEST_CASE("lab: characters are counted as UTF-8 lead bytes") {
  CHECK(utf8_characters("abc") == 3);
  CHECK(utf8_characters("Grüße") == 5);         // 7 bytes
  CHECK(utf8_characters("\xE2\x82\xAC") == 1);  // the euro sign
  // Labels per window: b ü1 | ü1 ü2 | ü2 c | c d; every label position counts, as in the loss.
  const Windows w = make_windows(
      "ab\xC3\xBC"
      "cd",
      2, 1);
  CHECK(w.size() == 4);
  CHECK(w.characters == 6);
  CHECK(make_windows("ab\xC3\xBC"
                     "cd",
                     2, 2)
            .characters == 3);  // b ü1 | ü2 c
}

TEST_CASE("lab: gap closed and spread") {
  CHECK(gap_closed(3.0, 2.0, 2.5) == doctest::Approx(0.5));
  CHECK(gap_closed(3.0, 2.0, 2.0) == doctest::Approx(1.0));
  CHECK(gap_closed(3.0, 2.0, 3.2) == doctest::Approx(-0.2));
  CHECK(std::isnan(gap_closed(2.0, 2.0, 1.0)));
  CHECK(std::isnan(gap_closed(2.0, 2.5, 1.0)));
  const Spread s = spread_of({1.0, 4.0, 2.5});
  CHECK(s.mean == doctest::Approx(2.5));
  CHECK(s.min == 1.0);
  CHECK(s.max == 4.0);
}

TEST_CASE("lab: a bad experiment file is an error naming the file and the key or client") {
  const TinyCorpus t;
  const std::string file = (t.dir / "x.json").string();
  CHECK(error_of([&] { t.parse(t.experiment(R"(["fedrolex"], "round": 3)")); }) ==
        "experiment " + file +
            ": key 'round' is not known (known keys: model, rounds, local_steps, batch, lr, "
            "seeds, threads, clients, heldout_fraction, eval_bytes, proxy, distill, methods)");
  CHECK(error_of([&] { t.parse(R"({"model": {"hiden": 8}})"); }) ==
        "experiment " + file +
            ": model key 'hiden' is not known (known keys: hidden, layers, heads, kv_heads, mlp, "
            "context)");
  std::string narrow = t.experiment(R"(["fedrolex"])");
  const std::string half_deep = R"("width": 0.5, "layers": 0.5)";
  narrow.replace(narrow.find(half_deep), half_deep.size(), R"("width": 0.25)");
  CHECK(error_of([&] { t.parse(narrow); }) == "experiment " + file +
                                                  ": client 'phone' width = 0.25 keeps 0.5 of 2 KV "
                                                  "groups (at least one whole group is needed)");
  std::string missing = t.experiment(R"(["fedrolex"])");
  missing.replace(missing.find("en.txt"), 6, "fr.txt");
  CHECK(error_of([&] { t.parse(missing); }) ==
        "experiment " + file + ": client 'laptop' data[0] names '" + (t.dir / "fr.txt").string() +
            "', which is not an existing file");
  std::string no_proxy = t.experiment(R"(["kd"])");
  const std::string proxy = R"("proxy": {"files": ["proxy.txt"], "bytes": 200})";
  no_proxy.replace(no_proxy.find(proxy), proxy.size(), R"("eval_bytes": 0)");
  CHECK(error_of([&] { t.parse(no_proxy); }) ==
        "experiment " + file +
            ": proxy.files must name the server's proxy text for the method 'kd'");
  CHECK(error_of([&] { t.parse(t.experiment(R"(["fedavg"])")); }) ==
        "experiment " + file +
            ": methods[0] = 'fedavg' is not a method (largest_alone, central, heterofl, fedrolex, "
            "kd, hybrid)");
  CHECK(error_of([&] {
          t.parse("{\"rounds\": 2");
        }).rfind("experiment " + file + ": not valid JSON (", 0) == 0);
}

TEST_CASE("lab: a client without training text after the cut, or an empty proxy, is named") {
  const TinyCorpus t;
  const std::string file = (t.dir / "x.json").string();
  std::string tiny = t.experiment(R"(["fedrolex"])");
  tiny.replace(tiny.find("en.txt"), 6, "empty.txt");
  CHECK(error_of([&] { read_corpus(t.parse(tiny)); }) ==
        "experiment " + file +
            ": client 'laptop' has 0 bytes of training text after the held-out cut "
            "(at least context + 1 = 17 are needed)");
  std::string empty_proxy = t.experiment(R"(["kd"])");
  empty_proxy.replace(empty_proxy.find("proxy.txt"), 9, "empty.txt");
  CHECK(error_of([&] { read_corpus(t.parse(empty_proxy)); }) ==
        "experiment " + file +
            ": the proxy text holds 0 bytes (at least context + 1 = 17 are needed)");
  std::string leak = t.experiment(R"(["kd"])");
  leak.replace(leak.find("proxy.txt"), 9, "de.txt");
  CHECK(error_of([&] { read_corpus(t.parse(leak)); }) ==
        "experiment " + file + ": proxy.files[0] (" + (t.dir / "de.txt").string() +
            ") is a client's data file: its held-out text must stay unseen");
}

TEST_CASE(
    "lab: every method runs end to end, and results.json is byte-identical for 1 and 2 threads") {
  const TinyCorpus t;
  const Experiment x = t.parse(
      t.experiment(R"(["largest_alone", "central", "heterofl", "fedrolex", "kd", "hybrid"])"));
  std::ostringstream log1, log2;
  {
    ScopedNumThreads one(1);
    RunOptions o;
    o.out = t.dir / "run1";
    CHECK(run_experiment(x, o, log1) == 0);
  }
  {
    ScopedNumThreads two(2);
    RunOptions o;
    o.out = t.dir / "run2";
    CHECK(run_experiment(x, o, log2) == 0);
  }
  const std::string r1 = read(t.dir / "run1" / "results.json");
  CHECK(r1 == read(t.dir / "run2" / "results.json"));
  CHECK(!fs::exists(t.dir / ".run1.lab-staging"));
  const auto j = nlohmann::json::parse(r1);
  CHECK(j["methods"].size() == 6);
  for (const char* m : {"largest_alone", "central", "heterofl", "fedrolex", "kd", "hybrid"}) {
    for (const char* seed : {"3", "4"}) {
      const auto& rounds = j["methods"][m][seed]["rounds"];
      REQUIRE(rounds.size() == 3);
      // The mean of the groups' bits per character, and training lowers it.
      const double en = rounds[2]["group_bpc"]["en"], de = rounds[2]["group_bpc"]["de"];
      CHECK(rounds[2]["overall_bpc"].get<double>() == doctest::Approx((en + de) / 2));
      CHECK(rounds[2]["overall_bpc"].get<double>() < rounds[0]["overall_bpc"].get<double>());
    }
  }
  // Round 0 is the same initial model for every method of a seed.
  CHECK(j["methods"]["kd"]["3"]["rounds"][0] == j["methods"]["central"]["3"]["rounds"][0]);
  // Payloads: the laptop sends its whole delta (f32); only it takes part in largest_alone;
  // kd sends logits of every proxy byte but the first (bf16, 256 per byte).
  const std::int64_t full = j["clients"][0]["parameters"];
  CHECK(j["methods"]["largest_alone"]["3"]["rounds"][1]["bytes_up"]["laptop"] == full * 4);
  CHECK(j["methods"]["largest_alone"]["3"]["rounds"][1]["bytes_up"]["tablet"] == 0);
  CHECK(j["methods"]["heterofl"]["3"]["rounds"][1]["bytes_up"]["tablet"] ==
        j["clients"][1]["parameters"].get<std::int64_t>() * 4);
  CHECK(j["methods"]["kd"]["3"]["rounds"][1]["bytes_up"]["phone"] ==
        192 * 256 * 2);  // 12 windows of 16
  CHECK(j["methods"]["hybrid"]["3"]["rounds"][2]["bytes_up"]["phone"] ==
        192 * 256 * 2 + j["clients"][2]["parameters"].get<std::int64_t>() * 4);
  // The summary's gap closed follows from the final values.
  const double la = j["methods"]["largest_alone"]["4"]["rounds"][2]["overall_bpc"];
  const double ce = j["methods"]["central"]["4"]["rounds"][2]["overall_bpc"];
  const double fr = j["methods"]["fedrolex"]["4"]["rounds"][2]["overall_bpc"];
  if (la > ce)
    CHECK(j["summary"]["fedrolex"]["gap_closed"][1].get<double>() ==
          doctest::Approx(gap_closed(la, ce, fr)));
  CHECK(log1.str().find("gap closed") != std::string::npos);
  CHECK(fs::exists(t.dir / "run1" / "bpc.tsv"));
  CHECK(fs::exists(t.dir / "run1" / "models" / "hybrid-seed4" / "final" / "model.safetensors"));
}

TEST_CASE("lab: an existing output is kept unless it is an earlier run and --replace is given") {
  const TinyCorpus t;
  const Experiment x = t.parse(t.experiment(R"(["fedrolex"])"));
  fs::create_directories(t.dir / "mine");
  write(t.dir / "mine" / "notes.txt", "keep me");
  std::ostringstream log;
  RunOptions o;
  o.out = t.dir / "mine";
  CHECK(error_of([&] { run_experiment(x, o, log); }) ==
        "output " + (t.dir / "mine").string() +
            " exists (pass --replace to replace an earlier run)");
  o.replace = true;
  CHECK(error_of([&] { run_experiment(x, o, log); }) ==
        "output " + (t.dir / "mine").string() +
            " is not an earlier edgefuse-lab run (no results.json in it): not replaced");
  CHECK(read(t.dir / "mine" / "notes.txt") == "keep me");
  // A failure after the checks (a data file gone) leaves neither the output nor a staging folder.
  const Experiment later = t.parse(t.experiment(R"(["fedrolex"])"));
  fs::remove(t.dir / "en.txt");
  o.out = t.dir / "fresh";
  o.replace = false;
  CHECK(error_of([&] { run_experiment(later, o, log); }) ==
        "data file " + (t.dir / "en.txt").string() + ": cannot be read");
  CHECK(!fs::exists(t.dir / "fresh"));
  CHECK(!fs::exists(t.dir / ".fresh.lab-staging"));
}

TEST_CASE("lab: the shipped experiments: laptops alone hold the whole model and English only") {
  const Experiment full = read_experiment(fs::path(EDGEFUSE_LAB_EXPERIMENTS) / "multilingual.json");
  const Experiment demo = read_experiment(fs::path(EDGEFUSE_LAB_EXPERIMENTS) / "demo.json");
  CHECK(full.seeds.size() == 3);
  CHECK(demo.seeds.size() == 1);
  CHECK(demo.rounds < full.rounds);
  REQUIRE(demo.clients.size() == full.clients.size());
  std::set<std::string> groups;
  double narrowest = 1.0;
  for (std::size_t k = 0; k < full.clients.size(); ++k) {
    const ClientSpec& c = full.clients[k];
    CAPTURE(c.name);
    CHECK(c.full_size() == (c.group == "en"));
    CHECK(demo.clients[k].width == c.width);
    groups.insert(c.group);
    narrowest = std::min(narrowest, c.width);
  }
  CHECK(groups == std::set<std::string>{"de", "en", "es", "it"});
  CHECK(narrowest == 0.125);
  // The smallest phone keeps exactly one whole KV group.
  CHECK(static_cast<double>(full.model.kv_heads) * narrowest == 1.0);
  CHECK(read_corpus(full).heldout.size() == 4);
  // The distillation story: one laptop and three phones, each on its own English categories.
  const Experiment distill = read_experiment(fs::path(EDGEFUSE_LAB_EXPERIMENTS) / "distill.json");
  REQUIRE(distill.clients.size() == 4);
  CHECK(distill.clients[0].full_size());
  for (std::size_t k = 1; k < 4; ++k) CHECK(distill.clients[k].width == 0.25);
  CHECK(read_corpus(distill).heldout.size() == 4);
}
