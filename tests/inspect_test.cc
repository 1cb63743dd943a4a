// `edgefuse inspect`: listings of a file, a sharded folder and a PEFT folder, and for every
// bad input of the safetensors reader exit status 2 with exactly one line
// "error: <file>: <what is wrong> (<Rule>)" on stderr and nothing on stdout.
#include <sys/stat.h>

#include <cstring>

#include "edgefuse/io/peft.h"
#include "tests/io_helpers.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;
using ef::test::entry;

#if defined(EDGEFUSE_CLI)

namespace {

using Run = ef::test::CliRun;

Run inspect(const ef::test::ScratchDir& dir, const fs::path& target) {
  return ef::test::run_program(dir, {EDGEFUSE_CLI, "inspect", target.string()});
}

}  // namespace

TEST_CASE("inspect lists a file's tensors with dtype, shape and bytes") {
  ef::test::ScratchDir dir;
  ef::test::write_text(dir / "m.safetensors",
                       ef::test::st_bytes("{\"__metadata__\":{\"format\":\"pt\"}," +
                                              entry("w", "BF16", "[2,3]", 0, 12) + "," +
                                              entry("s", "F32", "[]", 12, 16) + "}",
                                          std::string(16, 'x')));
  const Run r = inspect(dir, dir / "m.safetensors");
  CHECK(r.rc == 0);
  CHECK(r.err.empty());
  CHECK(r.out.find("2 tensor(s) in 1 shard(s), 16 data bytes") != std::string::npos);
  CHECK(r.out.find("metadata of m.safetensors: format = pt") != std::string::npos);
  CHECK(r.out.find("w     BF16         [2, 3]                            12") != std::string::npos);
  CHECK(r.out.find("s     F32          []                                 4") != std::string::npos);
}

TEST_CASE("inspect lists sharded folders with each tensor's shard, and PEFT folders") {
  ef::test::ScratchDir dir;
  ef::WriteOptions opt;
  opt.max_shard_bytes = 8;
  {
    ef::CheckpointWriter w(dir / "ckpt", opt);
    for (const char* n : {"a", "b"}) {
      w.add(n, ef::DType::kF32, {2},
            [](std::uint64_t, std::byte* d, std::size_t len) { std::memset(d, 0, len); });
    }
    w.commit();
  }
  Run r = inspect(dir, dir / "ckpt");
  CHECK(r.rc == 0);
  CHECK(r.out.find("index metadata: total_size = 16") != std::string::npos);
  CHECK(r.out.find("model-00002-of-00002.safetensors") != std::string::npos);

  ef::LoraConfig c;
  c.r = 2;
  c.lora_alpha = 16;
  c.target_modules = {"q_proj"};
  ef::Tensor a = ef::Tensor::zeros(ef::DType::kF32, {2, 4});
  ef::Tensor b = ef::Tensor::zeros(ef::DType::kF32, {3, 2});
  ef::write_peft_adapter(dir / "adapter", c,
                         {{"model.layers.0.self_attn.q_proj", a.view(), b.view()}});
  r = inspect(dir, dir / "adapter");
  CHECK(r.rc == 0);
  CHECK(r.out.find("adapter: peft_type LORA, r 2, lora_alpha 16") != std::string::npos);
  CHECK(r.out.find("pair: model.layers.0.self_attn.q_proj -> model.layers.0.self_attn.q_proj.weight"
                   "  r 2  scaling 8  (3 x 4)") != std::string::npos);
  CHECK(r.out.find("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight") !=
        std::string::npos);
}

