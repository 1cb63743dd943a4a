// safetensors header parsing (nlohmann's SAX interface, so no JSON tree is ever built and
// nesting is refused at depth 4) and the mmap'd file.
#include "edgefuse/io/safetensors.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>
#include <unordered_map>
#include <unordered_set>

#include "src/io/io_util.h"

namespace edgefuse {

namespace {

using detail::io_fail;
using detail::printable;
using json = nlohmann::json;

// Builds the tensor list from SAX events. Every event outside the one schema the format
// allows throws at once, so the parse never goes deeper than header > entry > array.
class HeaderSax {
 public:
  HeaderSax(std::string file, SafetensorsHeader* out) : file_(std::move(file)), out_(out) {}

  bool null() {
    if (stage_ == Stage::kTopValue && key_is_metadata_) {  // "__metadata__": null is "none"
      stage_ = Stage::kTopKeys;
      return true;
    }
    return wrong("null");
  }
  bool boolean(bool) { return wrong("a boolean"); }
  bool number_integer(json::number_integer_t) { return wrong("a negative integer"); }
  bool number_float(json::number_float_t, const std::string&) {
    return wrong("a non-integer number (or an integer above 2^64 - 1)");
  }
  bool binary(json::binary_t&) { return wrong("binary data"); }

  bool number_unsigned(json::number_unsigned_t v) {
    if (stage_ == Stage::kShape) {
      if (pending_.rank == kMaxRank) {
        fail(CheckpointRule::kRankTooLarge,
             "shape has more than " + std::to_string(kMaxRank) + " dimensions");
      }
      pending_.dims[static_cast<std::size_t>(pending_.rank++)] = v;
      return true;
    }
    if (stage_ == Stage::kOffsets) {
      if (pending_.num_offsets == 2) fail_schema("data_offsets has more than 2 entries");
      pending_.offsets[pending_.num_offsets++] = v;
      return true;
    }
    return wrong("an integer");
  }

  bool string(std::string& s) {
    if (stage_ == Stage::kMetaValue) {
      add_metadata_bytes(s.size());
      out_->metadata.emplace(std::move(meta_key_), std::move(s));
      stage_ = Stage::kMeta;
      return true;
    }
    if (stage_ == Stage::kEntryValue && field_ == Field::kDType) {
      const auto dtype = dtype_from_name(s);
      if (!dtype) {
        fail(CheckpointRule::kUnknownDType, "dtype \"" + printable(s, 40) +
                                                "\" is not a safetensors dtype (names are "
                                                "upper case: F32, BF16, F16, ...)");
      }
      pending_.dtype = *dtype;
      stage_ = Stage::kEntry;
      return true;
    }
    return wrong("a string");
  }

  bool start_object(std::size_t) {
    switch (stage_) {
      case Stage::kStart:
        stage_ = Stage::kTopKeys;
        return true;
      case Stage::kTopValue:
        if (key_is_metadata_) {
          stage_ = Stage::kMeta;
        } else {
          pending_ = Pending{};
          stage_ = Stage::kEntry;
        }
        return true;
      default:
        return wrong("an object");
    }
  }

