// Reading an experiment file (lab/experiment.h).
#include "lab/experiment.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <initializer_list>
#include <set>
#include <sstream>

#include "edgefuse/core/error.h"
#include "edgefuse/distill/teacher.h"

namespace edgefuse::lab {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Errors name the file and the key path ("clients[2].width").
struct Reader {
  const fs::path& file;

  [[noreturn]] void fail(const std::string& key, const std::string& rule) const {
    detail::fail("experiment ", file.string(), ": ", key, " ", rule);
  }

  void known_keys(const json& object, const std::string& where,
                  std::initializer_list<const char*> keys) const {
    if (!object.is_object()) fail(where.empty() ? "the file" : where, "must be a JSON object");
    for (const auto& item : object.items()) {
      bool known = false;
      for (const char* k : keys) known = known || item.key() == k;
      if (!known) {
        std::string list;
        for (const char* k : keys) list += std::string(list.empty() ? "" : ", ") + k;
        fail(where.empty() ? "key '" + item.key() + "'" : where + " key '" + item.key() + "'",
             "is not known (known keys: " + list + ")");
      }
    }
  }

  std::int64_t integer(const json& v, const std::string& key, std::int64_t lo,
                       std::int64_t hi) const {
    if (!v.is_number_integer()) fail(key, "must be an integer");
    const auto x = v.get<std::int64_t>();
    if (x < lo || x > hi)
      fail(key, "= " + std::to_string(x) + " must be in [" + std::to_string(lo) + ", " +
                    std::to_string(hi) + "]");
    return x;
  }

  double number(const json& v, const std::string& key, double lo, double hi, bool lo_open) const {
    if (!v.is_number()) fail(key, "must be a number");
    const double x = v.get<double>();
    std::ostringstream range;
    range << (lo_open ? "(" : "[") << lo << ", " << hi << "]";
    if (!std::isfinite(x) || x < lo || x > hi || (lo_open && x == lo)) {
      std::ostringstream seen;
      seen << x;
      fail(key, "= " + seen.str() + " must be in " + range.str());
    }
    return x;
  }

  std::string text(const json& v, const std::string& key) const {
    if (!v.is_string() || v.get<std::string>().empty()) fail(key, "must be a non-empty string");
    return v.get<std::string>();
  }

  // A data file: relative paths are read from the experiment file's folder; it must be a
  // readable regular file.
  fs::path data_file(const json& v, const std::string& key) const {
    fs::path p = text(v, key);
    if (p.is_relative()) p = file.parent_path() / p;
    std::error_code ec;
    if (!fs::is_regular_file(p, ec))
      fail(key, "names '" + p.string() + "', which is not an existing file");
    if (!std::ifstream(p, std::ios::binary))
      fail(key, "names '" + p.string() + "', which cannot be read");
    return p;
  }

  std::vector<fs::path> data_files(const json& v, const std::string& key) const {
    if (!v.is_array() || v.empty()) fail(key, "must be a non-empty array of file paths");
    std::vector<fs::path> out;
    for (std::size_t i = 0; i < v.size(); ++i)
      out.push_back(data_file(v[i], key + "[" + std::to_string(i) + "]"));
    return out;
  }
};

Method parse_method(const Reader& r, const json& v, const std::string& key) {
  const std::string name = r.text(v, key);
  for (Method m : {Method::kLargestAlone, Method::kCentral, Method::kHeteroFL, Method::kFedRolex,
                   Method::kKD, Method::kHybrid}) {
    if (name == method_name(m)) return m;
  }
  r.fail(key, "= '" + name +
                  "' is not a method (largest_alone, central, heterofl, fedrolex, kd, hybrid)");
}

}  // namespace

const char* method_name(Method method) {
  switch (method) {
    case Method::kLargestAlone:
      return "largest_alone";
    case Method::kCentral:
      return "central";
    case Method::kHeteroFL:
      return "heterofl";
    case Method::kFedRolex:
      return "fedrolex";
    case Method::kKD:
      return "kd";
    case Method::kHybrid:
      return "hybrid";
  }
  return "?";
}

