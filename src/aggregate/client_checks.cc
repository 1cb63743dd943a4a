// The checks a client meets before it joins a round (src/aggregate/client_checks.h).
#include "src/aggregate/client_checks.h"

#include <algorithm>
#include <map>
#include <set>

#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "src/kernels/nonfinite.h"

namespace edgefuse::detail {

void check_client_weight(float weight, const std::string& label) {
  if (!(weight - weight == 0.0f) || weight < 0.0f) {
    fail(label, ": client weight ", weight, " is negative or not finite");
  }
}

void check_low_rank_client(AggregateMode mode, float weight, const std::string& label) {
  if (mode != AggregateMode::kDelta) {
    fail(label, ": low-rank (LoRA) updates are deltas; the aggregation mode must be delta");
  }
  if (!(weight >= 0.0f) || !(weight - weight == 0.0f)) {
    fail(label, ": weight ", weight, " must be finite and >= 0 (client rejected)");
  }
}

std::vector<std::string> nonfinite_faults(const std::vector<ScanJob>& jobs) {
  struct Piece {
    std::size_t job, tensor, begin, end;
  };
  constexpr std::size_t kPiece = std::size_t{1} << 18;
  std::vector<Piece> pieces;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    for (std::size_t i = 0; i < jobs[j].tensors.size(); ++i) {
      const auto n = static_cast<std::size_t>(jobs[j].tensors[i].second->numel());
      for (std::size_t b = 0; b < n; b += kPiece)
        pieces.push_back({j, i, b, std::min(n, b + kPiece)});
    }
  }
  std::vector<std::size_t> bad(pieces.size(), kNoIndex);
  parallel_for(pieces.size(), 1, [&](std::size_t b, std::size_t e) {
    for (std::size_t k = b; k < e; ++k) {
      const Piece& p = pieces[k];
      bad[k] = first_nonfinite(*jobs[p.job].tensors[p.tensor].second, p.begin, p.end);
    }
  });
  std::vector<std::string> fault(jobs.size());
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    const Piece& p = pieces[k];
    if (bad[k] == kNoIndex || !fault[p.job].empty()) continue;
    fault[p.job] =
        concat(*jobs[p.job].label, ": tensor '", jobs[p.job].tensors[p.tensor].first,
               "' holds a non-finite value at element ", p.begin + bad[k], " (client rejected)");
  }
  return fault;
}

bool take_update(const ModelLayout& layout, const NamedViews& update,
                 const std::vector<ClientTensor>& tensors, bool may_defer, SubModelClient& client) {
  const std::string& label = client.label;
  std::map<std::string_view, const ConstTensorView*> by_name;
  for (const auto& v : update) {
    if (!by_name.emplace(v.name, &v.view).second) {
      fail(label, ": tensor '", v.name, "' appears twice in the update");
    }
  }
  // Tensors are checked in plan order and the first fault is reported. The shape and dtype
  // checks run first; then the tensors before any such fault are scanned for NaN and Inf in
  // parallel pieces, and a non-finite value in an earlier tensor is reported instead.
  std::size_t fault_at = tensors.size();
  std::string fault;
  std::vector<const ConstTensorView*> views(tensors.size(), nullptr);
  for (std::size_t i = 0; i < tensors.size() && fault_at == tensors.size(); ++i) {
    const ClientTensor& ct = tensors[i];
    auto it = by_name.find(ct.name);
    if (it == by_name.end()) {
      fault = concat(label, ": tensor '", ct.name, "' is missing (the plan gives it shape ",
                     ct.shape.to_string(), ")");
      fault_at = i;
      break;
    }
    const ConstTensorView& v = *it->second;
    views[i] = &v;
    const DType target_dtype = layout.tensors()[ct.target_index].meta.dtype;
    if (v.shape() != ct.shape) {
      fault = concat(label, ": tensor '", ct.name, "' has shape ", v.shape().to_string(),
                     " but the plan gives ", ct.shape.to_string());
      fault_at = i;
    } else if (is_aggregatable(target_dtype) ? !is_aggregatable(v.dtype())
                                             : v.dtype() != target_dtype) {
      fault = concat(label, ": tensor '", ct.name, "' has dtype ", dtype_name(v.dtype()),
                     is_aggregatable(target_dtype)
                         ? std::string("; updates must be F32, BF16 or F16")
                         : "; expected the target's " + std::string(dtype_name(target_dtype)));
      fault_at = i;
    }
  }
  // Deferred, the values of a sound client are left to finalize, which reads every one of
  // them unless its weight is 0 or "aggregate_only" masks some out.
  bool masked = false;
  for (const auto& mask : client.lists->aggregate_mask) masked = masked || !mask.empty();
  const bool defer = may_defer && fault_at == tensors.size() && client.weight != 0.0f && !masked;
  if (!defer) {
    ScanJob job{&label, {}};
    for (std::size_t i = 0; i < fault_at; ++i) job.tensors.push_back({tensors[i].name, views[i]});
    const std::string bad = nonfinite_faults({job})[0];
    if (!bad.empty()) fail(bad);
  }
  if (fault_at != tensors.size()) fail(fault);
  std::set<std::string_view> used;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    client.local[tensors[i].target_index] = *views[i];
    client.holds[tensors[i].target_index] = 1;
    used.insert(tensors[i].name);
  }
  for (const auto& v : update) {
    if (used.count(v.name) == 0) {
      fail(label, ": tensor '", v.name, "' is not part of this client's plan (extra tensor)");
    }
  }
  return defer;
}

}  // namespace edgefuse::detail
