// Sharded checkpoints and the writer: round trips, huggingface_hub's shard split and index,
// index validation and the commit protocol.
#include "edgefuse/io/checkpoint.h"

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <limits>
#include <thread>

#include <nlohmann/json.hpp>

#include "edgefuse/aggregate/aggregator.h"

#include "tests/io_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;
using ef::CheckpointRule;
using ef::test::rule_of;

namespace {

// Byte i of tensor `name` (so every tensor's bytes differ and any mix-up shows).
std::byte pattern(const std::string& name, std::uint64_t i) {
  std::uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return static_cast<std::byte>((h >> 24) + i * 131 + (i >> 8));
}

ef::TensorProducer patterned(const std::string& name) {
  return [name](std::uint64_t offset, std::byte* dst, std::size_t len) {
    for (std::size_t k = 0; k < len; ++k) dst[k] = pattern(name, offset + k);
  };
}

void check_patterned(const ef::Checkpoint& c, const std::string& name, std::uint64_t nbytes) {
  CAPTURE(name);
  const auto v = c.view(name);
  REQUIRE(v.nbytes() == nbytes);
  for (std::uint64_t i = 0; i < nbytes; ++i) {
    if (v.bytes()[i] != pattern(name, i)) {
      FAIL("byte " << i << " differs");
    }
  }
}

std::vector<std::string> listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("shard_file_name follows huggingface_hub") {
  CHECK(ef::shard_file_name("model", 0, 1) == "model.safetensors");
  CHECK(ef::shard_file_name("model", 0, 3) == "model-00001-of-00003.safetensors");
  CHECK(ef::shard_file_name("adapter_model", 11, 12) == "adapter_model-00012-of-00012.safetensors");
}

TEST_CASE("a one-shard checkpoint round-trips bit for bit in the reference writer's layout") {
  ef::test::ScratchDir dir;
  const fs::path out = dir / "ckpt";
  {
    ef::CheckpointWriter w(out);
    w.add("b.weight", ef::DType::kBF16, {3, 5}, patterned("b.weight"));
    w.add("a.weight", ef::DType::kF32, {7}, patterned("a.weight"));
    w.add("c.bias", ef::DType::kF32, {}, patterned("c.bias"));
    w.add("z.empty", ef::DType::kF16, {4, 0}, patterned("z.empty"));
    const auto files = w.commit();
    CHECK(files == std::vector<std::string>{"model.safetensors"});
  }
  CHECK(listing(out) == std::vector<std::string>{"model.safetensors"});
  const std::string bytes = ef::test::read_text(out / "model.safetensors");
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK((8 + n) % 8 == 0);
  // Header: __metadata__ first, then descending dtype alignment, then name; no spaces but the
  // trailing padding.
  const std::string header = bytes.substr(8, n);
  const std::string expect =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"a.weight\":{\"dtype\":\"F32\",\"shape\":[7],\"data_offsets\":[0,28]},"
      "\"c.bias\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[28,32]},"
      "\"b.weight\":{\"dtype\":\"BF16\",\"shape\":[3,5],\"data_offsets\":[32,62]},"
      "\"z.empty\":{\"dtype\":\"F16\",\"shape\":[4,0],\"data_offsets\":[62,62]}}";
  CHECK(header.substr(0, expect.size()) == expect);
  CHECK(header.find_first_not_of(' ', expect.size()) == std::string::npos);

  const auto c = ef::Checkpoint::open(out);
  CHECK_FALSE(c.is_sharded());
  CHECK(c.size() == 4);
  CHECK(c.total_bytes() == 62);
  check_patterned(c, "a.weight", 28);
  check_patterned(c, "b.weight", 30);
  check_patterned(c, "c.bias", 4);
  CHECK(c.at("z.empty").info->shape == ef::Shape{4, 0});
  CHECK(c.shards()[0].metadata().at("format") == "pt");
}

TEST_CASE("shards split greedily at max_shard_bytes, a larger tensor gets its own shard") {
  ef::test::ScratchDir dir;
  const fs::path out = dir / "ckpt";
  ef::WriteOptions opt;
  opt.max_shard_bytes = 100;
  opt.chunk_bytes = 7;  // producers are called in 7-byte pieces
  std::vector<std::pair<std::string, std::uint64_t>> tensors = {
      {"t0", 40}, {"t1", 40}, {"t2", 40}, {"big", 250}, {"t3", 10}, {"t4", 100}};
  std::size_t max_piece = 0;
  std::uint64_t produced = 0;
  {
    ef::CheckpointWriter w(out, opt);
    for (const auto& [name, nb] : tensors) {
      const std::string n = name;
      auto inner = patterned(n);
      w.add(n, ef::DType::kU8, {nb},
            [&, inner, expect = std::uint64_t{0}](std::uint64_t off, std::byte* dst,
                                                  std::size_t len) mutable {
              CHECK(off == expect);  // increasing, contiguous pieces
              expect += len;
              max_piece = std::max(max_piece, len);
              produced += len;
              inner(off, dst, len);
            });
    }
    const auto files = w.commit();
    CHECK(files.back() == "model.safetensors.index.json");
  }
  CHECK(max_piece == 7);
  CHECK(produced == 480);
  // [t0 t1] [t2] [big] [t3] [t4]: t2 would make 120 > 100; big alone; t3 + t4 = 110 > 100.
  CHECK(listing(out) == std::vector<std::string>{
                            "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
                            "model-00003-of-00005.safetensors", "model-00004-of-00005.safetensors",
                            "model-00005-of-00005.safetensors", "model.safetensors.index.json"});
  const auto index =
      nlohmann::json::parse(ef::test::read_text(out / "model.safetensors.index.json"));
  CHECK(index["metadata"]["total_size"] == 480);
  CHECK(index["weight_map"]["t0"] == "model-00001-of-00005.safetensors");
  CHECK(index["weight_map"]["t1"] == "model-00001-of-00005.safetensors");
  CHECK(index["weight_map"]["t2"] == "model-00002-of-00005.safetensors");
  CHECK(index["weight_map"]["big"] == "model-00003-of-00005.safetensors");
  CHECK(index["weight_map"]["t3"] == "model-00004-of-00005.safetensors");
  CHECK(index["weight_map"]["t4"] == "model-00005-of-00005.safetensors");

  for (const fs::path& p : {out, out / "model.safetensors.index.json"}) {
    const auto c = ef::Checkpoint::open(p);
    CHECK(c.is_sharded());
    CHECK(c.shards().size() == 5);
    CHECK(c.total_bytes() == 480);
    CHECK(c.index_metadata().at("total_size") == "480");
    for (const auto& [name, nb] : tensors) check_patterned(c, name, nb);
  }
}

TEST_CASE("add() refuses bad names, duplicates, __metadata__ and overflowing sizes") {
  ef::test::ScratchDir dir;
  ef::CheckpointWriter w(dir / "c");
  auto nop = [](std::uint64_t, std::byte*, std::size_t) {};
  w.add("ok", ef::DType::kU8, {1}, nop);
  CHECK(rule_of([&] { w.add("ok", ef::DType::kU8, {1}, nop); }) ==
        CheckpointRule::kInvalidArgument);
  CHECK(rule_of([&] { w.add("", ef::DType::kU8, {1}, nop); }) == CheckpointRule::kInvalidName);
  CHECK(rule_of([&] { w.add("a\nb", ef::DType::kU8, {1}, nop); }) == CheckpointRule::kInvalidName);
  CHECK(rule_of([&] { w.add("__metadata__", ef::DType::kU8, {1}, nop); }) ==
        CheckpointRule::kInvalidName);
  CHECK(rule_of([&] { w.add("odd", ef::DType::kF4, {3}, nop); }) ==
        CheckpointRule::kInvalidArgument);
  CHECK(rule_of([&] { w.add("huge", ef::DType::kF64, {1ull << 62}, nop); }) ==
        CheckpointRule::kInvalidArgument);
  CHECK(rule_of([&] { w.add_file("../x", "y"); }) == CheckpointRule::kInvalidArgument);
  CHECK(rule_of([&] { w.add_file("m.safetensors", "y"); }) == CheckpointRule::kInvalidArgument);
  ef::WriteOptions bad;
  bad.max_shard_bytes = 0;
  CHECK(rule_of([&] { ef::CheckpointWriter(dir / "d", bad); }) == CheckpointRule::kInvalidArgument);
  bad = {};
  bad.file_stem = "a/b";
  CHECK(rule_of([&] { ef::CheckpointWriter(dir / "d", bad); }) == CheckpointRule::kInvalidArgument);
}

namespace {

// A sharded checkpoint written by hand: each shard a file, then an index text.
void write_shard(const fs::path& p, const std::vector<std::string>& names) {
  std::string h = "{";
  std::uint64_t off = 0;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i) h += ",";
    h += "\"" + names[i] + "\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[" +
         std::to_string(off) + "," + std::to_string(off + 2) + "]}";
    off += 2;
  }
  h += "}";
  ef::test::write_text(p, ef::test::st_bytes(h, std::string(off, 'd')));
}

