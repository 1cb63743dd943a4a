// The shares of the tensor being computed (src/aggregate/share_cache.h).
#include "src/aggregate/share_cache.h"

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"

namespace edgefuse::detail {

const std::vector<const Share*>& ShareCache::of(std::size_t ti, const ModelLayout& layout,
                                                const std::vector<SubModelClient>& clients,
                                                const std::vector<LowRankClient>& low_rank) {
  if (shares_tensor_ == ti && sub_model_tensor_ == ti && low_rank_tensor_ == ti) return shares_;
  shares_tensor_ = kNone;
  build_sub_model(ti, layout, clients);
  build_low_rank(ti, layout, low_rank);
  shares_ = sub_model_;
  for (const LowRankShare& s : low_rank_) shares_.push_back(&s);
  owners_ = sub_model_owners_;
  for (const std::size_t k : low_rank_owners_) owners_.push_back(clients.size() + k);
  shares_tensor_ = ti;
  return shares_;
}

void ShareCache::build_sub_model(std::size_t ti, const ModelLayout& layout,
                                 const std::vector<SubModelClient>& clients) {
  if (sub_model_tensor_ == ti) return;
  sub_model_.clear();
  sub_model_owners_.clear();
  own_.clear();
  sub_model_tensor_ = kNone;
  const auto& t = layout.tensors()[ti];
  std::vector<std::size_t> holders;
  for (std::size_t k = 0; k < clients.size(); ++k) {
    if (clients[k].holds[ti] && clients[k].weight != 0.0f) holders.push_back(k);
  }
  RuleShares* rule = nullptr;
  if (t.layer >= 0) {
    if (rules_.size() != layout.schema().rules().size()) {
      rules_.clear();
      rules_.resize(layout.schema().rules().size());
    }
    rule = &rules_[t.rule];
    if (!rule->started) {
      rule->started = true;
      rule->shape = t.meta.shape;
      rule->of.resize(clients.size());
      rule->state.assign(clients.size(), Built::kNotYet);
    } else if (rule->shape != t.meta.shape) {
      rule = nullptr;  // a rule whose unbound dimensions differ by layer: built per tensor
    }
  }
  // Each client's share on its own, in parallel; kept in client order.
  if (rule != nullptr) {
    std::vector<std::size_t> missing;
    for (const std::size_t k : holders) {
      if (rule->state[k] == Built::kNotYet) missing.push_back(k);
    }
    parallel_for(missing.size(), 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        const std::size_t k = missing[i];
        rule->state[k] =
            SubModelShare::make(layout, t, clients[k], rule->of[k]) ? Built::kKept : Built::kEmpty;
      }
    });
    for (const std::size_t k : holders) {
      if (rule->state[k] == Built::kKept) {
        sub_model_.push_back(&rule->of[k]);
        sub_model_owners_.push_back(k);
      }
    }
  } else {
    own_.resize(holders.size());
    std::vector<char> kept(holders.size(), 0);
    parallel_for(holders.size(), 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        kept[i] = SubModelShare::make(layout, t, clients[holders[i]], own_[i]) ? 1 : 0;
      }
    });
    for (std::size_t i = 0; i < holders.size(); ++i) {
      if (kept[i]) {
        sub_model_.push_back(&own_[i]);
        sub_model_owners_.push_back(holders[i]);
      }
    }
  }
  sub_model_tensor_ = ti;
}

void ShareCache::build_low_rank(std::size_t ti, const ModelLayout& layout,
                                const std::vector<LowRankClient>& low_rank) {
  if (low_rank_tensor_ == ti) return;
  low_rank_.clear();
  low_rank_owners_.clear();
  made_.clear();
  low_rank_tensor_ = kNone;
  std::size_t on_demand = 0;
  for (const auto& c : low_rank) {
    if (c.weight == 0.0f) continue;
    for (const auto& entry : c.made_on_demand) on_demand += entry.first == ti ? 1 : 0;
  }
  made_.reserve(on_demand);  // the shares point into it
  for (std::size_t k = 0; k < low_rank.size(); ++k) {
    const auto& c = low_rank[k];
    if (c.weight == 0.0f) continue;
    for (const auto& d : c.deltas) {
      if (d.tensor == ti) {
        low_rank_.emplace_back(d, c.weight, c.clip);
        low_rank_owners_.push_back(k);
      }
    }
    for (const auto& [t, name] : c.made_on_demand) {
      if (t != ti) continue;
      LowRankDelta d = c.make(name);
      if (d.tensor != name) {
        fail(c.label, ": asked for tensor '", name, "' the source made '", d.tensor, "'");
      }
      made_.push_back(prepare_delta(std::move(d), layout, ti, c.label));
      low_rank_.emplace_back(made_.back(), c.weight, c.clip);
      low_rank_owners_.push_back(k);
    }
  }
  low_rank_tensor_ = ti;
}

void ShareCache::forget_sub_model() {
  sub_model_.clear();
  sub_model_.shrink_to_fit();
  own_.clear();
  own_.shrink_to_fit();
  rules_.clear();
  rules_.shrink_to_fit();
  sub_model_tensor_ = kNone;
  shares_tensor_ = kNone;
}

void ShareCache::forget_low_rank() {
  low_rank_tensor_ = kNone;
  shares_tensor_ = kNone;
}

void ShareCache::forget() {
  forget_sub_model();
  made_.clear();
  made_.shrink_to_fit();
  low_rank_.clear();
  low_rank_tensor_ = kNone;
  shares_tensor_ = kNone;
}

}  // namespace edgefuse::detail
