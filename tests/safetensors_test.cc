// The safetensors reader: a golden file, then every bad-input rule (container and
// header) as its own case, each asserting the exact rule broken.
#include "edgefuse/io/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "tests/io_helpers.h"

namespace ef = edgefuse;
using ef::CheckpointRule;
using ef::test::entry;
using ef::test::parse_bytes;
using ef::test::parse_rule;
using ef::test::st_bytes;

namespace {

// One F32 tensor "t" of shape [2] with the given offsets, data of `data_len` bytes.
std::string one_tensor(const std::string& dtype, const std::string& shape,
                       const std::string& offsets, std::size_t data_len) {
  return st_bytes("{\"t\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
                      ",\"data_offsets\":" + offsets + "}}",
                  std::string(data_len, '\x01'));
}

}  // namespace

TEST_CASE("a golden file parses to its exact tensors, metadata and bytes") {
  // Two tensors in the reference writer's order (F32 before BF16), header padded to 8.
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}," +
                       entry("w", "F32", "[2,2]", 0, 16) + "," + entry("b", "BF16", "[3]", 16, 22) +
                       "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string data;
  const float w[4] = {1.0f, -2.5f, 3.25f, 0.0f};
  data.append(reinterpret_cast<const char*>(w), sizeof w);
  data += std::string("\x80\x3f\x00\x40\xc0\x7f", 6);  // bf16 1, 2, NaN
  const std::string bytes = st_bytes(header, data);
  const ef::SafetensorsHeader h = parse_bytes(bytes);
  CHECK(h.header_bytes == header.size());
  CHECK(h.data_offset() % 8 == 0);
  REQUIRE(h.tensors.size() == 2);
  CHECK(h.tensors[0].name == "w");
  CHECK(h.tensors[0].dtype == ef::DType::kF32);
  CHECK(h.tensors[0].shape == ef::Shape{2, 2});
  CHECK(h.tensors[0].begin == 0);
  CHECK(h.tensors[0].end == 16);
  CHECK(h.tensors[1].name == "b");
  CHECK(h.tensors[1].dtype == ef::DType::kBF16);
  CHECK(h.tensors[1].nbytes() == 6);
  CHECK(h.metadata.size() == 1);
  CHECK(h.metadata.at("format") == "pt");

  ef::test::ScratchDir dir;
  ef::test::write_text(dir / "g.safetensors", bytes);
  const auto f = ef::SafetensorsFile::open(dir / "g.safetensors");
  CHECK(f.file_bytes() == bytes.size());
  const ef::ConstTensorView v = f.view(f.at("w"));
  CHECK(v.shape() == ef::Shape{2, 2});
  CHECK(std::memcmp(v.data(), w, sizeof w) == 0);
  const auto* bf = f.view(f.at("b")).data_as<ef::BFloat16>();
  CHECK(bf[0].bits == 0x3f80);
  CHECK(bf[1].bits == 0x4000);
  CHECK(bf[2].bits == 0x7fc0);
  CHECK(f.find("nope") == nullptr);
  CHECK(ef::test::rule_of([&] { f.at("nope"); }) == CheckpointRule::kTensorNotFound);
  float back[4] = {};
  f.read(f.at("w"), 4, back, 8);
  CHECK(back[0] == -2.5f);
  CHECK(back[1] == 3.25f);
}

