// Teacher signal files (distill/signals.h): round trips in f32 and bf16, top-k with
// log-sum-exp and I64 ids, and files a client could get wrong, each refused with the file,
// client and rule named.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "edgefuse/core/error.h"
#include "edgefuse/distill/signals.h"
#include "edgefuse/io/checkpoint.h"
#include "io_helpers.h"
#include "error_of.h"

using namespace edgefuse;
using edgefuse::test::ScratchDir;
using edgefuse_test::error_of;

namespace {

// Writes tensors as given (no signal validation), with the top-k metadata.
void write_raw(const std::filesystem::path& folder,
               const std::vector<std::pair<std::string, ConstTensorView>>& tensors,
               std::map<std::string, std::string> metadata) {
  WriteOptions o;
  o.file_stem = "teacher";
  o.metadata = std::move(metadata);
  CheckpointWriter w(folder, o);
  for (const auto& [name, view] : tensors) w.add(name, view);
  w.commit();
}

}  // namespace

TEST_CASE("Dense signals round-trip exactly in f32 and round once in bf16") {
  ScratchDir dir;
  const std::vector<float> logits{1.0f, -2.5f, 3.14159f, 0.1f, 1e-3f, -7.0f};
  const TeacherSignal s = dense_signal("c0", 2, 3, logits);
  save_teacher_signal(dir / "f32", s);
  const TeacherSignal a = load_teacher_signal(dir / "f32", "c0");
  CHECK(a.dense());
  CHECK(a.rows == 2);
  CHECK(a.vocab == 3);
  CHECK(a.logits == logits);
  save_teacher_signal(dir / "bf16", s, DType::kBF16);
  const TeacherSignal b = load_teacher_signal(dir / "bf16");
  CHECK(b.client == (dir / "bf16").string());
  for (std::size_t i = 0; i < logits.size(); ++i) CHECK(b.logits[i] == to_f32(to_bf16(logits[i])));
  // The file is a plain safetensors file with the documented names.
  const Checkpoint ck = Checkpoint::open(dir / "f32" / "teacher.safetensors");
  CHECK(ck.at("logits").info->shape == Shape{2, 3});
  CHECK(ck.shards()[0].metadata().at("edgefuse.signal") == "dense");
  // An existing folder is kept unless replacing is asked for.
  CHECK(error_of([&] { save_teacher_signal(dir / "f32", s); }).find("exists") != std::string::npos);
  CHECK(load_teacher_signal(dir / "f32").logits == logits);
}

TEST_CASE("Top-k signals round-trip with log-sum-exp, log-probabilities and I64 ids") {
  ScratchDir dir;
  const TeacherSignal s =
      topk_signal("c1", 2, 10, 3, {9, 0, 4, 1, 2, 3}, {5.0f, 4.0f, 3.5f, 1.0f, 0.5f, 0.25f},
                  TopKValues::kLogits, {6.0f, 2.0f}, 2.0);
  save_teacher_signal(dir / "k", s);
  const TeacherSignal a = load_teacher_signal(dir / "k", "c1");
  CHECK(!a.dense());
  CHECK(a.k == 3);
  CHECK(a.vocab == 10);
  CHECK(a.ids == s.ids);
  CHECK(a.values == s.values);
  CHECK(a.logsumexp == s.logsumexp);
  CHECK(a.temperature == 2.0);
  CHECK(a.value_kind == TopKValues::kLogits);
  const TeacherSignal lp =
      topk_signal("c2", 1, 4, 2, {1, 2}, {-0.5f, -1.5f}, TopKValues::kLogProbs);
  save_teacher_signal(dir / "lp", lp, DType::kBF16);
  const TeacherSignal b = load_teacher_signal(dir / "lp");
  CHECK(b.value_kind == TopKValues::kLogProbs);
  CHECK(b.values == std::vector<float>{-0.5f, -1.5f});
  // I64 ids (what PyTorch's topk returns) load as well.
  const std::vector<std::int64_t> ids64{3, 1};
  const std::vector<float> vals{2.0f, 1.0f};
  write_raw(dir / "i64",
            {{"topk_ids", ConstTensorView(ids64.data(), DType::kI64, Shape{1, 2})},
             {"topk_values", ConstTensorView(vals.data(), DType::kF32, Shape{1, 2})}},
            {{"edgefuse.signal", "topk"}, {"vocab_size", "5"}});
  const TeacherSignal c = load_teacher_signal(dir / "i64", "c3");
  CHECK(c.ids == std::vector<std::int32_t>{3, 1});
}