  bool key(std::string& k) {
    switch (stage_) {
      case Stage::kTopKeys: {
        key_is_metadata_ = (k == "__metadata__");
        if (!seen_.insert(k).second) {
          fail_at(CheckpointRule::kDuplicateKey, key_is_metadata_ ? "" : k,
                  key_is_metadata_ ? "__metadata__ appears twice"
                                   : "the name appears twice in the header");
        }
        if (!key_is_metadata_) {
          const std::string problem = detail::name_problem(k);
          if (!problem.empty()) fail_at(CheckpointRule::kInvalidName, k, problem);
          if (out_->tensors.size() == kMaxTensorsPerFile) {
            fail_at(CheckpointRule::kTooManyTensors, "",
                    "more than " + std::to_string(kMaxTensorsPerFile) + " tensors in one file");
          }
          name_ = std::move(k);
        }
        stage_ = Stage::kTopValue;
        return true;
      }
      case Stage::kMeta:
        if (out_->metadata.count(k) != 0) {
          fail_at(CheckpointRule::kDuplicateKey, "",
                  "__metadata__ key '" + printable(k) + "' appears twice");
        }
        add_metadata_bytes(k.size());
        meta_key_ = std::move(k);
        stage_ = Stage::kMetaValue;
        return true;
      case Stage::kEntry: {
        Field f;
        if (k == "dtype") {
          f = Field::kDType;
        } else if (k == "shape") {
          f = Field::kShape;
        } else if (k == "data_offsets") {
          f = Field::kOffsets;
        } else {
          fail_schema("unknown field \"" + printable(k, 40) +
                      "\" (a tensor entry holds exactly dtype, shape and data_offsets)");
        }
        const unsigned bit = 1u << static_cast<unsigned>(f);
        if (pending_.fields & bit) {
          fail(CheckpointRule::kDuplicateKey, "field \"" + k + "\" appears twice");
        }
        pending_.fields |= bit;
        field_ = f;
        stage_ = Stage::kEntryValue;
        return true;
      }
      default:
        return wrong("a key");  // unreachable: keys only come inside objects
    }
  }

  bool end_object() {
    switch (stage_) {
      case Stage::kTopKeys:
        stage_ = Stage::kDone;
        return true;
      case Stage::kMeta:
        stage_ = Stage::kTopKeys;
        return true;
      case Stage::kEntry: {
        if (pending_.fields != 7u) {
          std::string missing;
          if (!(pending_.fields & 1u)) missing += " dtype";
          if (!(pending_.fields & 2u)) missing += " shape";
          if (!(pending_.fields & 4u)) missing += " data_offsets";
          fail_schema("tensor entry lacks" + missing);
        }
        TensorInfo info;
        info.name = std::move(name_);
        info.dtype = pending_.dtype;
        // The shape's product is checked (and reported) by validate(); build it unchecked
        // here through numel-free storage: Shape() would throw on overflow first.
        dims_.push_back(pending_.dims);
        ranks_.push_back(pending_.rank);
        info.begin = pending_.offsets[0];
        info.end = pending_.offsets[1];
        out_->tensors.push_back(std::move(info));
        stage_ = Stage::kTopKeys;
        return true;
      }
      default:
        return wrong("the end of an object");  // unreachable
    }
  }

  bool start_array(std::size_t) {
    if (stage_ == Stage::kEntryValue && field_ == Field::kShape) {
      stage_ = Stage::kShape;
      return true;
    }
    if (stage_ == Stage::kEntryValue && field_ == Field::kOffsets) {
      stage_ = Stage::kOffsets;
      return true;
    }
    return wrong("an array");
  }

  bool end_array() {
    if (stage_ == Stage::kShape) {
      stage_ = Stage::kEntry;
      return true;
    }
    if (stage_ == Stage::kOffsets) {
      if (pending_.num_offsets != 2) {
        fail_schema("data_offsets has " + std::to_string(pending_.num_offsets) + " entries, not 2");
      }
      stage_ = Stage::kEntry;
      return true;
    }
    return wrong("the end of an array");  // unreachable
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) {
    // e.what() quotes the offending token, which may hold any byte: escape it.
    io_fail(CheckpointRule::kInvalidHeaderDeserialization, file_, "",
            "header is not valid JSON near byte " + std::to_string(position) + ": " +
                printable(e.what(), 240));
  }

  bool done() const { return stage_ == Stage::kDone; }
  const std::vector<std::array<std::uint64_t, kMaxRank>>& dims() const { return dims_; }
  const std::vector<int>& ranks() const { return ranks_; }

