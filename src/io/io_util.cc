#include "src/io/io_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>
#include <vector>

namespace edgefuse {

namespace {

constexpr std::string_view kRuleNames[] = {
    "HeaderTooSmall",
    "HeaderTooLarge",
    "InvalidHeaderLength",
    "InvalidHeader",
    "InvalidHeaderDeserialization",
    "InvalidOffset",
    "ValidationOverflow",
    "MisalignedSlice",
    "TensorInvalidInfo",
    "MetadataIncompleteBuffer",
    "TensorNotFound",
    "DuplicateKey",
    "InvalidName",
    "UnknownDType",
    "RankTooLarge",
    "TooManyTensors",
    "MetadataTooLarge",
    "NotRegularFile",
    "Io",
    "InvalidIndex",
    "MissingShard",
    "ShardPathEscapes",
    "TensorInTwoShards",
    "TensorNotInShard",
    "TensorNotInIndex",
    "NoCheckpoint",
    "InvalidAdapter",
    "WriterBusy",
    "InvalidArgument",
};
static_assert(sizeof(kRuleNames) / sizeof(kRuleNames[0]) ==
              static_cast<std::size_t>(CheckpointRule::kInvalidArgument) + 1);

std::string compose(CheckpointRule rule, const std::string& file, const std::string& tensor,
                    const std::string& detail) {
  std::string msg = detail::printable(file, 400);
  msg += ": ";
  if (!tensor.empty()) {
    msg += "tensor '";
    msg += detail::printable(tensor);
    msg += "': ";
  }
  msg += detail;
  msg += " (";
  msg += checkpoint_rule_name(rule);
  msg += ")";
  return msg;
}

}  // namespace

std::string_view checkpoint_rule_name(CheckpointRule rule) noexcept {
  const auto i = static_cast<std::size_t>(rule);
  return i < sizeof(kRuleNames) / sizeof(kRuleNames[0]) ? kRuleNames[i] : "Unknown";
}

CheckpointError::CheckpointError(CheckpointRule rule, std::string file, std::string tensor,
                                 const std::string& detail)
    : Error(compose(rule, file, tensor, detail)),
      rule_(rule),
      file_(std::move(file)),
      tensor_(std::move(tensor)),
      detail_(detail) {}

namespace detail {

std::string errno_text(int err) {
  return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")";
}

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.release();
  }
  return *this;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

void Fd::close_checked(const std::string& file) {
  const int fd = release();
  if (fd >= 0 && ::close(fd) != 0) {
    io_fail(CheckpointRule::kIo, file, "", "close failed: " + errno_text(errno));
  }
}

Fd open_regular_file(const std::filesystem::path& path, std::uint64_t* size) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd) {
    const int err = errno;
    io_fail(CheckpointRule::kIo, path.string(), "",
            err == ENOENT ? std::string("no such file") : "cannot open: " + errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    io_fail(CheckpointRule::kIo, path.string(), "", "fstat failed: " + errno_text(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    const char* what = S_ISDIR(st.st_mode)    ? "a directory"
                       : S_ISFIFO(st.st_mode) ? "a FIFO"
                       : S_ISCHR(st.st_mode)  ? "a character device"
                       : S_ISBLK(st.st_mode)  ? "a block device"
                       : S_ISSOCK(st.st_mode) ? "a socket"
                                              : "not a regular file";
    io_fail(CheckpointRule::kNotRegularFile, path.string(), "",
            std::string("is ") + what + ", not a regular file");
  }
  // Back to blocking reads (irrelevant for regular files, but explicit).
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags >= 0) ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
  *size = static_cast<std::uint64_t>(st.st_size);
  return fd;
}

void pread_exact(int fd, void* dst, std::uint64_t len, std::uint64_t offset,
                 const std::string& file) {
  auto* out = static_cast<char*>(dst);
  while (len > 0) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(len, 1u << 30));
    const ssize_t got = ::pread(fd, out, want, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      io_fail(CheckpointRule::kIo, file, "", "read failed: " + errno_text(errno));
    }
    if (got == 0) {
      io_fail(CheckpointRule::kIo, file, "",
              "file ended at byte " + std::to_string(offset) +
                  " while reading; it was truncated or changed after it was opened");
    }
    out += got;
    offset += static_cast<std::uint64_t>(got);
    len -= static_cast<std::uint64_t>(got);
  }
}

