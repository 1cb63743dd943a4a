// Schemas, presets and binding a model to a schema (plan/schema.h).
#include "edgefuse/plan/schema.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <set>

#include "edgefuse/io/checkpoint.h"
#include "src/plan/json_util.h"

namespace edgefuse {

using detail::fail;
using nlohmann::json;

std::vector<TensorMeta> tensor_metas(const Checkpoint& checkpoint) {
  std::vector<TensorMeta> out;
  out.reserve(checkpoint.size());
  for (const auto& e : checkpoint.tensors())
    out.push_back({e.info->name, e.info->dtype, e.info->shape});
  return out;
}

namespace {

constexpr std::string_view kLayerToken = "{layer}";

// Value of {layer} when `name` matches `pattern`; -1 for a pattern without {layer} that
// equals the name; -2 for no match.
std::int64_t match_pattern(std::string_view pattern, std::string_view name) {
  const auto at = pattern.find(kLayerToken);
  if (at == std::string_view::npos) return pattern == name ? -1 : -2;
  const auto prefix = pattern.substr(0, at);
  const auto suffix = pattern.substr(at + kLayerToken.size());
  if (name.size() <= prefix.size() + suffix.size()) return -2;
  if (name.substr(0, prefix.size()) != prefix) return -2;
  if (name.substr(name.size() - suffix.size()) != suffix) return -2;
  const auto digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.empty() || digits.size() > 9) return -2;
  if (digits.size() > 1 && digits[0] == '0') return -2;  // "01" is not layer 1
  std::int64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return -2;
    v = v * 10 + (c - '0');
  }
  return v;
}

std::string binding_text(const Schema& s, const DimBinding& b) {
  if (b.axis == DimBinding::kNoAxis) return "null";
  std::string a = s.axes()[static_cast<std::size_t>(b.axis)].name;
  return b.repeat == 1 ? a : std::to_string(b.repeat) + "*" + a;
}

struct SchemaBuilder {
  std::vector<Axis> axes;
  std::vector<TensorRule> rules;
  int axis(const std::string& name) const {
    for (std::size_t i = 0; i < axes.size(); ++i) {
      if (axes[i].name == name) return static_cast<int>(i);
    }
    return DimBinding::kNoAxis;
  }
  void add_axis(std::string name, std::uint64_t size, std::uint64_t group = 1) {
    axes.push_back({std::move(name), size, group});
  }
  // dims: axis names, "" for null, "3*heads" for repeats.
  void rule(std::string pattern, std::initializer_list<const char*> dims) {
    TensorRule r{std::move(pattern), {}};
    for (const char* d : dims) {
      std::string_view sv(d);
      DimBinding b;
      if (!sv.empty()) {
        const auto star = sv.find('*');
        if (star != std::string_view::npos) {
          b.repeat = static_cast<std::uint32_t>(std::stoul(std::string(sv.substr(0, star))));
          sv = sv.substr(star + 1);
        }
        b.axis = axis(std::string(sv));
        EDGEFUSE_DASSERT(b.axis != DimBinding::kNoAxis);
      }
      r.dims.push_back(b);
    }
    rules.push_back(std::move(r));
  }
};

std::uint64_t cfg_field(std::uint64_t v, const char* preset, const char* field) {
  if (v == 0) fail("schema preset '", preset, "': the model config lacks ", field);
  return v;
}

}  // namespace

ModelConfig parse_model_config(std::string_view json_text, const std::string& label) {
  const json j = detail::parse_config_json(json_text, label);
  if (!j.is_object()) fail(label, ": a model config must be a JSON object");
  ModelConfig c;
  auto get = [&](std::initializer_list<const char*> keys) -> std::uint64_t {
    for (const char* k : keys) {
      const auto it = j.find(k);
      if (it == j.end() || it->is_null()) continue;
      return detail::json_uint(*it, label + ": field '" + k + "'", 1, UINT32_MAX);
    }
    return 0;
  };
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) {
    c.model_type = it->get<std::string>();
  }
  c.hidden = get({"hidden_size", "n_embd"});
  c.layers = get({"num_hidden_layers", "n_layer"});
  c.heads = get({"num_attention_heads", "n_head"});
  c.kv_heads = get({"num_key_value_heads"});
  c.head_dim = get({"head_dim"});
  c.intermediate = get({"intermediate_size", "n_inner"});
  c.vocab = get({"vocab_size"});
  c.positions = get({"n_positions", "max_position_embeddings"});
  if (auto it = j.find("tie_word_embeddings"); it != j.end()) {
    if (!it->is_boolean()) fail(label, ": field 'tie_word_embeddings' must be true or false");
    c.tied_embeddings = it->get<bool>();
  } else {
    c.tied_embeddings = c.model_type == "gpt2";  // transformers' default for GPT-2
  }
  if (c.kv_heads == 0) c.kv_heads = c.heads;
  if (c.heads != 0 && c.heads % c.kv_heads != 0) {
    fail(label, ": num_attention_heads ", c.heads, " is not a multiple of num_key_value_heads ",
         c.kv_heads);
  }
  if (c.head_dim == 0 && c.heads != 0 && c.hidden != 0) {
    if (c.hidden % c.heads != 0) {
      fail(label, ": hidden size ", c.hidden, " is not a multiple of the head count ", c.heads,
           " and no head_dim is given");
    }
    c.head_dim = c.hidden / c.heads;
  }
  if (c.intermediate == 0 && c.model_type == "gpt2" && c.hidden != 0) c.intermediate = 4 * c.hidden;
  return c;
}

