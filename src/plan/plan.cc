// Plans: parsing, policy resolution, GQA rules and validation (plan/plan.h).
#include "edgefuse/plan/plan.h"

#include <algorithm>
#include <numeric>

#include "edgefuse/plan/policies.h"
#include "src/plan/json_util.h"

namespace edgefuse {

using detail::fail;
using nlohmann::json;

namespace {

struct Gqa {
  int heads = -1, kv = -1;
  std::uint64_t g = 1;  // query heads per KV head
  bool on() const { return heads >= 0 && kv >= 0; }
};

Gqa gqa_of(const ModelLayout& layout) {
  Gqa q;
  const int h = layout.schema().find_axis("heads"), k = layout.schema().find_axis("kv_heads");
  if (h < 0 || k < 0) return q;
  const auto H = layout.axis_size(h), G = layout.axis_size(k);
  if (G == 0 || H % G != 0) return q;
  q.heads = h;
  q.kv = k;
  q.g = H / G;
  return q;
}

Rational rate_of(const json& v, const std::string& where) {
  try {
    if (v.is_string()) return Rational::parse(v.get<std::string>());
    if (v.is_number()) return Rational::from_double(v.get<double>());
  } catch (const Error& e) {
    fail(where, ": ", e.what());
  }
  fail(where, ": a rate must be a number or a string such as \"1/3\", got ", v.dump());
}

std::vector<std::uint32_t> list_of(const json& v, const std::string& where) {
  std::vector<std::uint32_t> out;
  out.reserve(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    out.push_back(static_cast<std::uint32_t>(
        detail::json_uint(v[i], where + "[" + std::to_string(i) + "]", 0, UINT32_MAX)));
  }
  return out;
}

// Resolves a policy object on an axis of n indices.
std::vector<std::uint32_t> resolve_policy(const json& spec, std::uint64_t n,
                                          const std::string& axis, const std::string& where) {
  if (!spec.contains("policy") || !spec.at("policy").is_string()) {
    fail(where,
         ": a policy object needs \"policy\": \"heterofl\"|\"fedrolex\"|\"fjord\"|"
         "\"random\"|\"stride\"|\"prefix\"|\"rolling\"|\"full\"");
  }
  const std::string policy = spec.at("policy").get<std::string>();
  std::vector<std::string> allowed{"policy"};
  Rational rate{1, 1};
  auto take_size = [&](const char* rate_key) {
    allowed.push_back(rate_key);
    allowed.push_back("count");
    const bool has_rate = spec.contains(rate_key), has_count = spec.contains("count");
    if (has_rate == has_count) {
      fail(where, ": policy '", policy, "' needs exactly one of \"", rate_key, "\" and \"count\"");
    }
    if (has_rate) {
      rate = rate_of(spec.at(rate_key), where + " " + rate_key);
    } else {
      const auto k = detail::json_uint(spec.at("count"), where + " count", 1, n);
      rate = {k, n};
    }
  };
  std::vector<std::uint32_t> out;
  if (policy == "heterofl" || policy == "prefix") {
    take_size("rate");
    out = prefix_indices(n, rate);
  } else if (policy == "fjord") {
    take_size("p");
    out = prefix_indices(n, rate);
  } else if (policy == "fedrolex" || policy == "rolling") {
    take_size("rate");
    allowed.insert(allowed.end(), {"round", "offset", "convention"});
    if (!spec.contains("round")) fail(where, ": policy '", policy, "' needs \"round\"");
    const auto round = detail::json_uint(spec.at("round"), where + " round");
    const auto offset =
        spec.contains("offset") ? detail::json_uint(spec.at("offset"), where + " offset") : 0;
    auto conv = RollingConvention::kForward;
    if (spec.contains("convention")) {
      const auto& c = spec.at("convention");
      if (c == "backward") {
        conv = RollingConvention::kBackward;
      } else if (c != "forward") {
        fail(where,
             ": convention must be \"forward\" (paper) or \"backward\" (official code), got ",
             c.dump());
      }
    }
    out = rolling_window(n, rate, round, conv, offset);
  } else if (policy == "random") {
    take_size("rate");
    allowed.push_back("seed");
    if (!spec.contains("seed")) fail(where, ": policy 'random' needs \"seed\"");
    out = random_indices(n, rate, detail::json_uint(spec.at("seed"), where + " seed"), axis);
  } else if (policy == "stride") {
    take_size("rate");
    out = stride_indices(n, rate);
  } else if (policy == "full") {
    out.resize(n);
    std::iota(out.begin(), out.end(), 0u);
  } else {
    fail(where, ": unknown policy '", policy,
         "' (heterofl, prefix, fjord, fedrolex, rolling, random, stride, full)");
  }
  for (const auto& [k, v] : spec.items()) {
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end()) {
      fail(where, ": unknown key '", k, "' for policy '", policy, "'");
    }
  }
  return out;
}

void check_list(const std::vector<std::uint32_t>& list, std::uint64_t n, const std::string& where) {
  if (list.empty()) fail(where, ": the index list is empty");
  std::vector<bool> seen(n, false);
  for (std::size_t i = 0; i < list.size(); ++i) {
    if (list[i] >= n) {
      fail(where, ": index ", list[i], " at position ", i, " is out of range (axis size ", n, ")");
    }
    if (seen[list[i]])
      fail(where, ": index ", list[i], " appears twice (again at position ", i, ")");
    seen[list[i]] = true;
  }
}

}  // namespace

std::vector<std::uint32_t> axis_indices(const Plan& plan, const ModelLayout& layout, int axis) {
  const auto& a = layout.axes()[static_cast<std::size_t>(axis)];
  if (auto it = plan.axes.find(a.name); it != plan.axes.end()) return it->second;
  std::vector<std::uint32_t> all(a.size);
  std::iota(all.begin(), all.end(), 0u);
  return all;
}