Experiment parse_experiment(const std::string& text, const fs::path& file) {
  const Reader r{file};
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    detail::fail("experiment ", file.string(), ": not valid JSON (", e.what(), ")");
  }
  r.known_keys(j, "",
               {"model", "rounds", "local_steps", "batch", "lr", "seeds", "threads", "clients",
                "heldout_fraction", "eval_bytes", "proxy", "distill", "methods"});
  Experiment x;
  x.file = file;
  if (j.contains("model")) {
    const json& m = j["model"];
    r.known_keys(m, "model", {"hidden", "layers", "heads", "kv_heads", "mlp", "context"});
    auto get = [&](const char* k, std::int64_t& dst, std::int64_t hi) {
      if (m.contains(k)) dst = r.integer(m[k], std::string("model.") + k, 1, hi);
    };
    get("hidden", x.model.hidden, 4096);
    get("layers", x.model.layers, 64);
    get("heads", x.model.heads, 256);
    get("kv_heads", x.model.kv_heads, 256);
    get("mlp", x.model.mlp, 16384);
    get("context", x.model.context, 4096);
    if (x.model.hidden % x.model.heads != 0 || x.model.head_dim() % 2 != 0) {
      r.fail("model.heads", "= " + std::to_string(x.model.heads) + " must divide hidden " +
                                std::to_string(x.model.hidden) +
                                " into heads of an even size (RoPE)");
    }
    if (x.model.heads % x.model.kv_heads != 0) {
      r.fail("model.kv_heads", "= " + std::to_string(x.model.kv_heads) + " must divide heads " +
                                   std::to_string(x.model.heads));
    }
  }
  if (j.contains("rounds"))
    x.rounds = static_cast<int>(r.integer(j["rounds"], "rounds", 1, 100000));
  if (j.contains("local_steps"))
    x.local_steps = static_cast<int>(r.integer(j["local_steps"], "local_steps", 1, 1000000));
  if (j.contains("batch")) x.batch = r.integer(j["batch"], "batch", 1, 65536);
  if (j.contains("lr")) x.lr = r.number(j["lr"], "lr", 0.0, 10.0, true);
  if (j.contains("threads"))
    x.threads = static_cast<int>(r.integer(j["threads"], "threads", 0, 4096));
  if (j.contains("heldout_fraction"))
    x.heldout_fraction = r.number(j["heldout_fraction"], "heldout_fraction", 0.0, 0.9, true);
  if (j.contains("eval_bytes"))
    x.eval_bytes = r.integer(j["eval_bytes"], "eval_bytes", 0, std::int64_t{1} << 40);
  if (j.contains("seeds")) {
    const json& s = j["seeds"];
    if (!s.is_array() || s.empty()) r.fail("seeds", "must be a non-empty array of integers");
    x.seeds.clear();
    std::set<std::uint64_t> seen;
    for (std::size_t i = 0; i < s.size(); ++i) {
      const auto seed = static_cast<std::uint64_t>(
          r.integer(s[i], "seeds[" + std::to_string(i) + "]", 0, std::int64_t{1} << 53));
      if (!seen.insert(seed).second)
        r.fail("seeds[" + std::to_string(i) + "]", "repeats seed " + std::to_string(seed));
      x.seeds.push_back(seed);
    }
  }

  if (!j.contains("clients") || !j["clients"].is_array() || j["clients"].empty()) {
    r.fail("clients", "must be a non-empty array of clients");
  }
  std::set<std::string> names;
  for (std::size_t i = 0; i < j["clients"].size(); ++i) {
    const json& c = j["clients"][i];
    const std::string at = "clients[" + std::to_string(i) + "]";
    r.known_keys(c, at, {"name", "group", "width", "layers", "data"});
    ClientSpec spec;
    if (!c.contains("name")) r.fail(at + ".name", "is missing");
    spec.name = r.text(c["name"], at + ".name");
    const std::string who = "client '" + spec.name + "'";
    if (!names.insert(spec.name).second)
      r.fail(at + ".name", "repeats the name '" + spec.name + "'");
    spec.group = c.contains("group") ? r.text(c["group"], who + " group") : spec.name;
    if (c.contains("width")) spec.width = r.number(c["width"], who + " width", 0.0, 1.0, true);
    if (c.contains("layers")) spec.layers = r.number(c["layers"], who + " layers", 0.0, 1.0, true);
    if (!c.contains("data")) r.fail(who + " data", "is missing");
    spec.data = r.data_files(c["data"], who + " data");
    const double groups = static_cast<double>(x.model.kv_heads) * spec.width;
    if (groups < 1.0) {
      std::ostringstream os;
      os << "= " << spec.width << " keeps " << groups << " of " << x.model.kv_heads
         << " KV groups (at least one whole group is needed)";
      r.fail(who + " width", os.str());
    }
    if (static_cast<double>(x.model.layers) * spec.layers < 1.0) {
      std::ostringstream os;
      os << "= " << spec.layers << " keeps less than one of " << x.model.layers << " layers";
      r.fail(who + " layers", os.str());
    }
    x.clients.push_back(std::move(spec));
  }

  if (j.contains("proxy")) {
    const json& p = j["proxy"];
    r.known_keys(p, "proxy", {"files", "bytes"});
    if (p.contains("files")) x.proxy.files = r.data_files(p["files"], "proxy.files");
    if (p.contains("bytes"))
      x.proxy.bytes = r.integer(p["bytes"], "proxy.bytes", 1, std::int64_t{1} << 32);
  }
  if (j.contains("distill")) {
    const json& d = j["distill"];
    r.known_keys(d, "distill", {"steps", "batch", "lr", "temperature", "rule", "policy"});
    if (d.contains("steps"))
      x.distill.steps = static_cast<int>(r.integer(d["steps"], "distill.steps", 1, 1000000));
    if (d.contains("batch")) x.distill.batch = r.integer(d["batch"], "distill.batch", 1, 65536);
    if (d.contains("lr")) x.distill.lr = r.number(d["lr"], "distill.lr", 0.0, 10.0, true);
    if (d.contains("temperature"))
      x.distill.temperature = r.number(d["temperature"], "distill.temperature", 0.0, 100.0, true);
    if (d.contains("rule")) {
      x.distill.rule = r.text(d["rule"], "distill.rule");
      try {
        parse_teacher_rule(x.distill.rule);
      } catch (const Error& e) {
        r.fail("distill.rule", std::string("is not a teacher rule: ") + e.what());
      }
    }
    if (d.contains("policy")) {
      x.distill.policy = r.text(d["policy"], "distill.policy");
      if (x.distill.policy != "fedrolex" && x.distill.policy != "heterofl") {
        r.fail("distill.policy", "= '" + x.distill.policy + "' must be 'fedrolex' or 'heterofl'");
      }
    }
  }

  if (!j.contains("methods") || !j["methods"].is_array() || j["methods"].empty()) {
    r.fail("methods", "must be a non-empty array of method names");
  }
  for (std::size_t i = 0; i < j["methods"].size(); ++i) {
    const Method m = parse_method(r, j["methods"][i], "methods[" + std::to_string(i) + "]");
    for (Method seen : x.methods) {
      if (seen == m)
        r.fail("methods[" + std::to_string(i) + "]",
               std::string("repeats '") + method_name(m) + "'");
    }
    x.methods.push_back(m);
    if ((m == Method::kKD || m == Method::kHybrid) && x.proxy.files.empty()) {
      r.fail("proxy.files", std::string("must name the server's proxy text for the method '") +
                                method_name(m) + "'");
    }
    if (m == Method::kLargestAlone) {
      bool any = false;
      for (const auto& c : x.clients) any = any || c.full_size();
      if (!any)
        r.fail("methods[" + std::to_string(i) + "]",
               "'largest_alone' needs a client of width 1 and layers 1");
    }
  }
  return x;
}

Experiment read_experiment(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) detail::fail("experiment ", file.string(), ": cannot be read");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_experiment(text.str(), file);
}

}  // namespace edgefuse::lab
