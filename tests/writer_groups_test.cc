// The checkpoint writer's file groups and linked tensors: an optimizer's state written beside
// the model by the producer of the weights it belongs to, in files of its own, one commit.
#include <cstring>

#include <nlohmann/json.hpp>

#include "edgefuse/io/checkpoint.h"
#include "tests/io_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;
using ef::CheckpointRule;

namespace {

// Byte i of tensor `name`.
std::byte byte_of(const std::string& name, std::uint64_t i) {
  std::uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return static_cast<std::byte>((h >> 24) + i * 37 + (i >> 7));
}

void fill(const std::string& name, std::uint64_t offset, std::byte* dst, std::size_t len) {
  for (std::size_t k = 0; k < len; ++k) dst[k] = byte_of(name, offset + k);
}

bool holds_pattern(const ef::Checkpoint& c, const std::string& name) {
  const auto v = c.view(name);
  for (std::uint64_t i = 0; i < v.nbytes(); ++i) {
    if (v.bytes()[i] != byte_of(name, i)) return false;
  }
  return true;
}

std::vector<std::string> listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Weights w0, w1, w2 (U8, 100 bytes each) in the model files and, linked to each, "<w>.m" (F32,
// 25 elements) in group "server_state"; the producer of w_k writes its state in pieces of 30
// bytes that overlap by 10, in every piece it is asked for. `order` records the producers
// called; `fail_at` makes the producer of that tensor throw `fail_rule`.
struct StateWrite {
  std::vector<std::string> order;
  std::string fail_at;
  CheckpointRule fail_rule = CheckpointRule::kIo;
  std::size_t resumed = 0;

  std::vector<std::string> run(const fs::path& out, ef::WriteOptions opt) {
    opt.on_resumed = [this](std::string_view, std::string_view, std::uint64_t) { ++resumed; };
    ef::CheckpointWriter w(out, opt);
    w.add_group("server_state", {{"format", "pt"}, {"rule", "fedadam"}});
    for (const std::string name : {"w0", "w1", "w2"}) {
      w.add(name, ef::DType::kU8, {100},
            [this, name, &w](std::uint64_t offset, std::byte* dst, std::size_t len) {
              if (name == fail_at) {
                throw ef::CheckpointError(fail_rule, "test", name, "the producer failed");
              }
              if (offset == 0) order.push_back(name);
              fill(name, offset, dst, len);
              if (offset + len < 100) return;  // the state once the last piece is asked for
              std::byte state[100];
              fill(name + ".m", 0, state, 100);
              for (std::uint64_t at = 0; at < 100; at += 20) {
                const std::size_t n =
                    static_cast<std::size_t>(std::min<std::uint64_t>(30, 100 - at));
                w.write_linked(name + ".m", at, state + at, n);
              }
            });
      w.add_linked(name + ".m", ef::DType::kF32, {25}, name, "server_state");
    }
    return w.commit();
  }
};

}  // namespace

TEST_CASE("a file group gets its own shards, index and metadata, published in the same commit") {
  ef::test::ScratchDir dir;
  ef::WriteOptions opt;
  opt.max_shard_bytes = 200;
  opt.chunk_bytes = 64;
  StateWrite sw;
  const auto files = sw.run(dir / "out", opt);
  CHECK(sw.order == std::vector<std::string>{"w0", "w1", "w2"});  // declaration order
  // Model: [w0 w1] [w2]; state: [w0.m w1.m] [w2.m], each group its own index.
  CHECK(files == std::vector<std::string>{
                     "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "server_state-00001-of-00002.safetensors",
                     "server_state-00002-of-00002.safetensors",
                     "server_state.safetensors.index.json"});
  CHECK(listing(dir / "out") ==
        std::vector<std::string>{
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "server_state-00001-of-00002.safetensors",
            "server_state-00002-of-00002.safetensors", "server_state.safetensors.index.json"});
  const auto model = ef::Checkpoint::open(dir / "out");
  CHECK(model.size() == 3);
  CHECK(model.shards()[0].metadata() == std::map<std::string, std::string>{{"format", "pt"}});
  for (const std::string n : {"w0", "w1", "w2"}) CHECK(holds_pattern(model, n));
  const auto state = ef::Checkpoint::open(dir / "out" / "server_state.safetensors.index.json");
  CHECK(state.size() == 3);
  CHECK(state.index_metadata().at("total_size") == "300");
  CHECK(state.shards()[1].metadata().at("rule") == "fedadam");
  for (const std::string n : {"w0.m", "w1.m", "w2.m"}) {
    CHECK(state.at(n).info->dtype == ef::DType::kF32);
    CHECK(holds_pattern(state, n));
  }
}

TEST_CASE("a resumable write keeps a weight and its linked state together, journaled as one") {
  ef::test::ScratchDir dir;
  ef::WriteOptions opt;
  opt.resume_identity = "round 7";
  opt.chunk_bytes = 40;
  StateWrite first;
  first.fail_at = "w2";  // an I/O error keeps the staging folder and its journal
  CHECK(ef::test::rule_of([&] { first.run(dir / "out", opt); }) == CheckpointRule::kIo);
  CHECK(fs::exists(dir / ".out.staging-resume"));
  CHECK(!fs::exists(dir / "out"));
  StateWrite second;
  second.run(dir / "out", opt);
  CHECK(second.resumed == 4);  // w0, w0.m, w1, w1.m
  CHECK(second.order == std::vector<std::string>{"w2"});
  CHECK(!fs::exists(dir / ".out.staging-resume"));
  const auto model = ef::Checkpoint::open(dir / "out");
  const auto state = ef::Checkpoint::open(dir / "out" / "server_state.safetensors");
  for (const std::string n : {"w0", "w1", "w2"}) {
    CHECK(holds_pattern(model, n));
    CHECK(holds_pattern(state, n + ".m"));
  }
}

TEST_CASE("linked tensors refuse writes outside their lead's producer, gaps and short writes") {
  ef::test::ScratchDir dir;
  auto message = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const ef::CheckpointError& e) {
      return e.detail();
    }
    return std::string("no error");
  };
  {
    ef::CheckpointWriter w(dir / "a");
    auto nop = [](std::uint64_t, std::byte*, std::size_t) {};
    CHECK(message([&] { w.add_linked("x.m", ef::DType::kF32, {1}, "x"); }) ==
          "its lead 'x' is not a tensor added before");
    w.add("x", ef::DType::kU8, {4}, nop);
    CHECK(message([&] { w.add("y", ef::DType::kU8, {4}, nop, "state"); }) ==
          "file group 'state' was not added (add_group)");
    w.add_group("state", {});
    CHECK(message([&] { w.add_group("state", {}); }) ==
          "file group 'state' added twice or is the file_stem");
    CHECK(message([&] { w.add_group("model", {}); }) ==
          "file group 'model' added twice or is the file_stem");
    CHECK(message([&] { w.add_group("a/b", {}); }) == "file_stem 'a/b' is not a plain file name");
    w.add_linked("x.m", ef::DType::kF32, {1}, "x", "state");
    CHECK(message([&] { w.add_linked("x.m.m", ef::DType::kF32, {1}, "x.m"); }) ==
          "its lead 'x.m' is not a tensor added before");
    const std::byte b[4] = {};
    CHECK(message([&] { w.write_linked("x.m", 0, b, 4); }) ==
          "write_linked() outside the producer of its lead");
  }
  auto commit_with = [&](const std::string& dest,
                         const std::function<void(ef::CheckpointWriter&)>& body) {
    ef::CheckpointWriter w(dir / dest);
    w.add("x", ef::DType::kU8, {4}, [&](std::uint64_t, std::byte* dst, std::size_t len) {
      std::memset(dst, 1, len);
      body(w);
    });
    w.add_linked("x.m", ef::DType::kF32, {2}, "x");
    return message([&] { w.commit(); });
  };
  const std::byte b[8] = {};
  CHECK(commit_with("b", [&](ef::CheckpointWriter& w) { w.write_linked("x.m", 4, b, 4); }) ==
        "write_linked() at byte 4 leaves a gap after byte 0");
  CHECK(commit_with("c", [&](ef::CheckpointWriter& w) { w.write_linked("x.m", 4, b, 8); }) ==
        "write_linked() of bytes [4, 12) of a tensor of 8 bytes");
  CHECK(commit_with("d", [&](ef::CheckpointWriter& w) { w.write_linked("x.m", 0, b, 6); }) ==
        "the producer of 'x' wrote 6 of its 8 bytes");
  CHECK(commit_with("e", [&](ef::CheckpointWriter& w) { w.write_linked("x", 0, b, 1); }) ==
        "write_linked() outside the producer of its lead");
  for (const std::string d : {"b", "c", "d", "e"}) CHECK(!fs::exists(dir / d));
  CHECK(commit_with("f", [&](ef::CheckpointWriter& w) {
          w.write_linked("x.m", 0, b, 6);
          w.write_linked("x.m", 2, b, 6);
        }) == "no error");
  CHECK(ef::Checkpoint::open(dir / "f").size() == 2);
}