 private:
  enum class Stage {
    kStart,
    kTopKeys,
    kTopValue,
    kMeta,
    kMetaValue,
    kEntry,
    kEntryValue,
    kShape,
    kOffsets,
    kDone
  };
  enum class Field : unsigned { kDType = 0, kShape = 1, kOffsets = 2 };
  struct Pending {
    DType dtype = DType::kF32;
    std::array<std::uint64_t, kMaxRank> dims{};
    int rank = 0;
    std::uint64_t offsets[2] = {0, 0};
    int num_offsets = 0;
    unsigned fields = 0;
  };

  [[noreturn]] void fail(CheckpointRule rule, const std::string& detail) {
    io_fail(rule, file_, in_entry() ? name_ : std::string(), detail);
  }
  [[noreturn]] void fail_at(CheckpointRule rule, const std::string& tensor,
                            const std::string& detail) {
    io_fail(rule, file_, tensor, detail);
  }
  [[noreturn]] void fail_schema(const std::string& detail) {
    fail(CheckpointRule::kInvalidHeaderDeserialization, detail);
  }
  bool in_entry() const {
    return !key_is_metadata_ &&
           (stage_ == Stage::kTopValue || stage_ == Stage::kEntry || stage_ == Stage::kEntryValue ||
            stage_ == Stage::kShape || stage_ == Stage::kOffsets);
  }
  // An event the schema does not allow here: says what was expected.
  [[noreturn]] bool wrong(const char* found) {
    std::string expected;
    switch (stage_) {
      case Stage::kStart:
        expected = "the header to be a JSON object";
        break;
      case Stage::kTopValue:
        expected = key_is_metadata_ ? "__metadata__ to be an object of strings"
                                    : "the tensor entry to be an object";
        break;
      case Stage::kMeta:
      case Stage::kMetaValue:
        expected = "__metadata__ values to be strings";
        if (stage_ == Stage::kMetaValue) expected += " (key '" + printable(meta_key_) + "')";
        break;
      case Stage::kEntryValue:
        expected = field_ == Field::kDType   ? "dtype to be a string"
                   : field_ == Field::kShape ? "shape to be an array of integers"
                                             : "data_offsets to be an array of 2 integers";
        break;
      case Stage::kShape:
        expected = "shape entries to be non-negative integers";
        break;
      case Stage::kOffsets:
        expected = "data_offsets entries to be non-negative integers";
        break;
      default:
        expected = "nothing more";
        break;
    }
    fail_schema(std::string("expected ") + expected + ", found " + found);
  }
  void add_metadata_bytes(std::size_t n) {
    metadata_bytes_ += n;
    if (metadata_bytes_ > kMaxMetadataBytes) {
      fail_at(CheckpointRule::kMetadataTooLarge, "",
              "__metadata__ holds more than " + std::to_string(kMaxMetadataBytes) + " bytes");
    }
  }