void validate_plan(const Plan& plan, const ModelLayout& layout, const std::string& label) {
  const Schema& s = layout.schema();
  for (const auto& [name, list] : plan.axes) {
    const int a = s.find_axis(name);
    if (a < 0) fail(label, ": plan axis '", name, "' is not an axis of the schema");
    check_list(list, layout.axis_size(a), label + ": axis '" + name + "'");
  }
  for (const auto& [name, list] : plan.aggregate_only) {
    const int a = s.find_axis(name);
    if (a < 0) fail(label, ": aggregate_only axis '", name, "' is not an axis of the schema");
    check_list(list, layout.axis_size(a), label + ": aggregate_only '" + name + "'");
  }
  const Gqa q = gqa_of(layout);
  if (!q.on()) return;
  const auto heads = axis_indices(plan, layout, q.heads);
  const auto kv = axis_indices(plan, layout, q.kv);
  if (heads.size() % kv.size() != 0) {
    fail(label, ": ", heads.size(), " query heads cannot share ", kv.size(),
         " KV heads evenly (grouped-query attention needs a whole number per KV head)");
  }
  const std::size_t g_local = heads.size() / kv.size();
  for (std::size_t i = 0; i < heads.size(); ++i) {
    const std::uint64_t want = kv[i / g_local];
    if (heads[i] / q.g != want) {
      fail(label, ": query head ", heads[i], " (local ", i, ") belongs to KV head ", heads[i] / q.g,
           " but local KV head ", i / g_local, " is target KV head ", want,
           " (each KV head's query heads must follow it)");
    }
  }
}

Plan parse_plan(std::string_view json_text, const ModelLayout& layout, const std::string& label) {
  const json j = detail::parse_config_json(json_text, label);
  if (!j.is_object()) fail(label, ": a plan must be a JSON object of axis names");
  const Schema& s = layout.schema();
  const Gqa q = gqa_of(layout);
  Plan plan;
  const json* heads_spec = nullptr;
  for (const auto& [name, spec] : j.items()) {
    const std::string where = label + ": axis '" + name + "'";
    if (name == "aggregate_only") {
      if (!spec.is_object()) fail(label, ": aggregate_only must map axis names to index lists");
      for (const auto& [an, list] : spec.items()) {
        if (!list.is_array()) fail(label, ": aggregate_only '", an, "' must be an index list");
        auto v = list_of(list, label + ": aggregate_only '" + an + "'");
        std::sort(v.begin(), v.end());
        plan.aggregate_only[an] = std::move(v);
      }
      continue;
    }
    const int a = s.find_axis(name);
    if (a < 0) {
      std::string known;
      for (const auto& ax : s.axes()) known += (known.empty() ? "" : ", ") + ax.name;
      fail(where, ": not an axis of the schema (axes: ", known, ")");
    }
    if (q.on() && a == q.heads && spec.is_object()) {
      heads_spec = &spec;  // resolved below, once the KV groups are known
      continue;
    }
    const std::uint64_t n = layout.axis_size(a);
    std::vector<std::uint32_t> list;
    if (spec.is_array()) {
      list = list_of(spec, where);
    } else if (spec.is_object()) {
      list = resolve_policy(spec, n, name, where);
      if (name == kLayerAxis) std::sort(list.begin(), list.end());
    } else {
      fail(where, ": expected an index list or a policy object, got ", spec.dump());
    }
    plan.axes[name] = std::move(list);
  }
  if (q.on()) {
    const std::string hname = s.axes()[q.heads].name, kname = s.axes()[q.kv].name;
    const bool has_kv = plan.axes.count(kname) != 0;
    if (heads_spec != nullptr) {
      const std::string where = label + ": axis '" + hname + "'";
      if (q.g == 1) {
        plan.axes[hname] = resolve_policy(*heads_spec, layout.axis_size(q.heads), hname, where);
      } else {
        // Per-group head ids, the same in every kept group (the same heads in every group).
        const auto ids = resolve_policy(*heads_spec, q.g, hname, where);
        const auto groups = axis_indices(plan, layout, q.kv);
        std::vector<std::uint32_t> heads;
        for (auto grp : groups) {
          for (auto t : ids) heads.push_back(static_cast<std::uint32_t>(grp * q.g + t));
        }
        plan.axes[hname] = std::move(heads);
      }
    } else if (has_kv && plan.axes.count(hname) == 0) {
      // Whole groups (option a): every query head of each kept KV head.
      std::vector<std::uint32_t> heads;
      for (auto grp : plan.axes[kname]) {
        for (std::uint64_t t = 0; t < q.g; ++t) {
          heads.push_back(static_cast<std::uint32_t>(grp * q.g + t));
        }
      }
      plan.axes[hname] = std::move(heads);
    }
    if (!has_kv && plan.axes.count(hname) != 0) {
      // KV heads follow the query heads, in order of first appearance.
      std::vector<std::uint32_t> kv;
      for (auto h : plan.axes[hname]) {
        const auto grp = static_cast<std::uint32_t>(h / q.g);
        if (std::find(kv.begin(), kv.end(), grp) == kv.end()) kv.push_back(grp);
      }
      plan.axes[kname] = std::move(kv);
    }
  }
  validate_plan(plan, layout, label);
  return plan;
}

std::string plan_to_json(const Plan& plan) {
  json j = json::object();
  for (const auto& [name, list] : plan.axes) j[name] = list;
  if (!plan.aggregate_only.empty()) {
    j["aggregate_only"] = json::object();
    for (const auto& [name, list] : plan.aggregate_only) j["aggregate_only"][name] = list;
  }
  return j.dump();
}

}  // namespace edgefuse