Schema Schema::preset(std::string_view name, const ModelConfig& cfg) {
  SchemaBuilder b;
  if (name == "llama") {
    const auto d = cfg_field(cfg.hidden, "llama", "hidden_size");
    const auto h = cfg_field(cfg.heads, "llama", "num_attention_heads");
    const auto kv = cfg.kv_heads ? cfg.kv_heads : h;
    const auto hd = cfg_field(cfg.head_dim, "llama", "head_dim");
    if (h % kv != 0) fail("schema preset 'llama': heads ", h, " not a multiple of kv_heads ", kv);
    b.add_axis("hidden", d);
    b.add_axis("heads", h, hd);
    b.add_axis("kv_heads", kv, hd);
    b.add_axis("mlp", cfg_field(cfg.intermediate, "llama", "intermediate_size"));
    b.add_axis("vocab", cfg_field(cfg.vocab, "llama", "vocab_size"));
    b.add_axis(kLayerAxis, cfg_field(cfg.layers, "llama", "num_hidden_layers"));
    const std::string l = "model.layers.{layer}.";
    b.rule("model.embed_tokens.weight", {"vocab", "hidden"});
    b.rule(l + "self_attn.q_proj.weight", {"heads", "hidden"});
    b.rule(l + "self_attn.k_proj.weight", {"kv_heads", "hidden"});
    b.rule(l + "self_attn.v_proj.weight", {"kv_heads", "hidden"});
    b.rule(l + "self_attn.q_proj.bias", {"heads"});  // Qwen2 has q/k/v biases
    b.rule(l + "self_attn.k_proj.bias", {"kv_heads"});
    b.rule(l + "self_attn.v_proj.bias", {"kv_heads"});
    b.rule(l + "self_attn.o_proj.weight", {"hidden", "heads"});
    b.rule(l + "self_attn.rotary_emb.inv_freq", {""});
    b.rule(l + "mlp.gate_proj.weight", {"mlp", "hidden"});
    b.rule(l + "mlp.up_proj.weight", {"mlp", "hidden"});
    b.rule(l + "mlp.down_proj.weight", {"hidden", "mlp"});
    b.rule(l + "input_layernorm.weight", {"hidden"});
    b.rule(l + "post_attention_layernorm.weight", {"hidden"});
    b.rule("model.norm.weight", {"hidden"});
    b.rule("lm_head.weight", {"vocab", "hidden"});
  } else if (name == "gpt2") {
    const auto d = cfg_field(cfg.hidden, "gpt2", "n_embd");
    const auto h = cfg_field(cfg.heads, "gpt2", "n_head");
    if (d % h != 0) fail("schema preset 'gpt2': n_embd ", d, " is not a multiple of n_head ", h);
    b.add_axis("hidden", d);
    b.add_axis("heads", h, d / h);
    b.add_axis("mlp", cfg.intermediate ? cfg.intermediate : 4 * d);
    b.add_axis("vocab", cfg_field(cfg.vocab, "gpt2", "vocab_size"));
    b.add_axis(kLayerAxis, cfg_field(cfg.layers, "gpt2", "n_layer"));
    for (const std::string p : {"", "transformer."}) {
      const std::string l = p + "h.{layer}.";
      b.rule(p + "wte.weight", {"vocab", "hidden"});
      b.rule(p + "wpe.weight", {"", "hidden"});
      b.rule(l + "ln_1.weight", {"hidden"});
      b.rule(l + "ln_1.bias", {"hidden"});
      b.rule(l + "attn.c_attn.weight", {"hidden", "3*heads"});  // Conv1D: [in, out]
      b.rule(l + "attn.c_attn.bias", {"3*heads"});
      b.rule(l + "attn.c_proj.weight", {"heads", "hidden"});
      b.rule(l + "attn.c_proj.bias", {"hidden"});
      b.rule(l + "attn.bias", {"", "", "", ""});  // causal-mask buffer of old checkpoints
      b.rule(l + "attn.masked_bias", {});
      b.rule(l + "ln_2.weight", {"hidden"});
      b.rule(l + "ln_2.bias", {"hidden"});
      b.rule(l + "mlp.c_fc.weight", {"hidden", "mlp"});
      b.rule(l + "mlp.c_fc.bias", {"mlp"});
      b.rule(l + "mlp.c_proj.weight", {"mlp", "hidden"});
      b.rule(l + "mlp.c_proj.bias", {"hidden"});
      b.rule(p + "ln_f.weight", {"hidden"});
      b.rule(p + "ln_f.bias", {"hidden"});
    }
    b.rule("lm_head.weight", {"vocab", "hidden"});
  } else {
    fail("unknown schema preset '", name, "' (presets: llama, gpt2, mlp)");
  }
  Schema s;
  s.axes_ = std::move(b.axes);
  s.rules_ = std::move(b.rules);
  return s;
}

