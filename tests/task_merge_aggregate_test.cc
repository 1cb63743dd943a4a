// Tests for the streamed full-model task merge (AggregateOptions::task_merge): every tensor
// against merge_tasks on the clients' task vectors (DARE with the masks the streamed rule
// draws), params and delta mode, f32 and bf16 targets, a run of equal values cut by the
// magnitude pruning across the passes' segments, any tile size and thread count; the errors.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/lora/task_merge.h"
#include "error_of.h"
#include "llama_fixture.h"
#include "reference.h"

using namespace edgefuse;
using edgefuse_test::bits_of;
using edgefuse_test::error_of;
using edgefuse_test::Llama;
using edgefuse_test::llama_updates;
using edgefuse_test::same_bytes;
using edgefuse_test::widen_any;

namespace {

const std::vector<std::string> kFull(4, "{}");
const std::vector<float> kWeights{0.5f, 1.5f, 2.5f, 3.5f};

std::string label_of(std::size_t c) { return "client " + std::to_string(c); }

std::vector<NamedTensor> merge_round(const Llama& m,
                                     const std::vector<std::vector<NamedTensor>>& ups,
                                     const AggregateOptions& opt) {
  Aggregator agg(*m.layout, opt);
  for (std::size_t c = 0; c < ups.size(); ++c) {
    agg.add(views_of(ups[c]), parse_plan(kFull[c], *m.layout, "p"), kWeights[c], label_of(c));
  }
  return agg.finalize(views_of(m.target));
}

AggregateOptions options_of(AggregateMode mode, TaskMergeMethod method, TaskMergeOptions o) {
  AggregateOptions opt;
  opt.mode = mode;
  opt.task_merge = TaskMergeAggregate{method, o};
  return opt;
}

// Tensor t of the round by merge_tasks: task values x - W rounded to f32 (params) or the
// deltas, DARE's masks drawn as the streamed rule draws them, then W + merged in f32 and the
// target's dtype (the delta mode keeps W's bits where merged is 0).
void check_against_merge_tasks(const Llama& m, const std::vector<std::vector<NamedTensor>>& ups,
                               const std::vector<NamedTensor>& out, AggregateMode mode,
                               TaskMergeMethod method, TaskMergeOptions o) {
  for (std::size_t t = 0; t < m.target.size(); ++t) {
    const ConstTensorView base = m.target[t].tensor.view();
    const std::size_t n = base.numel();
    std::vector<std::vector<float>> tau(ups.size(), std::vector<float>(n));
    std::vector<std::vector<std::uint8_t>> masks;
    std::vector<const float*> ptrs;
    std::vector<double> w;
    for (std::size_t c = 0; c < ups.size(); ++c) {
      const ConstTensorView x = ups[c][t].tensor.view();
      REQUIRE(ups[c][t].name == m.target[t].name);
      for (std::size_t i = 0; i < n; ++i) {
        tau[c][i] =
            mode == AggregateMode::kParams ? widen_any(x, i) - widen_any(base, i) : widen_any(x, i);
      }
      masks.push_back(dare_mask(n, o.density, o.seed, m.target[t].name, c));
      ptrs.push_back(tau[c].data());
      w.push_back(kWeights[c]);
    }
    TaskMergeOptions ro = o;
    const bool dare = method == TaskMergeMethod::kDareLinear ||
                      method == TaskMergeMethod::kDareTies ||
                      method == TaskMergeMethod::kMergekitDareLinear ||
                      method == TaskMergeMethod::kMergekitDareTies;
    if (dare) ro.masks = &masks;
    const std::vector<float> merged = merge_tasks(method, ptrs, n, w, ro);
    const ConstTensorView got = out[t].tensor.view();
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < n; ++i) {
      // The delta mode's finalize keeps the target's bits under a zero increment (-0 stays -0).
      const float want = mode == AggregateMode::kDelta && merged[i] == 0.0f
                             ? widen_any(base, i)
                             : widen_any(base, i) + merged[i];
      const float expect =
          base.dtype() == DType::kF32
              ? want
              : edgefuse_test::float_of(std::uint32_t{edgefuse_test::ref_to_bf16(want)} << 16);
      if (bits_of(widen_any(got, i)) != bits_of(expect) && wrong++ == 0) {
        MESSAGE(i, " got ", widen_any(got, i), " expected ", expect, " merged ", merged[i],
                " base ", widen_any(base, i));
      }
    }
    INFO(std::string(task_merge_method_name(method)), " mode ", int(mode), " tensor ",
         m.target[t].name);
    CHECK(wrong == 0);
  }
}

}  // namespace

