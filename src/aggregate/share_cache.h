// Private: the shares of the tensor being computed, built once per tensor and, for the
// tensors of a {layer} rule, once per rule.
//
// A client's share of a {layer} rule's tensor is the same in every layer (its plan's lists
// do not depend on the layer), so those shares are built once per rule and client and kept
// until forget(); the others are built per tensor and freed when the next is asked for.
// Low-rank deltas made on demand exist only while their tensor is the current one.
#pragma once

#include <cstddef>
#include <vector>

#include "src/aggregate/low_rank_share.h"
#include "src/aggregate/sub_model_share.h"

namespace edgefuse::detail {

class ShareCache {
 public:
  // The shares of layout tensor ti: the sub-model clients' in the order they were added,
  // then the low-rank clients' in theirs (clients of weight 0 have none). Builds the
  // sub-model shares in parallel; calls the low-rank sources of ti (which may throw).
  const std::vector<const Share*>& of(std::size_t ti, const ModelLayout& layout,
                                      const std::vector<SubModelClient>& clients,
                                      const std::vector<LowRankClient>& low_rank);
  // The client of each share of the last of(): a sub-model client's index, or the number of
  // sub-model clients plus a low-rank client's index.
  const std::vector<std::size_t>& owners() const noexcept { return owners_; }
  // After sub-model clients were added or dropped (the shares point at them).
  void forget_sub_model();
  // After a low-rank client was added.
  void forget_low_rank();
  void forget();

 private:
  static constexpr std::size_t kNone = static_cast<std::size_t>(-1);
  enum class Built : char { kNotYet, kKept, kEmpty };
  struct RuleShares {
    bool started = false;
    Shape shape;                    // of the tensor they were built for
    std::vector<SubModelShare> of;  // by client index
    std::vector<Built> state;       // by client index
  };
  void build_sub_model(std::size_t ti, const ModelLayout& layout,
                       const std::vector<SubModelClient>& clients);
  void build_low_rank(std::size_t ti, const ModelLayout& layout,
                      const std::vector<LowRankClient>& low_rank);

  std::size_t sub_model_tensor_ = kNone, low_rank_tensor_ = kNone, shares_tensor_ = kNone;
  std::vector<const Share*> sub_model_;  // into own_ or rules_
  std::vector<std::size_t> sub_model_owners_, low_rank_owners_, owners_;
  std::vector<SubModelShare> own_;
  std::vector<RuleShares> rules_;  // by schema rule
  std::vector<PreparedDelta> made_;
  std::vector<LowRankShare> low_rank_;
  std::vector<const Share*> shares_;
};

}  // namespace edgefuse::detail