void pwrite_all(int fd, const void* src, std::uint64_t len, std::uint64_t offset,
                const std::string& file) {
  const auto* in = static_cast<const char*>(src);
  while (len > 0) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(len, 1u << 30));
    const ssize_t put = ::pwrite(fd, in, want, static_cast<off_t>(offset));
    if (put < 0) {
      if (errno == EINTR) continue;
      io_fail(CheckpointRule::kIo, file, "", "write failed: " + errno_text(errno));
    }
    in += put;
    offset += static_cast<std::uint64_t>(put);
    len -= static_cast<std::uint64_t>(put);
  }
}

void write_all(int fd, const void* src, std::uint64_t len, const std::string& file) {
  const auto* in = static_cast<const char*>(src);
  while (len > 0) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(len, 1u << 30));
    const ssize_t put = ::write(fd, in, want);
    if (put < 0) {
      if (errno == EINTR) continue;
      io_fail(CheckpointRule::kIo, file, "", "write failed: " + errno_text(errno));
    }
    in += put;
    len -= static_cast<std::uint64_t>(put);
  }
}

void fsync_checked(int fd, const std::string& file) {
  if (::fsync(fd) != 0) {
    io_fail(CheckpointRule::kIo, file, "", "fsync failed: " + errno_text(errno));
  }
}

void fsync_directory(const std::filesystem::path& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) {
    io_fail(CheckpointRule::kIo, dir.string(), "", "cannot open folder: " + errno_text(errno));
  }
  fsync_checked(fd.get(), dir.string());
}

std::string read_small_file(const std::filesystem::path& path, std::uint64_t max_bytes,
                            CheckpointRule too_large_rule) {
  std::uint64_t size = 0;
  Fd fd = open_regular_file(path, &size);
  if (size > max_bytes) {
    io_fail(too_large_rule, path.string(), "",
            "file is " + std::to_string(size) + " bytes, above the cap of " +
                std::to_string(max_bytes));
  }
  std::string text(static_cast<std::size_t>(size), '\0');
  pread_exact(fd.get(), text.data(), size, 0, path.string());
  return text;
}

std::size_t find_invalid_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

std::string name_problem(std::string_view name) {
  if (name.empty()) return "the name is empty";
  if (name.size() > kMaxNameBytes) {
    return "the name is " + std::to_string(name.size()) + " bytes, above the cap of " +
           std::to_string(kMaxNameBytes);
  }
  for (std::size_t i = 0; i < name.size(); ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c == 0x7F) {
      return "the name holds control character 0x" + std::string(1, "0123456789abcdef"[c >> 4]) +
             "0123456789abcdef"[c & 15] + " at byte " + std::to_string(i);
    }
  }
  return {};
}

std::string printable(std::string_view text, std::size_t max_bytes) {
  std::string out;
  const std::size_t n = std::min(text.size(), max_bytes);
  out.reserve(n + 8);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out += static_cast<char>(c);
    } else if (c == '\\') {
      out += "\\\\";
    } else {
      out += "\\x";
      out += "0123456789abcdef"[c >> 4];
      out += "0123456789abcdef"[c & 15];
    }
  }
  if (text.size() > max_bytes) out += "...";
  return out;
}

nlohmann::json parse_json_strict(std::string_view text, const std::string& file,
                                 CheckpointRule rule) {
  const std::size_t bad = find_invalid_utf8(text);
  if (bad != std::string_view::npos) {
    io_fail(rule, file, "", "not valid UTF-8 at byte " + std::to_string(bad));
  }
  if (text.size() >= 3 && static_cast<unsigned char>(text[0]) == 0xEF &&
      static_cast<unsigned char>(text[1]) == 0xBB && static_cast<unsigned char>(text[2]) == 0xBF) {
    io_fail(rule, file, "", "starts with a UTF-8 byte-order mark");
  }
  if (text.find('\0') != std::string_view::npos) {
    io_fail(rule, file, "", "holds a NUL byte at byte " + std::to_string(text.find('\0')));
  }
  // One set of keys per open object, to reject duplicates (nlohmann keeps the last silently).
  std::vector<std::set<std::string>> keys;
  using Event = nlohmann::json::parse_event_t;
  auto callback = [&](int depth, Event event, nlohmann::json& parsed) -> bool {
    if (static_cast<std::size_t>(depth) > kMaxJsonDepth) {
      io_fail(rule, file, "",
              "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    }
    switch (event) {
      case Event::object_start:
        keys.emplace_back();
        break;
      case Event::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case Event::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!keys.empty() && !keys.back().insert(key).second) {
          io_fail(CheckpointRule::kDuplicateKey, file, "",
                  "JSON key '" + printable(key) + "' appears twice in one object");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    io_fail(rule, file, "", std::string("not valid JSON: ") + printable(e.what(), 300));
  }
}

}  // namespace detail
}  // namespace edgefuse