std::vector<TensorMeta> llama_tensor_metas(const ModelConfig& c, DType dtype) {
  const auto d = cfg_field(c.hidden, "llama", "hidden_size");
  const auto h = cfg_field(c.heads, "llama", "num_attention_heads");
  const auto hd = cfg_field(c.head_dim, "llama", "head_dim");
  const auto f = cfg_field(c.intermediate, "llama", "intermediate_size");
  const auto v = cfg_field(c.vocab, "llama", "vocab_size");
  const auto layers = cfg_field(c.layers, "llama", "num_hidden_layers");
  const auto q = h * hd, kv = (c.kv_heads ? c.kv_heads : h) * hd;
  std::vector<TensorMeta> m{{"model.embed_tokens.weight", dtype, {v, d}}};
  for (std::uint64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    m.push_back({p + "self_attn.q_proj.weight", dtype, {q, d}});
    m.push_back({p + "self_attn.k_proj.weight", dtype, {kv, d}});
    m.push_back({p + "self_attn.v_proj.weight", dtype, {kv, d}});
    m.push_back({p + "self_attn.o_proj.weight", dtype, {d, q}});
    m.push_back({p + "mlp.gate_proj.weight", dtype, {f, d}});
    m.push_back({p + "mlp.up_proj.weight", dtype, {f, d}});
    m.push_back({p + "mlp.down_proj.weight", dtype, {d, f}});
    m.push_back({p + "input_layernorm.weight", dtype, {d}});
    m.push_back({p + "post_attention_layernorm.weight", dtype, {d}});
  }
  m.push_back({"model.norm.weight", dtype, {d}});
  if (!c.tied_embeddings) m.push_back({"lm_head.weight", dtype, {v, d}});
  return m;
}

Schema Schema::mlp(const std::vector<TensorMeta>& tensors) {
  struct Layer {
    std::string prefix;
    const TensorMeta* weight = nullptr;
    const TensorMeta* bias = nullptr;
  };
  std::map<std::string, Layer> by_prefix;
  for (const auto& t : tensors) {
    auto dot = t.name.rfind('.');
    const std::string suffix = dot == std::string::npos ? "" : t.name.substr(dot + 1);
    if (suffix != "weight" && suffix != "bias") {
      fail("schema preset 'mlp': tensor '", t.name, "' is neither <layer>.weight nor <layer>.bias");
    }
    auto& l = by_prefix[t.name.substr(0, dot)];
    l.prefix = t.name.substr(0, dot);
    (suffix == "weight" ? l.weight : l.bias) = &t;
  }
  std::vector<Layer> layers;
  for (auto& [p, l] : by_prefix) {
    if (l.weight == nullptr) fail("schema preset 'mlp': '", p, ".bias' has no '", p, ".weight'");
    if (l.weight->shape.rank() != 2) {
      fail("schema preset 'mlp': '", p, ".weight' has shape ", l.weight->shape.to_string(),
           ", expected [out, in]");
    }
    layers.push_back(l);
  }
  // Natural order: compare digit runs as numbers, so fc2 < fc10.
  auto natural_less = [](const std::string& a, const std::string& b) {
    std::size_t i = 0, j = 0;
    while (i < a.size() && j < b.size()) {
      if (std::isdigit(static_cast<unsigned char>(a[i])) &&
          std::isdigit(static_cast<unsigned char>(b[j]))) {
        std::size_t i2 = i, j2 = j;
        while (i2 < a.size() && std::isdigit(static_cast<unsigned char>(a[i2]))) ++i2;
        while (j2 < b.size() && std::isdigit(static_cast<unsigned char>(b[j2]))) ++j2;
        const auto na = std::stoull(a.substr(i, std::min<std::size_t>(i2 - i, 18)));
        const auto nb = std::stoull(b.substr(j, std::min<std::size_t>(j2 - j, 18)));
        if (na != nb) return na < nb;
        i = i2;
        j = j2;
      } else {
        if (a[i] != b[j]) return a[i] < b[j];
        ++i;
        ++j;
      }
    }
    return a.size() - i < b.size() - j;
  };
  std::sort(layers.begin(), layers.end(),
            [&](const Layer& x, const Layer& y) { return natural_less(x.prefix, y.prefix); });
  Schema s;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const auto out = layers[i].weight->shape[0];
    const bool last = i + 1 == layers.size();
    if (!last) s.axes_.push_back({"hidden" + std::to_string(i), out, 1});
    const int out_axis = last ? DimBinding::kNoAxis : static_cast<int>(i);
    const int in_axis = i == 0 ? DimBinding::kNoAxis : static_cast<int>(i - 1);
    s.rules_.push_back({layers[i].prefix + ".weight", {{out_axis, 1}, {in_axis, 1}}});
    if (layers[i].bias) s.rules_.push_back({layers[i].prefix + ".bias", {{out_axis, 1}}});
  }
  return s;
}

