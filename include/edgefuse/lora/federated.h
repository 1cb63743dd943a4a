// edgefuse/lora/federated.h — server-side aggregation rules of federated LoRA, and lifting a
// sub-model's adapter onto the large target.
//
// Rules: FedIT (Zhang et al., "Towards Building the Federated GPT")
// averages A and B separately; FedEx-LoRA adds FedIT's exact residual to the base; FedSA-LoRA
// shares only the averaged A; a least-squares B correction (simplified LoRA-FAIR); FFA-LoRA
// (Sun et al., ICLR 2024) freezes a shared A and averages B (exact);
// FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976) stacks the factors (exact, rank Σ r_k);
// HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432) zero-pads to the largest rank, weights by
// ‖B_k·A_k‖_F and truncates back to each client's rank; FlexLoRA (Bai et al., NeurIPS 2024,
// arXiv 2402.11505) forms Σ p_k·s_k·B_k·A_k and hands each client its best rank-r_k
// approximation — computed here from the stacked factors without the dense matrix
// (combine.h factored_svd). Weights p_k are the clients' weights normalised to sum 1; a
// client without a module contributes a zero update to it.
//
//   auto r = edgefuse::federated_lora(edgefuse::FederatedRule::kFlexLora,
//                                     {{&client1, 100}, {&client2, 300}});
//   edgefuse::save_lora_adapter("round7/client1", r.clients[0]);
#pragma once

#include <string_view>
#include <vector>

#include "edgefuse/lora/adapter.h"
#include "edgefuse/plan/plan.h"

namespace edgefuse {

enum class FederatedRule {
  kFedIt,
  kFfaLora,
  kFlora,
  kHetLora,
  kFlexLora,
  // FedEx-LoRA ("FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
  // Foundation Models", Singhal et al. 2024): FedIT's averaged factors, plus the
  // exact residual Σ p_k·s_k·B_k·A_k − s·B̄·Ā folded into the base weight (`residual`).
  kFedExLora,
  // FedSA-LoRA ("Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR
  // 2025): A is shared and averaged, each
  // client keeps its own B.
  kFedSaLora,
  // A least-squares B correction on FedIT's average (a simplified LoRA-FAIR, ICCV 2025, arXiv
  // 2411.14961, without its similarity metric and regulariser): B̄ + ΔB with ΔB = (M −
  // s·B̄Ā)·Āᵀ·(ĀĀᵀ)⁺ / s, the B closest to M in Frobenius norm for the averaged Ā.
  kLoraFairLs,
};

// "fedit", "ffa-lora" (or "ffa"), "flora", "hetlora", "flexlora", "fedex-lora", "fedsa-lora",
// "lora-fair-ls". Throws Error otherwise.
FederatedRule parse_federated_rule(std::string_view name);
const char* federated_rule_name(FederatedRule rule);

struct ClientLora {
  const LoraAdapter* adapter;
  double weight;  // e.g. the client's sample count; >= 0, not all 0
};

struct FederatedLora {
  // The server's aggregate. FedIT, FFA-LoRA, HetLoRA: averaged factors at the largest rank with
  // the clients' common scaling. FLoRA: the stack (rank Σ r_k, scaling 1). FlexLoRA: the
  // truncated SVD at the largest client rank (B = U·Σ, A = Vᵀ, scaling 1).
  LoraAdapter global;
  // What client k receives, in input order, each with the client's own config. FedIT and
  // HetLoRA: the global factors truncated to r_k; FFA-LoRA: B̄ with the shared A; FLoRA: the
  // stack (the client merges it into its base and starts a fresh adapter); FlexLoRA: the best
  // rank-r_k approximation with B = U·Σ / s_k, A = Vᵀ, so s_k·B·A is that approximation;
  // FedEx-LoRA: as FedIT (the base gets `residual`); FedSA-LoRA: its own B_k with Ā truncated
  // to r_k; lora-fair-ls: the corrected B̄ + ΔB with Ā, truncated to r_k. The global adapter
  // of FedSA-LoRA holds Ā with FedIT's B̄ (only Ā is shared).
  std::vector<LoraAdapter> clients;
  // FedEx-LoRA only: the residual to merge into the base weight, so that base + residual +
  // global's ΔW = base + Σ p_k·s_k·B_k·A_k exactly. Kept low-rank: A = [p_k·s_k·A_k …; −s·Ā],
  // B = [B_k … | B̄], scaling 1 (rank Σ r_k + r_max); merge it with merge_lora. Empty otherwise.
  LoraAdapter residual;
  // Whether global's ΔW (plus the residual, for FedEx-LoRA) equals Σ p_k·s_k·B_k·A_k exactly
  // (in exact arithmetic).
  bool exact = false;
};

// Fed-SB (arXiv 2502.15436; LoRA-SB): every client trains only a small
// r×r matrix R_k between a frozen, shared B (out×r) and A (r×in), ΔW_k = B·R_k·A. The server's
// weighted mean R̄ = Σ p_k·R_k is exact: B·R̄·A = Σ p_k·B·R_k·A. Returns R̄ (F32, r×r, one
// rounding per element). Throws Error for no matrices, shapes that differ or are not square,
// non-finite values, or weights that are negative, non-finite or all zero.
Tensor fed_sb_average(const std::vector<const Tensor*>& r, const std::vector<double>& weights);

// Throws Error naming the client's adapter label and module for: no clients, a negative or
// non-finite weight, all weights zero, module shapes or kinds that disagree, and the rules'
// own preconditions: FedIT/FFA-LoRA/HetLoRA need one scaling per module across clients;
// FFA-LoRA needs equal ranks and bit-identical A factors.
FederatedLora federated_lora(FederatedRule rule, const std::vector<ClientLora>& clients);

// Lifting: `sub` was trained on a sub-model extracted from `target` with `plan` (extract.h).
// Each module's B rows are placed on the target rows the plan kept for the weight's output
// dimension and A's columns on the kept input columns; everything else is zero, so
//   s·B_lift·A_lift = the sub-model's s·B·A scattered into its block of the target weight.
// Merging lifted adapters equals merging each into its plan's block, and stacking them (cat /
// FLoRA) gives the exact sum of the clients' updates. Local layer numbers are mapped back to
// the target's; rows or columns the plan marks aggregate_only-excluded get zero. Throws Error
// when a module's weight is not a tensor of the sub-model or its factors do not fit it.
LoraAdapter lift_adapter(const LoraAdapter& sub, const ModelLayout& target, const Plan& plan);

}  // namespace edgefuse