TEST_CASE("task merge: each tensor equals merge_tasks on the task vectors, params and delta") {
  const TaskMergeMethod methods[] = {
      TaskMergeMethod::kMergekitTies,     TaskMergeMethod::kMergekitDareLinear,
      TaskMergeMethod::kMergekitDareTies, TaskMergeMethod::kTies,
      TaskMergeMethod::kDareLinear,       TaskMergeMethod::kDareTies,
      TaskMergeMethod::kMagnitudePrune,   TaskMergeMethod::kTaskArithmetic,
      TaskMergeMethod::kMergekitLinear};
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    const Llama m(dtype, 3);
    for (const AggregateMode mode : {AggregateMode::kParams, AggregateMode::kDelta}) {
      const auto ups = llama_updates(m, mode, kFull);
      for (const TaskMergeMethod method : methods) {
        TaskMergeOptions o;
        o.density = 0.3;
        o.seed = 17;
        const auto out = merge_round(m, ups, options_of(mode, method, o));
        check_against_merge_tasks(m, ups, out, mode, method, o);
      }
      // mergekit's options: count election, no normalising, the L1 rescale of the pruned.
      TaskMergeOptions o;
      o.density = 0.45;
      o.majority_sign = MajoritySign::kFrequency;
      o.normalize = false;
      o.rescale = true;
      const auto out = merge_round(m, ups, options_of(mode, TaskMergeMethod::kMergekitTies, o));
      check_against_merge_tasks(m, ups, out, mode, TaskMergeMethod::kMergekitTies, o);
    }
  }
}

TEST_CASE("task merge: the magnitude cut inside a run of equal values, across segments") {
  // An embedding of 40000 x 32 = 1.28 M elements: the passes' segments hold 1 Mi elements.
  const Llama m(DType::kF32, 5, edgefuse_test::llama_config(32, 8, 4, 4, 48, 40000, 1));
  auto ups = llama_updates(m, AggregateMode::kDelta, kFull);
  std::size_t embed = 0;
  while (m.target[embed].name != "model.embed_tokens.weight") ++embed;
  // Client 0: every value ±0.25 but a few larger, so that keeping 90% cuts the run of 0.25s
  // past the first segment; client 2: mostly zeros (a cut at 0 keeps no extra value).
  float* x0 = ups[0][embed].tensor.view().data_as<float>();
  float* x1 = ups[2][embed].tensor.view().data_as<float>();
  const std::size_t n = ups[0][embed].tensor.numel();
  REQUIRE(n > (std::size_t{1} << 20));
  for (std::size_t i = 0; i < n; ++i) {
    x0[i] = i % 1000 == 7 ? 2.0f : (i % 3 == 0 ? -0.25f : 0.25f);
    x1[i] = i % 5 == 0 ? 1.0f + static_cast<float>(i % 7) : 0.0f;
  }
  TaskMergeOptions o;
  o.density = 0.9;
  const AggregateOptions opt = options_of(AggregateMode::kDelta, TaskMergeMethod::kMergekitTies, o);
  const auto out = merge_round(m, ups, opt);
  check_against_merge_tasks(m, ups, out, AggregateMode::kDelta, TaskMergeMethod::kMergekitTies, o);
  // Client 0's last kept 0.25 is flat element 1152000 - 1, past the first segment.
  const std::size_t keep = static_cast<std::size_t>(std::floor(0.9 * static_cast<double>(n)));
  CHECK(keep > (std::size_t{1} << 20));
}