Schema Schema::from_json(std::string_view json_text, const std::string& label) {
  const json j = detail::parse_config_json(json_text, label);
  if (!j.is_object()) fail(label, ": a schema must be a JSON object with \"axes\" and \"tensors\"");
  for (const auto& [k, v] : j.items()) {
    if (k != "axes" && k != "tensors")
      fail(label, ": unknown key '", k, "' (expected axes, tensors)");
  }
  if (!j.contains("axes") || !j.at("axes").is_object()) fail(label, ": \"axes\" must be an object");
  if (!j.contains("tensors") || !j.at("tensors").is_object()) {
    fail(label, ": \"tensors\" must be an object");
  }
  Schema s;
  for (const auto& [name, spec] : j.at("axes").items()) {
    const std::string where = label + ": axis '" + name + "'";
    if (name.empty()) fail(label, ": an axis name is empty");
    if (!spec.is_object()) fail(where, ": expected {\"size\": N, \"group\": G}");
    Axis a{name, 0, 1};
    for (const auto& [k, v] : spec.items()) {
      if (k == "size") {
        a.size = detail::json_uint(v, where + " size", 1, UINT32_MAX);
      } else if (k == "group") {
        a.group = detail::json_uint(v, where + " group", 1, UINT32_MAX);
      } else {
        fail(where, ": unknown key '", k, "' (expected size, group)");
      }
    }
    if (a.size == 0 && name != kLayerAxis) fail(where, ": \"size\" is required");
    if (name == kLayerAxis && a.group != 1) fail(where, ": the layer axis has no group");
    s.axes_.push_back(std::move(a));
  }
  for (const auto& [pattern, dims] : j.at("tensors").items()) {
    const std::string where = label + ": tensor '" + pattern + "'";
    const auto first = pattern.find(kLayerToken);
    if (first != std::string::npos && pattern.find(kLayerToken, first + 1) != std::string::npos) {
      fail(where, ": more than one {layer}");
    }
    if (!dims.is_array()) fail(where, ": expected an array of axis names or null");
    if (dims.size() > static_cast<std::size_t>(kMaxRank)) fail(where, ": rank above ", kMaxRank);
    TensorRule r{pattern, {}};
    for (const auto& d : dims) {
      DimBinding b;
      if (!d.is_null()) {
        if (!d.is_string()) fail(where, ": a binding must be an axis name or null, got ", d.dump());
        std::string a = d.get<std::string>();
        if (const auto star = a.find('*'); star != std::string::npos) {
          const std::string rep = a.substr(0, star);
          if (rep.empty() || rep.size() > 4 ||
              !std::all_of(rep.begin(), rep.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
              std::stoul(rep) == 0) {
            fail(where, ": bad repeat in '", a, "' (expected <count>*<axis>)");
          }
          b.repeat = static_cast<std::uint32_t>(std::stoul(rep));
          a = a.substr(star + 1);
        }
        if (a == kLayerAxis) fail(where, ": the layer axis binds through {layer}, not a dimension");
        b.axis = s.find_axis(a);
        if (b.axis == DimBinding::kNoAxis) fail(where, ": unknown axis '", a, "'");
      }
      r.dims.push_back(b);
    }
    s.rules_.push_back(std::move(r));
  }
  return s;
}

int Schema::find_axis(std::string_view name) const noexcept {
  for (std::size_t i = 0; i < axes_.size(); ++i) {
    if (axes_[i].name == name) return static_cast<int>(i);
  }
  return DimBinding::kNoAxis;
}

std::string Schema::to_json() const {
  json j;
  j["axes"] = json::object();
  for (const auto& a : axes_) {
    json spec;
    if (a.size) spec["size"] = a.size;
    if (a.group != 1) spec["group"] = a.group;
    if (spec.is_null()) spec = json::object();
    j["axes"][a.name] = spec;
  }
  j["tensors"] = json::object();
  for (const auto& r : rules_) {
    json dims = json::array();
    for (const auto& d : r.dims) {
      dims.push_back(d.axis == DimBinding::kNoAxis ? json(nullptr) : json(binding_text(*this, d)));
    }
    j["tensors"][r.pattern] = dims;
  }
  return j.dump(2);
}

ModelLayout Schema::bind(const std::vector<TensorMeta>& tensors) const {
  ModelLayout layout;
  layout.schema_ = *this;
  Schema& s = layout.schema_;
  int layer_axis = s.find_axis(kLayerAxis);
  std::int64_t max_layer = -1;
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (!seen.insert(t.name).second) fail("schema: tensor '", t.name, "' appears twice");
    std::size_t match = 0, count = 0;
    std::int64_t layer = -2;
    for (std::size_t i = 0; i < s.rules_.size(); ++i) {
      const auto v = match_pattern(s.rules_[i].pattern, t.name);
      if (v == -2) continue;
      if (++count == 2) {
        fail("schema: tensor '", t.name, "' matches two entries, '", s.rules_[match].pattern,
             "' and '", s.rules_[i].pattern, "'");
      }
      match = i;
      layer = v;
    }
    if (count == 0) fail("schema: tensor '", t.name, "' matches no entry of the schema");
    const TensorRule& r = s.rules_[match];
    if (static_cast<std::size_t>(t.shape.rank()) != r.dims.size()) {
      fail("schema: tensor '", t.name, "' has shape ", t.shape.to_string(), " (rank ",
           t.shape.rank(), ") but entry '", r.pattern, "' binds ", r.dims.size(), " dimensions");
    }
    for (std::size_t d = 0; d < r.dims.size(); ++d) {
      const auto& b = r.dims[d];
      if (b.axis == DimBinding::kNoAxis) continue;
      const Axis& a = s.axes_[static_cast<std::size_t>(b.axis)];
      const std::uint64_t want = std::uint64_t{b.repeat} * a.size * a.group;
      if (t.shape[static_cast<int>(d)] != want) {
        fail("schema: tensor '", t.name, "' dimension ", d, " is ", t.shape[static_cast<int>(d)],
             " but axis '", a.name, "' gives ",
             b.repeat > 1 ? std::to_string(b.repeat) + " x " : "", a.size,
             a.group > 1 ? " x group " + std::to_string(a.group) : "", " = ", want, " (entry '",
             r.pattern, "')");
      }
    }
    if (layer >= 0) {
      if (layer_axis != DimBinding::kNoAxis && s.axes_[layer_axis].size != 0 &&
          static_cast<std::uint64_t>(layer) >= s.axes_[layer_axis].size) {
        fail("schema: tensor '", t.name, "' is in layer ", layer, " but the schema has ",
             s.axes_[layer_axis].size, " layers");
      }
      max_layer = std::max(max_layer, layer);
    }
    layout.tensors_.push_back({t, match, layer});
  }
  if (layer_axis == DimBinding::kNoAxis && max_layer >= 0) {
    s.axes_.push_back({kLayerAxis, 0, 1});
    layer_axis = static_cast<int>(s.axes_.size() - 1);
  }
  if (layer_axis != DimBinding::kNoAxis && s.axes_[layer_axis].size == 0) {
    s.axes_[layer_axis].size = static_cast<std::uint64_t>(max_layer + 1);
  }
  return layout;
}

const ModelLayout::Tensor* ModelLayout::find(std::string_view name) const noexcept {
  for (const auto& t : tensors_) {
    if (t.meta.name == name) return &t;
  }
  return nullptr;
}

std::string ModelLayout::name_for(const TensorRule& rule, std::int64_t layer) {
  std::string n = rule.pattern;
  const auto at = n.find(kLayerToken);
  if (at != std::string::npos) n.replace(at, kLayerToken.size(), std::to_string(layer));
  return n;
}

}  // namespace edgefuse
