// edgefuse/distill/signals.h — what a client sends for knowledge distillation: its outputs on
// the shared proxy set, as dense logits [tokens x vocab] or sparse top-k per token.
//
// Clients whose models share no architecture with the target cannot send weights; they run
// their model on a proxy set every party holds and send its outputs (FedMD, FedDF, DS-FL,
// FedET, FedMKT). Dense signals carry every logit; top-k
// signals carry, per row, k vocabulary ids with their values (raw logits, or log-probabilities
// normalised over the client's full vocabulary) and optionally the log-sum-exp of the full
// row, which makes the probabilities of the k entries exact (FedMKT sends k = 128;
// the spec explains what each top-k loss needs).
//
// On disk a signal is a safetensors file (or a folder holding one, written atomically):
//   dense:  "logits"      F32|BF16 [rows, vocab]
//   top-k:  "topk_ids"    I32|I64  [rows, k]
//           "topk_values" F32|BF16 [rows, k]
//           "logsumexp"   F32      [rows]        (optional)
//   __metadata__: "edgefuse.signal" = "dense" | "topk", "vocab_size" (top-k),
//                 "values" = "logits" | "logprobs" (top-k), "temperature" (of logsumexp and
//                 logprobs; default "1").
// Loading validates everything a client could get wrong and names the file, client, tensor,
// row and rule: non-finite values, ids outside the vocabulary or repeated within a row, shapes
// that disagree, log-probabilities whose mass exceeds 1.
//
//   auto s = edgefuse::load_teacher_signal("round3/client17", "client17");
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/core/dtype.h"

namespace edgefuse {

// What the values of a top-k signal are.
enum class TopKValues : std::uint8_t {
  kLogits,    // raw logits z_i (temperature-free)
  kLogProbs,  // log softmax(z / temperature)_i over the client's full vocabulary
};

// One client's outputs on the proxy rows. Dense when k == 0.
struct TeacherSignal {
  std::string client;  // names the client in errors and reports
  std::size_t rows = 0;
  std::size_t vocab = 0;
  std::size_t k = 0;
  std::vector<float> logits;      // dense: rows * vocab
  std::vector<std::int32_t> ids;  // top-k: rows * k
  std::vector<float> values;      // top-k: rows * k
  TopKValues value_kind = TopKValues::kLogits;
  std::vector<float> logsumexp;  // top-k, optional: rows; log Σ_j exp(z_j / temperature)
  double temperature = 1.0;      // of logsumexp and of kLogProbs values

  bool dense() const noexcept { return k == 0; }
  // True when the k probabilities are exact at `temperature` (log-probs, or logits + lse).
  bool exact_probabilities() const noexcept {
    return value_kind == TopKValues::kLogProbs || !logsumexp.empty();
  }
};

// A dense signal; validated (throws Error naming the client).
TeacherSignal dense_signal(std::string client, std::size_t rows, std::size_t vocab,
                           std::vector<float> logits);

// A top-k signal; validated. `logsumexp` may be empty.
TeacherSignal topk_signal(std::string client, std::size_t rows, std::size_t vocab, std::size_t k,
                          std::vector<std::int32_t> ids, std::vector<float> values,
                          TopKValues kind = TopKValues::kLogits, std::vector<float> logsumexp = {},
                          double temperature = 1.0);

// Checks a signal: sizes, finite values, ids in [0, vocab) and distinct within each row,
// temperature > 0, and for log-probabilities a row mass Σ exp(values) of at most 1 + 1e-4.
// Throws Error: "teacher signal of client 'c': row 3 repeats id 17 (topk_ids)".
void validate_signal(const TeacherSignal& signal);

// The k largest logits of each row of a dense signal (ties to the lower id), in decreasing
// order, with the log-sum-exp of the full row at `temperature` when `with_logsumexp` — what a
// client computes before sending top-k.
TeacherSignal top_k_of(const TeacherSignal& dense, std::size_t k, bool with_logsumexp = true,
                       double temperature = 1.0);

// Reads a signal from a safetensors file or a folder holding one (io/checkpoint.h rules),
// converting BF16 values to f32, and validates it. `client` names it in errors ("" uses the
// path). Throws CheckpointError for a malformed file, Error for a bad signal.
TeacherSignal load_teacher_signal(const std::filesystem::path& path, std::string client = "");

// Writes a signal into `folder` (teacher.safetensors, atomically; see io/checkpoint.h) with
// its values in `values_dtype` (F32 or BF16; BF16 rounds to nearest even). The signal is
// validated first. `replace` allows replacing an existing folder.
void save_teacher_signal(const std::filesystem::path& folder, const TeacherSignal& signal,
                         DType values_dtype = DType::kF32, bool replace = false);

}  // namespace edgefuse
