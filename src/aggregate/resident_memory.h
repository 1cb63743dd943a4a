// Private: the bytes an Aggregator keeps for its clients (Aggregator::resident_bytes()),
// counted as clients are added.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/aggregate/sub_model_share.h"

namespace edgefuse::detail {

class ResidentMemory {
 public:
  explicit ResidentMemory(const ModelLayout& layout);
  // A sub-model client: its plan, index lists and per-tensor tables until finalize, and
  // its share of each tensor it holds (`tensors`, its plan's).
  void add_sub_model_client(const ModelLayout& layout, const SubModelClient& client,
                            const std::vector<ClientTensor>& tensors);
  // Bytes kept until finalize (a low-rank client's label and the factors it gave).
  void add_kept(std::uint64_t bytes) { kept_ += bytes; }
  // Bytes that exist only while layout tensor `tensor` is computed (factors made on demand).
  void add_while_computing(std::size_t tensor, std::uint64_t bytes) {
    while_computing_[tensor] += bytes;
  }
  // The total for `sub_model_clients` clients with `threads` threads building shares.
  std::uint64_t total(std::size_t sub_model_clients, std::size_t threads) const;

 private:
  std::uint64_t kept_ = 0;
  std::vector<std::uint64_t> while_computing_;  // by tensor
  std::vector<std::uint64_t> rule_;             // by schema rule: its kept shares
  std::vector<bool> layer_rule_;                // by schema rule: it names a tensor of a layer
  std::uint64_t build_peak_ = 0;                // temporaries of building one share
};

}  // namespace edgefuse::detail