TEST_CASE("every safetensors dtype is recognised and sized by its bits") {
  const struct {
    const char* name;
    int bits;
  } all[] = {{"BOOL", 8},        {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
             {"I8", 8},          {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
             {"F8_E5M2FNUZ", 8}, {"I16", 16},    {"U16", 16},    {"F16", 16},    {"BF16", 16},
             {"I32", 32},        {"U32", 32},    {"F32", 32},    {"C64", 64},    {"F64", 64},
             {"I64", 64},        {"U64", 64}};
  for (const auto& d : all) {
    CAPTURE(d.name);
    const std::size_t bytes = static_cast<std::size_t>(8 * d.bits / 8);  // 8 elements
    const auto h =
        parse_bytes(one_tensor(d.name, "[8]", "[0," + std::to_string(bytes) + "]", bytes));
    CHECK(ef::dtype_name(h.tensors[0].dtype) == d.name);
  }
}

TEST_CASE("files shorter than 8 bytes are HeaderTooSmall") {
  for (std::size_t n = 0; n < 8; ++n) {
    CHECK(parse_rule(std::string(n, '\0')) == CheckpointRule::kHeaderTooSmall);
  }
}

TEST_CASE("a header length past the file is rejected before any allocation sized by it") {
  CHECK(parse_rule(ef::test::le64(60)) == CheckpointRule::kInvalidHeaderLength);
  CHECK(parse_rule(ef::test::le64(9) + "{}") == CheckpointRule::kInvalidHeaderLength);
  CHECK(parse_rule(ef::test::le64(~0ull) + "{}") == CheckpointRule::kHeaderTooLarge);
  CHECK(parse_rule(ef::test::le64(~0ull - 7) + "{}") == CheckpointRule::kHeaderTooLarge);
  CHECK(parse_rule(ef::test::le64(99'999'999) + "{}") == CheckpointRule::kInvalidHeaderLength);
  // The reader, on a file, allocates nothing near N either.
  ef::test::ScratchDir dir;
  ef::test::write_text(dir / "n.safetensors", ef::test::le64(99'999'999) + "{}      ");
  const std::size_t largest = ef::test::largest_allocation_during([&] {
    CHECK(ef::test::rule_of([&] { ef::SafetensorsFile::open(dir / "n.safetensors"); }) ==
          CheckpointRule::kInvalidHeaderLength);
  });
  CHECK(largest < 4096);
}

TEST_CASE("a header above the 100 MB cap is HeaderTooLarge, 100 MB of spaces is not JSON") {
  std::string big = ef::test::le64(ef::kMaxHeaderBytes + 1);
  big.resize(8 + ef::kMaxHeaderBytes + 1, ' ');
  CHECK(parse_rule(big) == CheckpointRule::kHeaderTooLarge);
  std::string spaces = ef::test::le64(ef::kMaxHeaderBytes);
  spaces.resize(8 + ef::kMaxHeaderBytes, ' ');
  CHECK(parse_rule(spaces) == CheckpointRule::kInvalidHeaderDeserialization);
}

TEST_CASE("headers that are not UTF-8, overlong, surrogates or start with a BOM") {
  CHECK(parse_rule(st_bytes("{\"\xff\":1}")) == CheckpointRule::kInvalidHeader);
  CHECK(parse_rule(st_bytes("{\"\xc0\xaf\":1}")) ==
        CheckpointRule::kInvalidHeader);  // overlong '/'
  CHECK(parse_rule(st_bytes("{\"\xe0\x80\xaf\":1}")) ==
        CheckpointRule::kInvalidHeader);  // overlong
  CHECK(parse_rule(st_bytes("{\"\xed\xa0\x80\":1}")) == CheckpointRule::kInvalidHeader);  // U+D800
  CHECK(parse_rule(st_bytes("{\"\xf4\x90\x80\x80\":1}")) == CheckpointRule::kInvalidHeader);
  CHECK(parse_rule(st_bytes("{\"\xe2\x82\":1}")) == CheckpointRule::kInvalidHeader);  // truncated
  CHECK(parse_rule(st_bytes("\xef\xbb\xbf{}")) == CheckpointRule::kInvalidHeader);
  // Escaped lone surrogates are rejected by the JSON layer.
  CHECK(parse_rule(st_bytes("{\"\\ud800\":{}}")) == CheckpointRule::kInvalidHeaderDeserialization);
  // Valid multi-byte UTF-8 names load.
  const auto h = parse_bytes(
      st_bytes("{" + entry("caf\xc3\xa9.\xf0\x9f\x98\x80", "U8", "[1]", 0, 1) + "}", "x"));
  CHECK(h.tensors[0].name == "caf\xc3\xa9.\xf0\x9f\x98\x80");
}

TEST_CASE("non-JSON, non-object top levels and deep nesting fail with bounded stack") {
  for (const char* h : {"not json", "[]", "\"s\"", "12", "null", "{", "{\"a\":", "{} {}", "{}x"}) {
    CAPTURE(h);
    CHECK(parse_rule(st_bytes(h)) == CheckpointRule::kInvalidHeaderDeserialization);
  }
  CHECK(parse_rule(st_bytes(std::string(100000, '['))) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  CHECK(parse_rule(st_bytes("{\"a\":" + std::string(100000, '['))) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  CHECK(parse_rule(st_bytes("{\"__metadata__\":" + std::string(100000, '{'))) ==
        CheckpointRule::kInvalidHeaderDeserialization);
}

TEST_CASE("{} padded with JSON whitespace on either side loads with no tensors") {
  for (const char* h : {"{}", "{}      ", "   {}", "\t{}\t", " \t{} \n", "{ }"}) {
    CAPTURE(h);
    const auto parsed = parse_bytes(st_bytes(h));
    CHECK(parsed.tensors.empty());
    CHECK(parsed.metadata.empty());
  }
}

TEST_CASE("NUL padding inside the header is rejected") {
  // nlohmann's lexer would take a NUL for the end of input: the reader refuses it first.
  CHECK(parse_rule(st_bytes(std::string("{}\0\0\0\0\0\0", 8))) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  CHECK(parse_rule(st_bytes(std::string("{}\0{\"a\":1}", 10))) ==
        CheckpointRule::kInvalidHeaderDeserialization);
}

TEST_CASE("duplicate keys are rejected explicitly, whatever their offsets") {
  const std::string a = entry("a", "U8", "[4]", 0, 4);
  CHECK(parse_rule(st_bytes("{" + a + "," + a + "}", "abcd")) == CheckpointRule::kDuplicateKey);
  CHECK(parse_rule(st_bytes("{" + a + "," + entry("a", "U8", "[4]", 4, 8) + "}", "abcdefgh")) ==
        CheckpointRule::kDuplicateKey);
  CHECK(parse_rule(st_bytes("{\"__metadata__\":{},\"__metadata__\":{}}")) ==
        CheckpointRule::kDuplicateKey);
  CHECK(parse_rule(st_bytes("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}")) ==
        CheckpointRule::kDuplicateKey);
  CHECK(parse_rule(st_bytes("{\"t\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],"
                            "\"data_offsets\":[0,1]}}",
                            "x")) == CheckpointRule::kDuplicateKey);
}

TEST_CASE("__metadata__ must map strings to strings and stay under its cap") {
  CHECK(parse_rule(st_bytes("{\"__metadata__\":{\"k\":1}}")) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  CHECK(parse_rule(st_bytes("{\"__metadata__\":{\"k\":{\"x\":\"y\"}}}")) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  CHECK(parse_rule(st_bytes("{\"__metadata__\":{\"k\":[\"y\"]}}")) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  CHECK(parse_rule(st_bytes("{\"__metadata__\":\"pt\"}")) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  const std::string huge = "{\"__metadata__\":{\"k\":\"" + std::string(50u << 20, 'v') + "\"}}";
  CHECK(parse_rule(st_bytes(huge)) == CheckpointRule::kMetadataTooLarge);
  // null is "no metadata", as the reference reader's Option<HashMap> reads it.
  CHECK(parse_bytes(st_bytes("{\"__metadata__\":null}")).metadata.empty());
}

TEST_CASE("unknown dtype strings are UnknownDType") {
  for (const char* d : {"F128", "", "f32", "Float32", "I4", "BF16 "}) {
    CAPTURE(d);
    CHECK(parse_rule(one_tensor(d, "[2]", "[0,8]", 8)) == CheckpointRule::kUnknownDType);
  }
}

TEST_CASE("shape entries must be non-negative integers, at most 8 of them") {
  for (const char* s : {"[-1]", "[1.5]", "[\"2\"]", "[null]", "[[2]]", "[true]", "2", "{}", "[1e2]",
                        "[18446744073709551616]"}) {
    CAPTURE(s);
    CHECK(parse_rule(one_tensor("U8", s, "[0,2]", 2)) ==
          CheckpointRule::kInvalidHeaderDeserialization);
  }
  CHECK(parse_rule(one_tensor("U8", "[1,1,1,1,1,1,1,1,1]", "[0,1]", 1)) ==
        CheckpointRule::kRankTooLarge);
  CHECK(parse_bytes(one_tensor("U8", "[1,1,1,1,1,1,1,1]", "[0,1]", 1)).tensors[0].shape.rank() ==
        8);
}

TEST_CASE("shape products that overflow, even to exactly 0, are ValidationOverflow") {
  // 2^32 * 2^32 wraps to exactly 0: never an empty tensor (LiteRT#9255).
  CHECK(parse_rule(one_tensor("U8", "[4294967296,4294967296]", "[0,0]", 0)) ==
        CheckpointRule::kValidationOverflow);
  // The reference's own cases: [2, 2^64-2] and [2, 2^63-1].
  CHECK(parse_rule(one_tensor("F32", "[2,18446744073709551614]", "[0,16]", 16)) ==
        CheckpointRule::kValidationOverflow);
  CHECK(parse_rule(one_tensor("F32", "[2,9223372036854775807]", "[0,16]", 16)) ==
        CheckpointRule::kValidationOverflow);
  // Element count fits, bit count does not.
  CHECK(parse_rule(one_tensor("F32", "[1152921504606846976]", "[0,0]", 0)) ==
        CheckpointRule::kValidationOverflow);
  // A zero dimension first makes the product 0 legitimately (checked left to right).
  CHECK(
      parse_bytes(one_tensor("F32", "[0,18446744073709551615]", "[0,0]", 0)).tensors[0].nbytes() ==
      0);
}

TEST_CASE("sub-byte dtypes must fill whole bytes") {
  CHECK(parse_rule(one_tensor("F4", "[3]", "[0,2]", 2)) == CheckpointRule::kMisalignedSlice);
  CHECK(parse_rule(one_tensor("F6_E2M3", "[3]", "[0,3]", 3)) == CheckpointRule::kMisalignedSlice);
  CHECK(parse_bytes(one_tensor("F4", "[4]", "[0,2]", 2)).tensors[0].nbytes() == 2);
  CHECK(parse_bytes(one_tensor("F6_E3M2", "[4]", "[0,3]", 3)).tensors[0].nbytes() == 3);
}

TEST_CASE("data_offsets must be exactly two non-negative integers") {
  CHECK(parse_rule(st_bytes("{\"t\":{\"dtype\":\"U8\",\"shape\":[1]}}", "x")) ==
        CheckpointRule::kInvalidHeaderDeserialization);
  for (const char* o : {"[0]", "[0,1,2]", "[-1,0]", "[0.0,1.0]", "[0,18446744073709551616]",
                        "\"0,1\"", "[]", "[[0],[1]]"}) {
    CAPTURE(o);
    CHECK(parse_rule(one_tensor("U8", "[1]", o, 1)) ==
          CheckpointRule::kInvalidHeaderDeserialization);
  }
  // Huge but representable offsets parse, then fail the offset walk.
  CHECK(parse_rule(one_tensor("U8", "[1]", "[9223372036854775809,9223372036854775810]", 1)) ==
        CheckpointRule::kInvalidOffset);
  // Entries must hold exactly dtype, shape and data_offsets.
  CHECK(parse_rule(st_bytes("{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],"
                            "\"extra\":1}}",
                            "x")) == CheckpointRule::kInvalidHeaderDeserialization);
}

TEST_CASE("end before begin, a first begin not 0 and holes are InvalidOffset") {
  CHECK(parse_rule(one_tensor("U8", "[0]", "[4,0]", 4)) == CheckpointRule::kInvalidOffset);
  CHECK(parse_rule(one_tensor("U8", "[2]", "[2,4]", 4)) == CheckpointRule::kInvalidOffset);
  CHECK(parse_rule(st_bytes(
            "{" + entry("a", "U8", "[2]", 0, 2) + "," + entry("b", "U8", "[2]", 3, 5) + "}",
            "12345")) == CheckpointRule::kInvalidOffset);
  try {
    parse_bytes(st_bytes(
        "{" + entry("a", "U8", "[2]", 0, 2) + "," + entry("b", "U8", "[2]", 3, 5) + "}", "12345"));
  } catch (const ef::CheckpointError& e) {
    CHECK(e.tensor() == "b");
    CHECK(e.file() == "mem.safetensors");
    CHECK(std::string(e.what()) ==
          "mem.safetensors: tensor 'b': data_offsets [3, 5] leave a hole: the previous tensor "
          "ends at 2 (InvalidOffset)");
  }
}

TEST_CASE("overlapping ranges, up to 100k tensors at [0,16], fail fast") {
  CHECK(parse_rule(st_bytes(
            "{" + entry("a", "U8", "[4]", 0, 4) + "," + entry("b", "U8", "[4]", 2, 6) + "}",
            "123456")) == CheckpointRule::kInvalidOffset);
  for (int count : {10, 100000}) {
    std::string h = "{";
    for (int i = 0; i < count; ++i) {
      if (i) h += ",";
      h += entry("t" + std::to_string(i), "F32", "[4]", 0, 16);
    }
    h += "}";
    const std::string bytes = st_bytes(h, std::string(16, '\0'));
    std::size_t largest = ef::test::largest_allocation_during(
        [&] { CHECK(parse_rule(bytes) == CheckpointRule::kInvalidOffset); });
    // Bounded by the tensor count (the tensor list: under 300 bytes per entry), not by any
    // size the header declares.
    CHECK(largest < 300u * static_cast<std::size_t>(count) + 65536);
  }
}

TEST_CASE("a byte range that disagrees with shape x dtype is TensorInvalidInfo") {
  // The reference's test_invalid_info: a 2x2 I32 declared as 4 bytes.
  CHECK(parse_rule(one_tensor("I32", "[2,2]", "[0,4]", 4)) == CheckpointRule::kTensorInvalidInfo);
  CHECK(parse_rule(one_tensor("I32", "[2,2]", "[0,20]", 20)) == CheckpointRule::kTensorInvalidInfo);
}

TEST_CASE("offsets past the file with the right span are MetadataIncompleteBuffer") {
  CHECK(parse_rule(one_tensor("F32", "[2]", "[0,8]", 4)) ==
        CheckpointRule::kMetadataIncompleteBuffer);
  // Relative offsets that start at 0 but the file holds none of the bytes.
  CHECK(parse_rule(one_tensor("F32", "[1024]", "[0,4096]", 0)) ==
        CheckpointRule::kMetadataIncompleteBuffer);
}

TEST_CASE("trailing bytes (polyglot) and truncated data are MetadataIncompleteBuffer") {
  CHECK(parse_rule(one_tensor("F32", "[2]", "[0,8]", 9)) ==
        CheckpointRule::kMetadataIncompleteBuffer);
  CHECK(parse_rule(st_bytes("{}", "PK\x03\x04")) == CheckpointRule::kMetadataIncompleteBuffer);
  CHECK(parse_rule(one_tensor("F32", "[2]", "[0,8]", 7)) ==
        CheckpointRule::kMetadataIncompleteBuffer);
}

TEST_CASE("zero-size tensors and scalars load") {
  const auto h = parse_bytes(st_bytes(
      "{" + entry("empty", "F32", "[2,0]", 0, 0) + "," + entry("scalar", "F32", "[]", 0, 4) + "}",
      std::string(4, '\0')));
  REQUIRE(h.tensors.size() == 2);
  CHECK(h.tensors[0].name == "empty");
  CHECK(h.tensors[0].shape.numel() == 0);
  CHECK(h.tensors[1].name == "scalar");
  CHECK(h.tensors[1].shape.rank() == 0);
  CHECK(h.tensors[1].shape.numel() == 1);
}

TEST_CASE("an unaligned data section loads and reads correctly") {
  // Header of 45 bytes: the data starts at file offset 53, misaligned for f32.
  const std::string header = "{" + entry("x", "F32", "[3]", 0, 12) + "}";
  REQUIRE((8 + header.size()) % 4 != 0);
  const float vals[3] = {1.5f, -0.0f, 7e-39f};
  const std::string bytes = st_bytes(header, std::string(reinterpret_cast<const char*>(vals), 12));
  ef::test::ScratchDir dir;
  ef::test::write_text(dir / "u.safetensors", bytes);
  const auto f = ef::SafetensorsFile::open(dir / "u.safetensors");
  const auto v = f.view(f.at("x"));
  float copy[3];
  std::memcpy(copy, v.data(), 12);  // what kernels do: unaligned loads, never a float* deref
  CHECK(std::memcmp(copy, vals, 12) == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(v.data()) % 4 != 0);
}

TEST_CASE("more tensors than the documented cap is TooManyTensors, quickly") {
  std::string h = "{";
  const std::size_t count = ef::kMaxTensorsPerFile + 1;
  for (std::size_t i = 0; i < count; ++i) {
    if (i) h += ",";
    h += entry("t" + std::to_string(i), "U8", "[0]", 0, 0);
  }
  h += "}";
  CHECK(parse_rule(st_bytes(h)) == CheckpointRule::kTooManyTensors);
  // The cap itself is fine.
  h = "{";
  for (std::size_t i = 0; i < 1000; ++i) {
    if (i) h += ",";
    h += entry("t" + std::to_string(i), "U8", "[0]", 0, 0);
  }
  CHECK(parse_bytes(st_bytes(h + "}")).tensors.size() == 1000);
}

TEST_CASE("names with control characters, empty or too long are InvalidName") {
  for (const std::string& name :
       {std::string(""), std::string("a\\nb"), std::string("nul\\u0000x"), std::string("tab\\tx"),
        std::string("esc\\u001b"), std::string("del\x7f"),
        std::string(ef::kMaxNameBytes + 1, 'n')}) {
    CAPTURE(name.size());
    CHECK(parse_rule(st_bytes("{" + entry(name, "U8", "[1]", 0, 1) + "}", "x")) ==
          CheckpointRule::kInvalidName);
  }
  // Path-like names are data, never paths: they load and are found by their exact bytes.
  // Names equal only after Unicode normalisation are distinct names.
  const auto h = parse_bytes(st_bytes("{" + entry("../../etc/passwd", "U8", "[1]", 0, 1) + "," +
                                          entry("a\\\\b/c", "U8", "[1]", 1, 2) + "," +
                                          entry("caf\xc3\xa9", "U8", "[1]", 2, 3) + "," +
                                          entry("cafe\xcc\x81", "U8", "[1]", 3, 4) + "}",
                                      "wxyz"));
  CHECK(h.tensors[0].name == "../../etc/passwd");
  CHECK(h.tensors[1].name == "a\\b/c");
  CHECK(h.tensors.size() == 4);
  // An error about a hostile name stays on one printable line.
  try {
    parse_bytes(st_bytes("{" + entry("bad\\nname", "U8", "[1]", 0, 1) + "}", "x"));
    FAIL("no error");
  } catch (const ef::CheckpointError& e) {
    CHECK(std::string(e.what()) ==
          "mem.safetensors: tensor 'bad\\x0aname': the name holds control character 0x0a at "
          "byte 3 (InvalidName)");
  }
}

TEST_CASE("a file truncated after opening gives Io from read(), not a fault") {
  ef::test::ScratchDir dir;
  const std::string header = "{" + entry("x", "U8", "[4096]", 0, 4096) + "}";
  ef::test::write_text(dir / "t.safetensors", st_bytes(header, std::string(4096, 'q')));
  const auto f = ef::SafetensorsFile::open(dir / "t.safetensors");
  REQUIRE(::truncate((dir / "t.safetensors").c_str(), 100) == 0);
  char buf[16];
  CHECK(ef::test::rule_of([&] { f.read(f.at("x"), 4000, buf, 16); }) == CheckpointRule::kIo);
  CHECK(ef::test::rule_of([&] { f.read(f.at("x"), 4090, buf, 16); }) ==
        CheckpointRule::kInvalidArgument);
}

TEST_CASE("directories, FIFOs and devices are NotRegularFile, symlinks are followed") {
  ef::test::ScratchDir dir;
  CHECK(ef::test::rule_of([&] { ef::SafetensorsFile::open(dir.path()); }) ==
        CheckpointRule::kNotRegularFile);
  REQUIRE(::mkfifo((dir / "fifo").c_str(), 0600) == 0);
  CHECK(ef::test::rule_of([&] { ef::SafetensorsFile::open(dir / "fifo"); }) ==
        CheckpointRule::kNotRegularFile);
  CHECK(ef::test::rule_of([] { ef::SafetensorsFile::open("/dev/zero"); }) ==
        CheckpointRule::kNotRegularFile);
  CHECK(ef::test::rule_of([&] { ef::SafetensorsFile::open(dir / "missing"); }) ==
        CheckpointRule::kIo);
  ef::test::write_text(dir / "real.safetensors", st_bytes("{}      "));
  std::filesystem::create_symlink(dir / "real.safetensors", dir / "link.safetensors");
  CHECK(ef::SafetensorsFile::open(dir / "link.safetensors").tensors().empty());
}

TEST_CASE("pickle, zip and GGUF files are rejected, with no fallback loader") {
  const std::string pickle("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 15);
  const std::string zip("PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl", 26);
  const std::string gguf("GGUF\x03\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00", 16);
  CHECK(parse_rule(pickle) == CheckpointRule::kHeaderTooLarge);
  CHECK(parse_rule(zip) == CheckpointRule::kHeaderTooLarge);
  CHECK(parse_rule(gguf) == CheckpointRule::kHeaderTooLarge);
  // A small-N prefix that happens to fit still fails as JSON.
  CHECK(parse_rule(ef::test::le64(4) + "\x80\x02\x8a\x0a") == CheckpointRule::kInvalidHeader);
}