TEST_CASE("task merge: the same bytes for any tile size and thread count") {
  const Llama m(DType::kBF16, 9);
  const auto ups = llama_updates(m, AggregateMode::kParams, kFull);
  TaskMergeOptions o;
  o.density = 0.5;
  o.seed = 3;
  for (const TaskMergeMethod method :
       {TaskMergeMethod::kMergekitTies, TaskMergeMethod::kMergekitDareTies}) {
    AggregateOptions opt = options_of(AggregateMode::kParams, method, o);
    const auto first = merge_round(m, ups, opt);
    const std::size_t saved = num_threads();
    for (const std::size_t threads : {1, 3}) {
      set_num_threads(threads);
      for (const std::size_t rows : {1, 5}) {
        opt.tile_rows = rows;
        CHECK(same_bytes(merge_round(m, ups, opt), first));
      }
    }
    set_num_threads(saved);
  }
}

TEST_CASE("task merge: errors name the client, the tensor and the rule") {
  const Llama m(DType::kF32, 2);
  const auto ups = llama_updates(m, AggregateMode::kParams, kFull);
  TaskMergeOptions o;
  o.density = 0.5;
  // A sub-model client covers part of a tensor.
  {
    Aggregator agg(*m.layout,
                   options_of(AggregateMode::kParams, TaskMergeMethod::kMergekitTies, o));
    const std::string plan = edgefuse_test::kLlamaPlans[1];
    const auto sub = llama_updates(m, AggregateMode::kParams, {plan});
    agg.add(views_of(ups[0]), parse_plan("{}", *m.layout, "p"), 1.0f, "whole");
    agg.add(views_of(sub[0]), parse_plan(plan, *m.layout, "p"), 1.0f, "half");
    CHECK(error_of([&] { agg.finalize(views_of(m.target)); }) ==
          "aggregate: the task merge 'mergekit_ties' needs clients that cover the whole of each "
          "tensor they send; half covers 640 of the 1280 elements of tensor "
          "'model.embed_tokens.weight'");
  }
  // A target value that makes the task value infinite.
  {
    Llama bad(DType::kF32, 2);
    bad.target[0].tensor.view().data_as<float>()[5] = -INFINITY;
    Aggregator agg(*bad.layout,
                   options_of(AggregateMode::kParams, TaskMergeMethod::kMergekitTies, o));
    agg.add(views_of(ups[0]), parse_plan("{}", *bad.layout, "p"), 1.0f, "c0");
    CHECK(error_of([&] { agg.finalize(views_of(bad.target)); }) ==
          "aggregate: tensor 'model.embed_tokens.weight' element [0, 5]: c0's task value (its "
          "weight minus the target) is not finite");
  }
  auto build = [&](AggregateOptions opt) { Aggregator agg(*m.layout, opt); };
  AggregateOptions opt = options_of(AggregateMode::kDelta, TaskMergeMethod::kMergekitTies, o);
  opt.task_merge->options.density = 0.0;
  CHECK(error_of([&] { build(opt); }) ==
        "aggregate: the task merge 'mergekit_ties' has density 0, outside (0, 1]");
  opt = options_of(AggregateMode::kDelta, TaskMergeMethod::kMergekitBreadcrumbs, o);
  CHECK(error_of([&] { build(opt); }) ==
        "aggregate: the task merge 'mergekit_breadcrumbs' is not streamed (full models take "
        "task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties and their mergekit forms)");
  opt = options_of(AggregateMode::kDelta, TaskMergeMethod::kMergekitTies, o);
  opt.robust = RobustAggregate{};
  CHECK(error_of([&] { build(opt); }) ==
        "aggregate: a task merge is its own rule; it does not take a robust aggregate or a "
        "client selection");
  opt.robust.reset();
  opt.finite_check = FiniteCheck::kWhileFusing;
  CHECK(error_of([&] {
          build(opt);
        }).rfind("aggregate: a task merge needs FiniteCheck::kOnAdd", 0) == 0);
}