TEST_CASE("inspect exits 2 with one 'error: <file>: ...' line for every bad input") {
  ef::test::ScratchDir dir;
  struct Case {
    std::string name;
    std::string bytes;
    const char* rule;
  };
  const std::string a = entry("a", "U8", "[4]", 0, 4);
  const std::vector<Case> cases = {
      {"empty", "", "HeaderTooSmall"},
      {"short", "abc", "HeaderTooSmall"},
      {"n_past_end", ef::test::le64(60), "InvalidHeaderLength"},
      {"n_max", ef::test::le64(~0ull) + "{}", "HeaderTooLarge"},
      {"not_utf8", ef::test::st_bytes("{\"\xff\":1}"), "InvalidHeader"},
      {"bom", ef::test::st_bytes("\xef\xbb\xbf{}"), "InvalidHeader"},
      {"not_json", ef::test::st_bytes("hello"), "InvalidHeaderDeserialization"},
      {"deep", ef::test::st_bytes(std::string(100000, '[')), "InvalidHeaderDeserialization"},
      {"nul_pad", ef::test::st_bytes(std::string("{}\0\0\0\0\0\0", 8)),
       "InvalidHeaderDeserialization"},
      {"dup", ef::test::st_bytes("{" + a + "," + a + "}", "abcd"), "DuplicateKey"},
      {"meta_int", ef::test::st_bytes("{\"__metadata__\":{\"k\":1}}"),
       "InvalidHeaderDeserialization"},
      {"dtype",
       ef::test::st_bytes("{" + entry("a", "F128", "[1]", 0, 16) + "}", std::string(16, 'x')),
       "UnknownDType"},
      {"rank9", ef::test::st_bytes("{" + entry("a", "U8", "[1,1,1,1,1,1,1,1,1]", 0, 1) + "}", "x"),
       "RankTooLarge"},
      {"wrap0", ef::test::st_bytes("{" + entry("a", "U8", "[4294967296,4294967296]", 0, 0) + "}"),
       "ValidationOverflow"},
      {"f4odd", ef::test::st_bytes("{" + entry("a", "F4", "[3]", 0, 2) + "}", "xy"),
       "MisalignedSlice"},
      {"hole", ef::test::st_bytes("{" + entry("a", "U8", "[1]", 1, 2) + "}", "xy"),
       "InvalidOffset"},
      {"info", ef::test::st_bytes("{" + entry("a", "I32", "[2,2]", 0, 4) + "}", "xyzw"),
       "TensorInvalidInfo"},
      {"trailing", ef::test::st_bytes("{" + a + "}", "abcdPK"), "MetadataIncompleteBuffer"},
      {"ctrl_name", ef::test::st_bytes("{" + entry("a\\nb", "U8", "[1]", 0, 1) + "}", "x"),
       "InvalidName"},
      {"pickle", std::string("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 15),
       "HeaderTooLarge"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.name);
    const fs::path p = dir / (c.name + ".safetensors");
    ef::test::write_text(p, c.bytes);
    const Run r = inspect(dir, p);
    CHECK(r.rc == 2);
    CHECK(r.out.empty());
    CHECK(r.err.rfind("error: " + p.string() + ": ", 0) == 0);
    CHECK(r.err.find(std::string("(") + c.rule + ")\n") != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  }
  // Not regular files: a FIFO (must not hang), a device; a missing path; a bad index.
  REQUIRE(::mkfifo((dir / "fifo").c_str(), 0600) == 0);
  for (const auto& [path, rule] :
       std::vector<std::pair<fs::path, std::string>>{{dir / "fifo", "NotRegularFile"},
                                                     {"/dev/zero", "NotRegularFile"},
                                                     {dir / "missing", "Io"}}) {
    CAPTURE(path);
    const Run r = inspect(dir, path);
    CHECK(r.rc == 2);
    CHECK(r.err.rfind("error: " + path.string() + ": ", 0) == 0);
    CHECK(r.err.find("(" + rule + ")") != std::string::npos);
  }
  fs::create_directories(dir / "idx");
  ef::test::write_text(dir / "idx" / "model.safetensors.index.json",
                       R"({"weight_map":{"a":"../escape.safetensors"}})");
  const Run r = inspect(dir, dir / "idx");
  CHECK(r.rc == 2);
  CHECK(r.err == "error: " + (dir / "idx" / "model.safetensors.index.json").string() +
                     ": tensor 'a': shard '../escape.safetensors': the shard path climbs out of "
                     "the folder with '..' (ShardPathEscapes)\n");
}

#endif  // EDGEFUSE_CLI