TEST_CASE("Bad signal files are refused, naming the file, the client and the rule") {
  ScratchDir dir;
  const std::vector<std::int32_t> dup{1, 1};
  const std::vector<float> vals{2.0f, 1.0f};
  const std::map<std::string, std::string> meta{{"edgefuse.signal", "topk"}, {"vocab_size", "5"}};
  write_raw(dir / "dup",
            {{"topk_ids", ConstTensorView(dup.data(), DType::kI32, Shape{1, 2})},
             {"topk_values", ConstTensorView(vals.data(), DType::kF32, Shape{1, 2})}},
            meta);
  const std::string file = (dir / "dup" / "teacher.safetensors").string();
  CHECK(error_of([&] { load_teacher_signal(dir / "dup", "edge-7"); }) ==
        file + ": teacher signal of client 'edge-7': row 0 repeats id 1 (topk_ids)");
  const std::vector<std::int64_t> far{1, std::int64_t{1} << 40};
  write_raw(dir / "far",
            {{"topk_ids", ConstTensorView(far.data(), DType::kI64, Shape{1, 2})},
             {"topk_values", ConstTensorView(vals.data(), DType::kF32, Shape{1, 2})}},
            meta);
  CHECK(error_of([&] {
          load_teacher_signal(dir / "far", "edge-8");
        }).find("client 'edge-8': row 0 has id -1 outside the vocabulary [0, 5)") !=
        std::string::npos);
  const std::vector<float> nan_logits{0.0f, NAN, 1.0f, 2.0f};
  write_raw(dir / "nan", {{"logits", ConstTensorView(nan_logits.data(), DType::kF32, Shape{2, 2})}},
            {{"edgefuse.signal", "dense"}});
  CHECK(error_of([&] { load_teacher_signal(dir / "nan", "edge-9"); }) ==
        (dir / "nan" / "teacher.safetensors").string() +
            ": teacher signal of client 'edge-9': logit at row 0, id 1 is nan (not finite)");
  const std::vector<std::int32_t> ok{0, 1};
  write_raw(dir / "novocab",
            {{"topk_ids", ConstTensorView(ok.data(), DType::kI32, Shape{1, 2})},
             {"topk_values", ConstTensorView(vals.data(), DType::kF32, Shape{1, 2})}},
            {{"edgefuse.signal", "topk"}});
  CHECK(error_of([&] {
          load_teacher_signal(dir / "novocab");
        }).find("a top-k signal needs __metadata__ 'vocab_size'") != std::string::npos);
  const std::vector<std::int32_t> int_logits{1, 2};
  write_raw(dir / "int", {{"logits", ConstTensorView(int_logits.data(), DType::kI32, Shape{1, 2})}},
            {{"edgefuse.signal", "dense"}});
  CHECK(error_of([&] {
          load_teacher_signal(dir / "int");
        }).find("dtype I32, expected F32 or BF16") != std::string::npos);
  write_raw(dir / "badkind", {{"logits", ConstTensorView(vals.data(), DType::kF32, Shape{1, 2})}},
            {{"edgefuse.signal", "probs"}});
  CHECK(error_of([&] {
          load_teacher_signal(dir / "badkind");
        }).find("'edgefuse.signal' = 'probs', expected 'dense' or 'topk'") != std::string::npos);
}
