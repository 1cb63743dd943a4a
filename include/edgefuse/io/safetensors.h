// edgefuse/io/safetensors.h — a validating, zero-copy reader of one safetensors file.
//
// The format is Hugging Face's safetensors (github.com/huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of UTF-8 JSON mapping each tensor name to
// {dtype, shape, data_offsets}, then the dense row-major little-endian data. Opening a file
// reads and validates the header only; the data is mmap'd and each tensor is a zero-copy
// ConstTensorView, so a 200 GB checkpoint costs nothing until its tensors are touched.
//
// Validation applies every rule of the reference reader (safetensors/src/tensor.rs,
// `read_metadata` + `Metadata::validate`) and adds ours: duplicate
// keys, empty names or names with control characters, non-string `__metadata__` values,
// unknown dtypes, unknown fields in a tensor entry, rank above 8, and caps on the tensor
// count, name length and metadata size. Every failure throws CheckpointError naming the
// file, the tensor (when there is one) and the rule broken (the reference's error names).
//
//   auto f = edgefuse::SafetensorsFile::open("model.safetensors");
//   edgefuse::ConstTensorView w = f.view(f.at("model.embed_tokens.weight"));
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/core/dtype.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/tensor.h"

namespace edgefuse {

// Limits checked while a header is parsed, before anything is allocated from the values seen.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;            // as the reference reader
inline constexpr std::size_t kMaxTensorsPerFile = std::size_t{1} << 18;  // 262,144
inline constexpr std::size_t kMaxNameBytes = 4096;            // per tensor name or metadata key
inline constexpr std::size_t kMaxMetadataBytes = 16u << 20;   // all __metadata__ keys + values
inline constexpr std::uint64_t kMaxIndexBytes = 100'000'000;  // model.safetensors.index.json
inline constexpr std::size_t kMaxJsonDepth = 32;              // index and adapter_config.json

// The rule a checkpoint broke. The first group carries the names of the reference reader's
// errors (SafeTensorError in safetensors/src/tensor.rs); the rest are ours.
enum class CheckpointRule : std::uint8_t {
  kHeaderTooSmall,                // file shorter than 8 bytes
  kHeaderTooLarge,                // N > kMaxHeaderBytes
  kInvalidHeaderLength,           // 8 + N past the end of the file
  kInvalidHeader,                 // header bytes are not UTF-8 (or start with a BOM)
  kInvalidHeaderDeserialization,  // not JSON, or JSON of the wrong shape
  kInvalidOffset,                 // first begin != 0, a hole, an overlap, or end < begin
  kValidationOverflow,            // shape product or bit count overflows 64 bits
  kMisalignedSlice,               // bit count not a whole number of bytes (F4, F6)
  kTensorInvalidInfo,             // end - begin != shape x dtype size
  kMetadataIncompleteBuffer,      // data section longer (trailing bytes) or shorter than covered
  kTensorNotFound,                // lookup of an absent name
  kDuplicateKey,                  // a JSON key twice in one object
  kInvalidName,                   // empty, control characters, too long, or "__metadata__"
  kUnknownDType,                  // dtype string not in the safetensors list
  kRankTooLarge,                  // more than kMaxRank dimensions
  kTooManyTensors,                // more than kMaxTensorsPerFile tensors
  kMetadataTooLarge,              // __metadata__ above kMaxMetadataBytes
  kNotRegularFile,                // a directory, FIFO, device ...
  kIo,                            // open/read/write/fsync/rename failed, or the file changed
  kInvalidIndex,                  // model.safetensors.index.json malformed
  kMissingShard,                  // a shard named by the index does not exist
  kShardPathEscapes,              // a shard path that is absolute or climbs out with ".."
  kTensorInTwoShards,             // one name in two shards
  kTensorNotInShard,              // the index lists a tensor its shard lacks
  kTensorNotInIndex,              // a shard holds a tensor the index does not list
  kNoCheckpoint,                  // a folder with no (or several ambiguous) checkpoints
  kInvalidAdapter,                // adapter_config.json or PEFT tensor names malformed
  kWriterBusy,                    // another writer holds the destination's lock
  kInvalidArgument,               // writer misuse: duplicate tensor, bad options, ...
};

// "HeaderTooLarge", "InvalidOffset", ...
std::string_view checkpoint_rule_name(CheckpointRule rule) noexcept;

// Error thrown by the io layer. what() reads "<file>: tensor '<name>': <detail> (<Rule>)";
// the tensor part is left out when no tensor is involved. Names are escaped (\xNN for bytes
// outside printable ASCII) and shortened to 200 bytes, so the message is always one line.
class CheckpointError : public Error {
 public:
  CheckpointError(CheckpointRule rule, std::string file, std::string tensor,
                  const std::string& detail);
  CheckpointRule rule() const noexcept { return rule_; }
  const std::string& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  // What is wrong, without the file, tensor and rule.
  const std::string& detail() const noexcept { return detail_; }

 private:
  CheckpointRule rule_;
  std::string file_;
  std::string tensor_;
  std::string detail_;
};

// One tensor of a safetensors file. begin/end are byte offsets in the data section (after
// the 8 + N header bytes), as written in the file.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::uint64_t nbytes() const noexcept { return end - begin; }
};

// A parsed and validated header. tensors are in data-offset order (the order of the bytes).
struct SafetensorsHeader {
  std::uint64_t header_bytes = 0;  // N
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  std::uint64_t data_offset() const noexcept { return 8 + header_bytes; }
};

// Parses and validates a whole safetensors file held in memory (`size` bytes at `data`);
// `label` names it in errors. Reads only the header bytes and checks that the tensors cover
// the remaining size - 8 - N bytes exactly. Throws CheckpointError. This is the function the
// fuzzer drives.
SafetensorsHeader parse_safetensors(const void* data, std::uint64_t size, std::string_view label);

// An open, validated safetensors file, mapped read-only. Move-only; the mapping lives as long
// as the object, and views from it must not outlive it.
class SafetensorsFile {
 public:
  // Opens and validates `path`. Follows symlinks (the Hugging Face cache is made of them) but
  // requires a regular file; never blocks on a FIFO. Reads the 8-byte prefix and the header
  // only. Throws CheckpointError.
  static SafetensorsFile open(const std::filesystem::path& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::filesystem::path& path() const noexcept;
  std::uint64_t file_bytes() const noexcept;
  const SafetensorsHeader& header() const noexcept;
  // Tensors in data-offset order.
  const std::vector<TensorInfo>& tensors() const noexcept { return header().tensors; }
  const std::map<std::string, std::string>& metadata() const noexcept { return header().metadata; }
  // nullptr when absent.
  const TensorInfo* find(std::string_view name) const noexcept;
  // Throws CheckpointError (TensorNotFound) when absent.
  const TensorInfo& at(std::string_view name) const;

  // Zero-copy view of a tensor of this file. The bytes are aligned only as the file aligns
  // them (safetensors guarantees at most 8); kernels use unaligned loads. As with every mmap
  // reader, a file truncated by another process while mapped faults (SIGBUS) on access: use
  // read() for files others may change.
  ConstTensorView view(const TensorInfo& info) const;
  // Raw bytes of a tensor in the mapping (nbytes() of them).
  const std::byte* data(const TensorInfo& info) const noexcept;
  // Copies bytes [offset, offset + len) of a tensor into dst with pread, not through the
  // mapping. A file that shrank since open gives CheckpointError (Io), never a fault.
  void read(const TensorInfo& info, std::uint64_t offset, void* dst, std::uint64_t len) const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace edgefuse