  std::string file_;
  SafetensorsHeader* out_;
  Stage stage_ = Stage::kStart;
  Field field_ = Field::kDType;
  bool key_is_metadata_ = false;
  std::string name_;
  std::string meta_key_;
  Pending pending_;
  std::unordered_set<std::string> seen_;
  std::size_t metadata_bytes_ = 0;
  std::vector<std::array<std::uint64_t, kMaxRank>> dims_;
  std::vector<int> ranks_;
};

// The reference reader's Metadata::validate + the final buffer check, in its order: sort by
// data_offsets, walk, check each tensor's size with checked arithmetic.
void validate(SafetensorsHeader& h, const HeaderSax& sax, std::uint64_t data_bytes,
              const std::string& file) {
  const std::size_t n = h.tensors.size();
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const TensorInfo& x = h.tensors[a];
    const TensorInfo& y = h.tensors[b];
    if (x.begin != y.begin) return x.begin < y.begin;
    if (x.end != y.end) return x.end < y.end;
    return x.name < y.name;
  });
  std::uint64_t start = 0;
  std::vector<TensorInfo> sorted;
  sorted.reserve(n);
  for (std::size_t idx : order) {
    TensorInfo& t = h.tensors[idx];
    if (t.begin != start || t.end < t.begin) {
      io_fail(CheckpointRule::kInvalidOffset, file, t.name,
              "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] " +
                  (t.end < t.begin ? std::string("end before begin")
                   : t.begin < start
                       ? "overlap the previous tensor, which ends at " + std::to_string(start)
                       : "leave a hole: the previous tensor ends at " + std::to_string(start)));
    }
    const auto& dims = sax.dims()[idx];
    const int rank = sax.ranks()[idx];
    std::uint64_t numel = 1;
    for (int d = 0; d < rank; ++d) {
      if (__builtin_mul_overflow(numel, dims[static_cast<std::size_t>(d)], &numel)) {
        io_fail(CheckpointRule::kValidationOverflow, file, t.name,
                "the shape's element count overflows 64 bits");
      }
    }
    std::uint64_t bits = 0;
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(dtype_bits(t.dtype)), &bits)) {
      io_fail(CheckpointRule::kValidationOverflow, file, t.name,
              std::to_string(numel) + " elements of " + std::string(dtype_name(t.dtype)) +
                  " overflow 64 bits of size");
    }
    if (bits % 8 != 0) {
      io_fail(CheckpointRule::kMisalignedSlice, file, t.name,
              std::to_string(numel) + " elements of " + std::string(dtype_name(t.dtype)) +
                  " take " + std::to_string(bits) + " bits, not a whole number of bytes");
    }
    if (t.end - t.begin != bits / 8) {
      io_fail(CheckpointRule::kTensorInvalidInfo, file, t.name,
              "data_offsets span " + std::to_string(t.end - t.begin) + " bytes but " +
                  std::string(dtype_name(t.dtype)) + " of this shape takes " +
                  std::to_string(bits / 8));
    }
    t.shape = Shape(dims.data(), rank);  // cannot throw: rank <= 8, product checked above
    start = t.end;
    sorted.push_back(std::move(t));
  }
  if (start != data_bytes) {
    io_fail(CheckpointRule::kMetadataIncompleteBuffer, file, "",
            "the data section is " + std::to_string(data_bytes) + " bytes but the tensors " +
                "cover " + std::to_string(start) +
                (data_bytes > start ? " (trailing bytes)" : " (file truncated)"));
  }
  h.tensors = std::move(sorted);
}

}  // namespace

