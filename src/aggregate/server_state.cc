// A server optimizer's state tensors (aggregate/server_state.h).
#include "edgefuse/aggregate/server_state.h"

#include <unordered_map>
#include <utility>

#include "edgefuse/core/error.h"
#include "src/plan/slicing.h"

namespace edgefuse {

using detail::fail;

bool server_rule_has_v(ServerRule rule) noexcept {
  return rule == ServerRule::kFedAdam || rule == ServerRule::kFedYogi ||
         rule == ServerRule::kFedAdagrad;
}

namespace {
constexpr std::pair<ServerRule, const char*> kRuleNames[] = {
    {ServerRule::kFedAvgM, "fedavgm"},
    {ServerRule::kFedAdam, "fedadam"},
    {ServerRule::kFedYogi, "fedyogi"},
    {ServerRule::kFedAdagrad, "fedadagrad"},
    {ServerRule::kNesterov, "nesterov"}};
}  // namespace

const char* server_rule_name(ServerRule rule) noexcept {
  for (const auto& [r, name] : kRuleNames) {
    if (r == rule) return name;
  }
  return "unknown";
}

std::optional<ServerRule> server_rule_from_name(std::string_view name) noexcept {
  for (const auto& [r, rule_name] : kRuleNames) {
    if (name == rule_name) return r;
  }
  return std::nullopt;
}

std::string server_state_name(std::string_view tensor, char which) {
  std::string name(tensor);
  name += '.';
  name += which;
  return name;
}

ServerStateViews bind_server_state(const ModelLayout& layout, ServerRule rule,
                                   const NamedViews& previous, const std::string& label) {
  const std::size_t n = layout.tensors().size();
  ServerStateViews out;
  out.m.resize(n);
  out.v.resize(n);
  if (previous.empty()) return out;
  std::unordered_map<std::string_view, const ConstTensorView*> by_name;
  for (const auto& p : previous) by_name.emplace(p.name, &p.view);
  std::size_t used = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const TensorMeta& meta = layout.tensors()[i].meta;
    if (!detail::is_aggregatable(meta.dtype)) continue;
    for (const char which : {'m', 'v'}) {
      if (which == 'v' && !server_rule_has_v(rule)) continue;
      const std::string name = server_state_name(meta.name, which);
      const auto it = by_name.find(name);
      if (it == by_name.end()) fail(label, ": tensor '", name, "' is missing");
      const ConstTensorView& s = *it->second;
      if (s.dtype() != DType::kF32 || s.shape() != meta.shape) {
        fail(label, ": tensor '", name, "' is ", dtype_name(s.dtype()), " ", s.shape().to_string(),
             "; the state of '", meta.name, "' is F32 ", meta.shape.to_string());
      }
      (which == 'm' ? out.m : out.v)[i] = s;
      ++used;
    }
  }
  if (used != by_name.size()) {
    std::unordered_map<std::string, bool> wanted;
    for (const auto& t : layout.tensors()) {
      if (!detail::is_aggregatable(t.meta.dtype)) continue;
      wanted[server_state_name(t.meta.name, 'm')] = true;
      if (server_rule_has_v(rule)) wanted[server_state_name(t.meta.name, 'v')] = true;
    }
    for (const auto& p : previous) {
      if (!wanted.count(p.name)) {
        fail(label, ": tensor '", p.name, "' is not the state of a tensor of the target",
             server_rule_has_v(rule) ? "" : " (this rule keeps no second moment)");
      }
    }
    fail(label, ": a state tensor is given twice");
  }
  return out;
}

}  // namespace edgefuse