CheckpointRule index_rule(const ef::test::ScratchDir& dir, const std::string& index) {
  ef::test::write_text(dir / "model.safetensors.index.json", index);
  return rule_of([&] { ef::Checkpoint::open(dir.path()); });
}

}  // namespace

TEST_CASE("inconsistent indexes and missing or escaping shards are errors") {
  ef::test::ScratchDir dir;
  write_shard(dir / "s1.safetensors", {"a", "b"});
  write_shard(dir / "s2.safetensors", {"c"});
  const std::string good =
      R"({"metadata":{"total_size":6},"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors"}})";
  ef::test::write_text(dir / "model.safetensors.index.json", good);
  CHECK(ef::Checkpoint::open(dir.path()).size() == 3);

  CHECK(index_rule(
            dir,
            R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s3.safetensors"}})") ==
        CheckpointRule::kMissingShard);
  CHECK(
      index_rule(
          dir,
          R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors","d":"s2.safetensors"}})") ==
      CheckpointRule::kTensorNotInShard);
  CHECK(index_rule(
            dir,
            R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors","c":"s2.safetensors"}})") ==
        CheckpointRule::kTensorInTwoShards);
  CHECK(index_rule(dir, R"({"weight_map":{"a":"s1.safetensors","c":"s2.safetensors"}})") ==
        CheckpointRule::kTensorNotInIndex);
  for (const char* escape :
       {"../s1.safetensors", "/etc/passwd", "x/../../s1.safetensors", "..\\\\s1.safetensors", ""}) {
    CAPTURE(escape);
    CHECK(index_rule(dir, std::string(R"({"weight_map":{"a":")") + escape + R"("}})") ==
          CheckpointRule::kShardPathEscapes);
  }
  CHECK(index_rule(dir, R"({"weight_map":{"a":{"file":"s1.safetensors"}}})") ==
        CheckpointRule::kInvalidIndex);
  CHECK(index_rule(dir, R"({"weight_map":[]})") == CheckpointRule::kInvalidIndex);
  CHECK(index_rule(dir, R"({"metadata":{"total_size":-1},"weight_map":{}})") ==
        CheckpointRule::kInvalidIndex);
  CHECK(index_rule(dir, R"({"weight_map":{"a":"s1.safetensors","a":"s2.safetensors"}})") ==
        CheckpointRule::kDuplicateKey);
  CHECK(index_rule(dir, "{\"weight_map\":" + std::string(10000, '[')) ==
        CheckpointRule::kInvalidIndex);
  CHECK(index_rule(dir, "[1,2]") == CheckpointRule::kInvalidIndex);
  // A shard's own corruption is reported against that shard.
  ef::test::write_text(dir / "model.safetensors.index.json", good);
  ef::test::write_text(dir / "s2.safetensors", ef::test::st_bytes("{}", "x"));
  try {
    ef::Checkpoint::open(dir.path());
    FAIL("no error");
  } catch (const ef::CheckpointError& e) {
    CHECK(e.rule() == CheckpointRule::kMetadataIncompleteBuffer);
    CHECK(e.file() == (dir / "s2.safetensors").string());
  }
}

TEST_CASE("a folder resolves to its one checkpoint or names the ambiguity") {
  ef::test::ScratchDir dir;
  CHECK(rule_of([&] { ef::Checkpoint::open(dir.path()); }) == CheckpointRule::kNoCheckpoint);
  write_shard(dir / "x.safetensors", {"a"});
  CHECK(ef::Checkpoint::open(dir.path()).path() == dir / "x.safetensors");
  write_shard(dir / "y.safetensors", {"b"});
  CHECK(rule_of([&] { ef::Checkpoint::open(dir.path()); }) == CheckpointRule::kNoCheckpoint);
  write_shard(dir / "model.safetensors", {"m"});
  CHECK(ef::Checkpoint::open(dir.path()).path() == dir / "model.safetensors");
  CHECK(rule_of([&] { ef::Checkpoint::open(dir / "absent"); }) == CheckpointRule::kIo);
}

TEST_CASE("an existing destination is replaced only when asked, and a file never") {
  ef::test::ScratchDir dir;
  auto nop = [](std::uint64_t, std::byte* d, std::size_t n) { std::memset(d, 7, n); };
  ef::test::write_text(dir / "file", "x");
  CHECK(rule_of([&] { ef::CheckpointWriter(dir / "file"); }) == CheckpointRule::kInvalidArgument);
  fs::create_directories(dir / "home");
  ef::test::write_text(dir / "home" / "notes.txt", "precious");
  CHECK(rule_of([&] { ef::CheckpointWriter(dir / "home"); }) == CheckpointRule::kInvalidArgument);
  CHECK(ef::test::read_text(dir / "home" / "notes.txt") == "precious");
  CHECK(rule_of([&] { ef::CheckpointWriter(dir / "no" / "parent"); }) == CheckpointRule::kIo);
  // An empty folder is filled without replace_existing.
  fs::create_directories(dir / "empty");
  ef::CheckpointWriter w(dir / "empty");
  w.add("t", ef::DType::kU8, {3}, nop);
  w.commit();
  CHECK(ef::Checkpoint::open(dir / "empty").size() == 1);
}

TEST_CASE("replacing keeps the other files, drops the old shards and leaves no staging") {
  ef::test::ScratchDir dir;
  const fs::path out = dir / "ckpt";
  ef::WriteOptions opt;
  opt.max_shard_bytes = 4;
  {
    ef::CheckpointWriter w(out, opt);
    for (const char* n : {"a", "b", "c"}) w.add(n, ef::DType::kU8, {4}, patterned(n));
    w.commit();
  }
  ef::test::write_text(out / "config.json", "{\"model_type\":\"llama\"}");
  CHECK(listing(out).size() == 5);  // 3 shards, index, config
  std::vector<std::string> phases;
  opt.max_shard_bytes = 1000;
  opt.replace_existing = true;
  opt.on_phase = [&](std::string_view p) { phases.emplace_back(p); };
  {
    ef::CheckpointWriter w(out, opt);
    w.add("only", ef::DType::kU8, {9}, patterned("only"));
    w.commit();
  }
  CHECK(phases == std::vector<std::string>{"staged", "file-written", "file-written", "synced",
                                           "published", "cleaned"});
  CHECK(listing(out) == std::vector<std::string>{"config.json", "model.safetensors"});
  CHECK(ef::test::read_text(out / "config.json") == "{\"model_type\":\"llama\"}");
  check_patterned(ef::Checkpoint::open(out), "only", 9);
  for (const auto& name : listing(dir.path())) {
    CHECK(name.find("staging") == std::string::npos);
  }
}

TEST_CASE("a second writer on the same destination fails fast with WriterBusy") {
  ef::test::ScratchDir dir;
  ef::CheckpointWriter first(dir / "ckpt");
  CHECK(rule_of([&] { ef::CheckpointWriter second(dir / "ckpt"); }) == CheckpointRule::kWriterBusy);
  CHECK(rule_of([&] { ef::CheckpointWriter second(dir / "ckpt/"); }) ==
        CheckpointRule::kWriterBusy);
  ef::CheckpointWriter other(dir / "other");  // a different destination is independent
  first.add("t", ef::DType::kU8, {1}, patterned("t"));
  first.commit();
}

TEST_CASE("stale staging folders are ignored by readers and removed by the next writer") {
  ef::test::ScratchDir dir;
  const fs::path out = dir / "ckpt";
  {
    ef::CheckpointWriter w(out);
    w.add("t", ef::DType::kU8, {4}, patterned("t"));
    w.commit();
  }
  fs::create_directories(dir / ".ckpt.staging-123-deadbeef");
  write_shard(dir / ".ckpt.staging-123-deadbeef" / "model.safetensors", {"stale"});
  fs::create_directories(dir / ".other.staging-1-1");
  CHECK(ef::Checkpoint::open(out).find("stale") == nullptr);
  ef::WriteOptions opt;
  opt.replace_existing = true;
  ef::CheckpointWriter w(out, opt);
  CHECK_FALSE(fs::exists(dir / ".ckpt.staging-123-deadbeef"));
  CHECK(fs::exists(dir / ".other.staging-1-1"));  // another destination's business
}

namespace {

// A committed checkpoint of one 4-byte tensor "t" in a scratch folder, and a second writer
// about to replace it: the set-up of the tests where that replacement fails.
struct FailingReplacement {
  ef::test::ScratchDir dir;
  fs::path out = dir / "ckpt";
  std::string before = commit_one(out);
  ef::CheckpointWriter writer{out, replacing()};

  static std::string commit_one(const fs::path& out) {
    ef::CheckpointWriter w(out);
    w.add("t", ef::DType::kU8, {4}, patterned("t"));
    w.commit();
    return ef::test::read_text(out / "model.safetensors");
  }
  static ef::WriteOptions replacing() {
    ef::WriteOptions opt;
    opt.replace_existing = true;
    return opt;
  }
  // The old checkpoint is intact and nothing but it and the lock file is left.
  void check_untouched() const {
    CHECK(ef::test::read_text(out / "model.safetensors") == before);
    CHECK(listing(dir.path()) == std::vector<std::string>{".ckpt.edgefuse-lock", "ckpt"});
  }
};

}  // namespace

TEST_CASE("a producer that throws aborts the commit: destination untouched, staging removed") {
  FailingReplacement f;
  f.writer.add("t", ef::DType::kU8, {4}, [](std::uint64_t, std::byte*, std::size_t) {
    throw std::runtime_error("client update rejected");
  });
  CHECK_THROWS_WITH(f.writer.commit(), "client update rejected");
  f.check_untouched();
}

TEST_CASE("a write error mid-shard (file size limit) is Io, destination untouched") {
  FailingReplacement f;
  f.writer.add("big", ef::DType::kU8, {1u << 20}, patterned("big"));
  // RLIMIT_FSIZE makes write() fail with EFBIG past 64 KiB (SIGXFSZ ignored meanwhile): an
  // injected I/O error in the middle of a shard, like ENOSPC.
  struct rlimit old {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto* prev = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 65536;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
  const CheckpointRule rule = rule_of([&] { f.writer.commit(); });
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, prev);
  CHECK(rule == CheckpointRule::kIo);
  f.check_untouched();
}

TEST_CASE("the bytes written do not depend on chunk size") {
  ef::test::ScratchDir dir;
  std::string first;
  for (std::size_t chunk : {std::size_t{1}, std::size_t{13}, std::size_t{1} << 20}) {
    ef::WriteOptions opt;
    opt.chunk_bytes = chunk;
    const fs::path out = dir / ("c" + std::to_string(chunk));
    ef::CheckpointWriter w(out, opt);
    w.add("x", ef::DType::kBF16, {33, 3}, patterned("x"));
    w.add("y", ef::DType::kF32, {5}, patterned("y"));
    w.commit();
    const std::string bytes = ef::test::read_text(out / "model.safetensors");
    if (first.empty()) first = bytes;
    CHECK(bytes == first);
  }
}

TEST_CASE("finalize_to with FiniteCheck::kWhileFusing scans pending clients before writing") {
  // Target w (4 x 6 f32): client a adds 1 to rows 0-1 / columns 0-2, client b (same block)
  // holds an Inf; b is dropped before any byte is written and the file holds a's round.
  std::vector<float> w(24);
  for (std::size_t i = 0; i < 24; ++i) w[i] = static_cast<float>(i);
  std::vector<ef::NamedTensor> target;
  target.push_back({"w", ef::Tensor::empty(ef::DType::kF32, {4, 6})});
  std::memcpy(target[0].tensor.view().bytes(), w.data(), sizeof(float) * 24);
  const ef::ModelLayout layout =
      ef::Schema::from_json(
          R"({"axes": {"out": {"size": 4}, "in": {"size": 6}}, "tensors": {"w": ["out", "in"]}})",
          "s.json")
          .bind({{"w", ef::DType::kF32, {4, 6}}});
  ef::Plan p;
  p.axes["out"] = {0, 1};
  p.axes["in"] = {0, 1, 2};
  auto a = ef::extract(ef::views_of(target), layout, p);
  auto b = ef::extract(ef::views_of(target), layout, p);
  for (std::size_t i = 0; i < 6; ++i) a[0].tensor.view().data_as<float>()[i] += 1.0f;
  b[0].tensor.view().data_as<float>()[4] = std::numeric_limits<float>::infinity();
  ef::AggregateOptions opt;
  opt.finite_check = ef::FiniteCheck::kWhileFusing;
  ef::Aggregator agg(layout, opt);
  agg.add(ef::views_of(a), p, 1.0f, "a.safetensors");
  agg.add(ef::views_of(b), p, 1.0f, "b.safetensors");
  ef::test::ScratchDir dir;
  ef::CheckpointWriter writer(dir / "fused");
  agg.finalize_to(writer, ef::views_of(target));
  CHECK(agg.rejected() ==
        std::vector<std::string>{
            "b.safetensors: tensor 'w' holds a non-finite value at element 4 (client rejected)"});
  writer.commit();
  const auto c = ef::Checkpoint::open(dir / "fused");
  const float* got = c.view("w").data_as<float>();
  for (std::size_t i = 0; i < 24; ++i) {
    CAPTURE(i);
    const bool covered = i / 6 < 2 && i % 6 < 3;
    CHECK(got[i] == w[i] + (covered ? 1.0f : 0.0f));
  }
  CHECK(agg.report()[0].covered == 6);
}

TEST_CASE(
    "finalize_to in pieces that split rows gives finalize's bytes and coverage report, with and "
    "without counts") {
  // w: 40 x 30 bf16 (60-byte rows) written in 100-byte pieces, so pieces end inside rows and
  // rows are computed twice; the report must count each row once. Client a covers a third of
  // each of its rows (tiles finalised by segments), client b whole rows (whole tiles).
  const std::uint64_t R = 40, C = 30;
  std::vector<ef::NamedTensor> target;
  target.push_back({"w", ef::Tensor::empty(ef::DType::kBF16, {R, C})});
  for (std::uint64_t i = 0; i < R * C; ++i) {
    target[0].tensor.view().data_as<ef::BFloat16>()[i].bits =
        static_cast<std::uint16_t>(0x3F80 + i % 97);
  }
  const ef::ModelLayout layout =
      ef::Schema::from_json(
          R"({"axes": {"out": {"size": 40}, "in": {"size": 30}}, "tensors": {"w": ["out", "in"]}})",
          "s.json")
          .bind({{"w", ef::DType::kBF16, {R, C}}});
  ef::Plan pa, pb;
  for (std::uint32_t r = 0; r < 24; r += 2) pa.axes["out"].push_back(r);
  for (std::uint32_t c = 5; c < 15; ++c) pa.axes["in"].push_back(c);
  for (std::uint32_t r = 10; r < 17; ++r) pb.axes["out"].push_back(r);
  const auto ua = ef::extract(ef::views_of(target), layout, pa, ef::DType::kF32);
  const auto ub = ef::extract(ef::views_of(target), layout, pb, ef::DType::kF32);
  // Contributors per element, from the plans.
  std::vector<std::uint32_t> n(R * C, 0);
  for (auto r : pa.axes["out"]) {
    for (auto c : pa.axes["in"]) ++n[r * C + c];
  }
  for (auto r : pb.axes["out"]) {
    for (std::uint64_t c = 0; c < C; ++c) ++n[r * C + c];
  }
  std::uint64_t covered = 0;
  std::uint32_t lo = UINT32_MAX, hi = 0;
  for (auto x : n) {
    covered += x != 0;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  REQUIRE(lo == 0);
  REQUIRE(hi == 2);
  for (const bool counts : {false, true}) {
    for (const std::size_t tile_rows : {std::size_t{0}, std::size_t{3}}) {
      CAPTURE(counts);
      CAPTURE(tile_rows);
      ef::AggregateOptions opt;
      opt.coverage_counts = counts;
      opt.tile_rows = tile_rows;
      auto run = [&](ef::Aggregator& agg) {
        agg.add(ef::views_of(ua), pa, 1.0f, "a");
        agg.add(ef::views_of(ub), pb, 2.0f, "b");
      };
      ef::Aggregator mem(layout, opt);
      run(mem);
      std::vector<ef::TensorCoverage> want;
      const auto fused = mem.finalize(ef::views_of(target), &want);
      REQUIRE(want.size() == 1);
      CHECK(want[0].covered == covered);
      CHECK(want[0].min_contributors == 0);
      CHECK(want[0].max_contributors == (counts ? hi : 1u));
      ef::Aggregator file(layout, opt);
      run(file);
      ef::test::ScratchDir dir;
      ef::WriteOptions wo;
      wo.chunk_bytes = 100;
      ef::CheckpointWriter writer(dir / "fused", wo);
      file.finalize_to(writer, ef::views_of(target));
      writer.commit();
      CHECK(file.report()[0].covered == covered);
      CHECK(file.report()[0].min_contributors == 0);
      CHECK(file.report()[0].max_contributors == want[0].max_contributors);
      const auto c = ef::Checkpoint::open(dir / "fused");
      CHECK(std::memcmp(c.view("w").bytes(), fused[0].tensor.view().bytes(), R * C * 2) == 0);
    }
  }
}
