// PEFT adapter folders: adapter_config.json and the pairing of lora_A / lora_B tensors.
#include "edgefuse/io/peft.h"

#include <re2/re2.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "src/io/io_util.h"

namespace edgefuse {

namespace fs = std::filesystem;
using detail::io_fail;
using detail::printable;
using ojson = nlohmann::ordered_json;

namespace {

constexpr std::string_view kPrefix = "base_model.model.";
constexpr int kMaxRankValue = 1 << 20;

// A rank_pattern / alpha_pattern key is at most this long; longer is an invalid adapter.
constexpr std::size_t kMaxPatternBytes = 1024;

// PEFT's get_pattern_key: the key K matches a module when re.match(r"(.*\.)?(K)$", module)
// does. Matched with RE2, whose automata run in time linear in the module name whatever the
// pattern (no backtracking: "(x+x+)+y" cannot hang a round); RE2 has no backreferences or
// lookaround, and a key that needs them is refused when the config is read.
std::unique_ptr<RE2> compile_pattern(const std::string& key) {
  RE2::Options o;
  o.set_log_errors(false);
  return std::make_unique<RE2>("(?:.*\\.)?(?:" + key + ")", o);
}

// The value of the first key (file order) that matches `module`.
template <typename V>
const V* pattern_value(const std::vector<std::pair<std::string, V>>& patterns,
                       std::string_view module) {
  for (const auto& [key, value] : patterns) {
    const auto re = compile_pattern(key);
    if (re->ok() && RE2::FullMatch(re2::StringPiece(module.data(), module.size()), *re))
      return &value;
  }
  return nullptr;
}

// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
double lora_scaling(double alpha, int rank, bool rslora) {
  return alpha / (rslora ? std::sqrt(static_cast<double>(rank)) : static_cast<double>(rank));
}

}  // namespace

int LoraConfig::rank_for(std::string_view module) const {
  const int* v = pattern_value(rank_pattern, module);
  return v ? *v : r;
}

double LoraConfig::alpha_for(std::string_view module) const {
  const double* v = pattern_value(alpha_pattern, module);
  return v ? *v : lora_alpha;
}

double LoraConfig::scaling_for(std::string_view module) const {
  return lora_scaling(alpha_for(module), rank_for(module), use_rslora);
}

LoraConfig parse_lora_config(std::string_view text, std::string_view label) {
  const std::string file(label);
  auto bad = [&](const std::string& detail) -> void {
    io_fail(CheckpointRule::kInvalidAdapter, file, "", detail);
  };
  // Strict pass (UTF-8, duplicates, depth), then an order-preserving parse for the patterns.
  (void)detail::parse_json_strict(text, file, CheckpointRule::kInvalidAdapter);
  const ojson j = ojson::parse(text.begin(), text.end());
  if (!j.is_object()) bad("adapter_config.json is not a JSON object");
  LoraConfig c;
  auto positive_int = [&](const ojson& v, const std::string& what) {
    if (!v.is_number_integer() || v.get<std::int64_t>() <= 0 ||
        v.get<std::int64_t>() > kMaxRankValue) {
      bad(what + " must be an integer in [1, " + std::to_string(kMaxRankValue) + "], got " +
          printable(v.dump(), 60));
    }
    return static_cast<int>(v.get<std::int64_t>());
  };
  auto finite = [&](const ojson& v, const std::string& what) {
    if (!v.is_number() || !std::isfinite(v.get<double>())) {
      bad(what + " must be a finite number, got " + printable(v.dump(), 60));
    }
    return v.get<double>();
  };
  auto boolean = [&](const ojson& v, const std::string& what) {
    if (!v.is_boolean()) bad(what + " must be true or false, got " + printable(v.dump(), 60));
    return v.get<bool>();
  };
  auto check_regex = [&](const std::string& key, const std::string& what) {
    if (key.size() > kMaxPatternBytes) {
      bad(what + " key '" + printable(key, 60) + "' is " + std::to_string(key.size()) +
          " bytes long, above the cap of " + std::to_string(kMaxPatternBytes));
    }
    const auto re = compile_pattern(key);
    if (!re->ok()) {
      bad(what + " key '" + printable(key) +
          "' is not a regular expression edgefuse can match in " +
          "linear time (RE2 syntax, no backreferences or lookaround): " + re->error());
    }
  };
  for (const auto& [key, v] : j.items()) {
    if (key == "peft_type") {
      if (!v.is_string() || v.get<std::string>() != "LORA") {
        bad("peft_type is " + printable(v.dump(), 60) + ", only \"LORA\" is supported");
      }
    } else if (key == "base_model_name_or_path") {
      if (v.is_string()) {
        c.base_model_name_or_path = v.get<std::string>();
      } else if (!v.is_null()) {
        bad("base_model_name_or_path must be a string or null");
      }
    } else if (key == "r") {
      c.r = positive_int(v, "r");
    } else if (key == "lora_alpha") {
      c.lora_alpha = finite(v, "lora_alpha");
    } else if (key == "use_rslora") {
      c.use_rslora = boolean(v, "use_rslora");
    } else if (key == "fan_in_fan_out") {
      c.fan_in_fan_out = boolean(v, "fan_in_fan_out");
    } else if (key == "target_modules") {
      if (v.is_string()) {
        c.target_modules_pattern = v.get<std::string>();
      } else if (v.is_array()) {
        for (const auto& m : v) {
          if (!m.is_string()) bad("target_modules entries must be strings");
          c.target_modules.push_back(m.get<std::string>());
        }
      } else if (!v.is_null()) {
        bad("target_modules must be a list of names, a regex string or null");
      }
    } else if (key == "rank_pattern" || key == "alpha_pattern") {
      if (v.is_null()) continue;
      if (!v.is_object()) bad(key + " must be an object");
      for (const auto& [pk, pv] : v.items()) {
        check_regex(pk, key);
        if (key == "rank_pattern") {
          c.rank_pattern.emplace_back(pk, positive_int(pv, "rank_pattern['" + pk + "']"));
        } else {
          c.alpha_pattern.emplace_back(pk, finite(pv, "alpha_pattern['" + pk + "']"));
        }
      }
    } else {
      c.other[key] = v.dump();
    }
  }
  return c;
}

std::string lora_config_json(const LoraConfig& c) {
  nlohmann::json j = nlohmann::json::object();  // sorted keys, as PEFT's json.dumps(sort_keys)
  for (const auto& [k, v] : c.other) j[k] = nlohmann::json::parse(v);
  j["peft_type"] = c.peft_type;
  j["base_model_name_or_path"] = c.base_model_name_or_path.empty()
                                     ? nlohmann::json()
                                     : nlohmann::json(c.base_model_name_or_path);
  j["r"] = c.r;
  if (std::nearbyint(c.lora_alpha) == c.lora_alpha && std::fabs(c.lora_alpha) < 9.0e15) {
    j["lora_alpha"] = static_cast<std::int64_t>(c.lora_alpha);
  } else {
    j["lora_alpha"] = c.lora_alpha;
  }
  if (c.target_modules_pattern) {
    j["target_modules"] = *c.target_modules_pattern;
  } else {
    j["target_modules"] = c.target_modules;
  }
  j["use_rslora"] = c.use_rslora;
  j["fan_in_fan_out"] = c.fan_in_fan_out;
  nlohmann::json rp = nlohmann::json::object(), ap = nlohmann::json::object();
  for (const auto& [k, v] : c.rank_pattern) rp[k] = v;
  for (const auto& [k, v] : c.alpha_pattern) ap[k] = v;
  j["rank_pattern"] = rp;
  j["alpha_pattern"] = ap;
  return j.dump(2) + "\n";
}

std::string peft_tensor_name(std::string_view module, char factor) {
  return std::string(kPrefix) + std::string(module) + ".lora_" + factor + ".weight";
}

PeftAdapter PeftAdapter::open(const fs::path& folder) {
  PeftAdapter a;
  const fs::path config_path = folder / "adapter_config.json";
  a.config_ = parse_lora_config(
      detail::read_small_file(config_path, 16u << 20, CheckpointRule::kInvalidAdapter),
      config_path.string());
  std::error_code ec;
  fs::path weights = folder / "adapter_model.safetensors";
  if (!fs::exists(weights, ec) && fs::exists(folder / "adapter_model.safetensors.index.json", ec)) {
    weights = folder / "adapter_model.safetensors.index.json";
  }
  if (!fs::exists(weights, ec)) {
    io_fail(CheckpointRule::kNoCheckpoint, folder.string(), "",
            "no adapter_model.safetensors in the adapter folder");
  }
  a.checkpoint_ = std::make_unique<Checkpoint>(Checkpoint::open(weights));
  const std::string file = a.checkpoint_->path().string();

  struct Half {
    const TensorInfo* a = nullptr;
    const TensorInfo* b = nullptr;
    LoraPair::Kind kind = LoraPair::Kind::kLinear;
  };
  std::map<std::string, Half> halves;
  static constexpr struct {
    std::string_view suffix;
    char factor;
    LoraPair::Kind kind;
  } kSuffixes[] = {{".lora_A.weight", 'A', LoraPair::Kind::kLinear},
                   {".lora_B.weight", 'B', LoraPair::Kind::kLinear},
                   {".lora_embedding_A", 'A', LoraPair::Kind::kEmbedding},
                   {".lora_embedding_B", 'B', LoraPair::Kind::kEmbedding}};
  for (const auto& e : a.checkpoint_->tensors()) {
    const std::string& name = e.info->name;
    bool matched = false;
    if (name.compare(0, kPrefix.size(), kPrefix) == 0) {
      for (const auto& s : kSuffixes) {
        if (name.size() > kPrefix.size() + s.suffix.size() &&
            name.compare(name.size() - s.suffix.size(), s.suffix.size(), s.suffix) == 0) {
          const std::string module =
              name.substr(kPrefix.size(), name.size() - kPrefix.size() - s.suffix.size());
          Half& h = halves[module];
          if (h.a != nullptr || h.b != nullptr) {
            if (h.kind != s.kind) {
              io_fail(CheckpointRule::kInvalidAdapter, file, name,
                      "module has both linear and embedding LoRA factors");
            }
          }
          h.kind = s.kind;
          (s.factor == 'A' ? h.a : h.b) = e.info;
          matched = true;
          break;
        }
      }
    }
    if (!matched) a.other_.push_back(name);
  }
  for (const auto& [module, h] : halves) {
    const TensorInfo* present = h.a ? h.a : h.b;
    if (h.a == nullptr || h.b == nullptr) {
      io_fail(CheckpointRule::kInvalidAdapter, file, present->name,
              std::string("has no matching lora_") + (h.a ? "B" : "A") + " factor");
    }
    for (const TensorInfo* t : {h.a, h.b}) {
      if (t->shape.rank() != 2 || !is_compute_dtype(t->dtype)) {
        io_fail(CheckpointRule::kInvalidAdapter, file, t->name,
                "a LoRA factor must be a 2-D F32, BF16 or F16 tensor, found " +
                    std::string(dtype_name(t->dtype)) + " " + t->shape.to_string());
      }
    }
    LoraPair p;
    p.kind = h.kind;
    p.module = module;
    p.base_weight = module + ".weight";
    p.a_name = h.a->name;
    p.b_name = h.b->name;
    p.rank = a.config_.rank_for(module);
    p.alpha = a.config_.alpha_for(module);
    p.scaling = lora_scaling(p.alpha, p.rank, a.config_.use_rslora);  // patterns matched once
    p.in_features = h.a->shape[1];
    p.out_features = h.b->shape[0];
    if (h.a->shape[0] != static_cast<std::uint64_t>(p.rank) ||
        h.b->shape[1] != static_cast<std::uint64_t>(p.rank)) {
      io_fail(CheckpointRule::kInvalidAdapter, file, module,
              "lora_A is " + h.a->shape.to_string() + " and lora_B " + h.b->shape.to_string() +
                  " but adapter_config.json gives this module rank " + std::to_string(p.rank));
    }
    a.pairs_.push_back(std::move(p));
  }
  return a;
}

std::vector<std::string> write_peft_adapter(const fs::path& folder, const LoraConfig& config,
                                            const std::vector<LoraFactors>& factors,
                                            WriteOptions options) {
  options.file_stem = "adapter_model";
  CheckpointWriter writer(folder, std::move(options));
  for (const auto& f : factors) {
    const auto r = static_cast<std::uint64_t>(config.rank_for(f.module));
    if (f.a.rank() != 2 || f.b.rank() != 2 || f.a.shape()[0] != r || f.b.shape()[1] != r) {
      io_fail(CheckpointRule::kInvalidArgument, folder.string(), f.module,
              "factors must be A (r, in) and B (out, r) with r = " + std::to_string(r) +
                  ", got A " + f.a.shape().to_string() + " and B " + f.b.shape().to_string());
    }
    if (f.kind == LoraPair::Kind::kEmbedding) {
      writer.add(std::string(kPrefix) + f.module + ".lora_embedding_A", f.a);
      writer.add(std::string(kPrefix) + f.module + ".lora_embedding_B", f.b);
    } else {
      writer.add(peft_tensor_name(f.module, 'A'), f.a);
      writer.add(peft_tensor_name(f.module, 'B'), f.b);
    }
  }
  writer.add_file("adapter_config.json", lora_config_json(config));
  return writer.commit();
}

}  // namespace edgefuse
