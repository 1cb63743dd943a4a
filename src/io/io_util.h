// Internal helpers of the io layer: POSIX file descriptors with checked I/O, the name and
// UTF-8 rules shared by the safetensors header, the index and adapter_config.json, and a
// strict JSON parse (duplicate keys and nesting depth rejected) over nlohmann::json.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "edgefuse/io/safetensors.h"

namespace edgefuse::detail {

[[noreturn]] inline void io_fail(CheckpointRule rule, const std::string& file,
                                 const std::string& tensor, const std::string& detail) {
  throw CheckpointError(rule, file, tensor, detail);
}

inline bool ends_with(std::string_view s, std::string_view suffix) noexcept {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// "strerror(errno) (errno N)".
std::string errno_text(int err);

// Owns a file descriptor; closes it on destruction (close errors there are ignored: callers
// that need durability call close_checked()).
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();
  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  int release() noexcept {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  // close(); throws CheckpointError(kIo) naming `file` on failure.
  void close_checked(const std::string& file);

 private:
  int fd_ = -1;
};

// Opens `path` read-only without blocking on a FIFO and requires a regular file. Returns the
// descriptor and the size.
Fd open_regular_file(const std::filesystem::path& path, std::uint64_t* size);
// Reads exactly len bytes at offset; a short read (file shrank) throws kIo.
void pread_exact(int fd, void* dst, std::uint64_t len, std::uint64_t offset,
                 const std::string& file);
// Writes all len bytes (retrying partial writes and EINTR); throws kIo with errno's text.
void write_all(int fd, const void* src, std::uint64_t len, const std::string& file);
// The same at `offset` (pwrite; the file position does not move; safe from several threads).
void pwrite_all(int fd, const void* src, std::uint64_t len, std::uint64_t offset,
                const std::string& file);
// fsync; a failure is fatal for the write in progress (never retried: fsyncgate).
void fsync_checked(int fd, const std::string& file);
// Opens a directory and fsyncs it.
void fsync_directory(const std::filesystem::path& dir);
// Reads a whole small regular file (at most max_bytes) into a string.
std::string read_small_file(const std::filesystem::path& path, std::uint64_t max_bytes,
                            CheckpointRule too_large_rule);

// Byte offset of the first byte that breaks UTF-8 (RFC 3629: no overlongs, no surrogates,
// nothing above U+10FFFF), or npos when the text is valid.
std::size_t find_invalid_utf8(std::string_view text) noexcept;

// Empty string when `name` is acceptable as a tensor name or metadata key; otherwise why not.
std::string name_problem(std::string_view name);

// Escapes bytes outside printable ASCII as \xNN and shortens to max_bytes, for messages.
std::string printable(std::string_view text, std::size_t max_bytes = 200);

// Parses JSON text strictly: UTF-8 checked first, duplicate keys in any object and nesting
// deeper than kMaxJsonDepth are errors. Throws CheckpointError(rule) naming `file`.
nlohmann::json parse_json_strict(std::string_view text, const std::string& file,
                                 CheckpointRule rule);

}  // namespace edgefuse::detail