SafetensorsHeader parse_safetensors(const void* data, std::uint64_t size, std::string_view label) {
  const std::string file(label);
  const auto* bytes = static_cast<const unsigned char*>(data);
  if (size < 8) {
    io_fail(CheckpointRule::kHeaderTooSmall, file, "",
            "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  }
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian on any host
  if (n > kMaxHeaderBytes) {
    io_fail(CheckpointRule::kHeaderTooLarge, file, "",
            "header length " + std::to_string(n) + " exceeds the cap of " +
                std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (n > size - 8) {
    io_fail(CheckpointRule::kInvalidHeaderLength, file, "",
            "header length " + std::to_string(n) + " runs past the end of the " +
                std::to_string(size) + "-byte file");
  }
  const std::string_view text(reinterpret_cast<const char*>(bytes + 8),
                              static_cast<std::size_t>(n));
  const std::size_t bad = detail::find_invalid_utf8(text);
  if (bad != std::string_view::npos) {
    io_fail(CheckpointRule::kInvalidHeader, file, "",
            "header is not valid UTF-8 at byte " + std::to_string(8 + bad) + " of the file");
  }
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") {
    io_fail(CheckpointRule::kInvalidHeader, file, "", "header starts with a UTF-8 byte-order mark");
  }
  // JSON forbids raw NUL anywhere, and nlohmann's lexer would read one as the end of input
  // (so "{}\0..." would pass): refuse it before parsing.
  if (const void* nul = std::memchr(text.data(), 0, text.size())) {
    io_fail(CheckpointRule::kInvalidHeaderDeserialization, file, "",
            "header holds a NUL byte at byte " +
                std::to_string(8 + (static_cast<const char*>(nul) - text.data())) +
                " of the file (pad with spaces, not NULs)");
  }
  SafetensorsHeader h;
  h.header_bytes = n;
  HeaderSax sax(file, &h);
  json::sax_parse(text.begin(), text.end(), &sax, nlohmann::detail::input_format_t::json,
                  /*strict=*/true, /*ignore_comments=*/false);
  if (!sax.done()) {  // defensive: every path that leaves early throws
    io_fail(CheckpointRule::kInvalidHeaderDeserialization, file, "", "header JSON is incomplete");
  }
  validate(h, sax, size - 8 - n, file);
  return h;
}

// ------------------------------------------------------------------ SafetensorsFile

struct SafetensorsFile::Impl {
  std::filesystem::path path;
  std::string label;
  detail::Fd fd;
  const std::byte* map = nullptr;
  std::uint64_t size = 0;
  SafetensorsHeader header;
  std::unordered_map<std::string_view, std::size_t> by_name;

  ~Impl() {
    if (map != nullptr) ::munmap(const_cast<std::byte*>(map), static_cast<std::size_t>(size));
  }
};

SafetensorsFile::SafetensorsFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->label = path.string();
  impl->fd = detail::open_regular_file(path, &impl->size);
  // The length checks run on the 8-byte prefix read with pread, before anything is mapped or
  // allocated from it.
  if (impl->size < 8) {
    parse_safetensors("", impl->size, impl->label);  // throws HeaderTooSmall
  }
  if (static_cast<std::uint64_t>(static_cast<std::size_t>(impl->size)) != impl->size) {
    io_fail(CheckpointRule::kIo, impl->label, "", "file too large to map on this platform");
  }
  void* m = ::mmap(nullptr, static_cast<std::size_t>(impl->size), PROT_READ, MAP_SHARED,
                   impl->fd.get(), 0);
  if (m == MAP_FAILED) {
    io_fail(CheckpointRule::kIo, impl->label, "", "mmap failed: " + detail::errno_text(errno));
  }
  impl->map = static_cast<const std::byte*>(m);
  impl->header = parse_safetensors(impl->map, impl->size, impl->label);
  impl->by_name.reserve(impl->header.tensors.size());
  for (std::size_t i = 0; i < impl->header.tensors.size(); ++i) {
    impl->by_name.emplace(impl->header.tensors[i].name, i);
  }
  return SafetensorsFile(std::move(impl));
}

const std::filesystem::path& SafetensorsFile::path() const noexcept { return impl_->path; }
std::uint64_t SafetensorsFile::file_bytes() const noexcept { return impl_->size; }
const SafetensorsHeader& SafetensorsFile::header() const noexcept { return impl_->header; }

const TensorInfo* SafetensorsFile::find(std::string_view name) const noexcept {
  const auto it = impl_->by_name.find(name);
  return it == impl_->by_name.end() ? nullptr : &impl_->header.tensors[it->second];
}

const TensorInfo& SafetensorsFile::at(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (t == nullptr) {
    io_fail(CheckpointRule::kTensorNotFound, impl_->label, std::string(name), "no such tensor");
  }
  return *t;
}

const std::byte* SafetensorsFile::data(const TensorInfo& info) const noexcept {
  return impl_->map + impl_->header.data_offset() + info.begin;
}

ConstTensorView SafetensorsFile::view(const TensorInfo& info) const {
  return ConstTensorView(data(info), info.dtype, info.shape);
}

void SafetensorsFile::read(const TensorInfo& info, std::uint64_t offset, void* dst,
                           std::uint64_t len) const {
  if (offset > info.nbytes() || len > info.nbytes() - offset) {
    io_fail(CheckpointRule::kInvalidArgument, impl_->label, info.name,
            "read of bytes [" + std::to_string(offset) + ", +" + std::to_string(len) +
                ") past the tensor's " + std::to_string(info.nbytes()) + " bytes");
  }
  detail::pread_exact(impl_->fd.get(), dst, len, impl_->header.data_offset() + info.begin + offset,
                      impl_->label);
}

}  // namespace edgefuse
