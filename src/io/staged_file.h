// Private: a small file (a report) written under a fresh name beside its final one and renamed
// into place. The temporary is created with O_CREAT | O_EXCL | O_NOFOLLOW relative to its
// folder held open, under a random name, so no link or leftover file is ever followed or
// truncated; it is removed unless published.
#pragma once

#include <filesystem>
#include <string>

#include "src/io/io_util.h"

namespace edgefuse::detail {

class StagedFile {
 public:
  // Creates the temporary now, so a missing or read-only folder fails before any work.
  // Throws CheckpointError (Io) naming the file.
  explicit StagedFile(std::filesystem::path final_path);
  StagedFile(const StagedFile&) = delete;
  StagedFile& operator=(const StagedFile&) = delete;
  ~StagedFile();

  // Writes `text` (the whole file) and fsyncs it.
  void write(const std::string& text);
  // Renames the temporary onto the final name and fsyncs the folder.
  void publish();

  const std::filesystem::path& path() const noexcept { return final_; }

 private:
  std::filesystem::path final_;
  std::string temp_name_;
  Fd dir_, file_;
  bool written_ = false, published_ = false;
};

}  // namespace edgefuse::detail
