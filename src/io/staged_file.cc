// A file staged beside its final name (src/io/staged_file.h).
#include "src/io/staged_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <random>

namespace edgefuse::detail {

namespace fs = std::filesystem;

StagedFile::StagedFile(fs::path final_path) : final_(std::move(final_path)) {
  const fs::path dir = final_.parent_path().empty() ? fs::path(".") : final_.parent_path();
  dir_ = Fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_) {
    io_fail(CheckpointRule::kIo, final_.string(), "",
            "cannot open its folder: " + errno_text(errno));
  }
  std::random_device rd;
  for (int attempt = 0; attempt < 16 && !file_; ++attempt) {
    char suffix[24];
    std::snprintf(suffix, sizeof suffix, ".tmp-%08x", rd());
    temp_name_ = "." + final_.filename().string() + suffix;
    file_ = Fd(::openat(dir_.get(), temp_name_.c_str(),
                        O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!file_ && errno != EEXIST) break;
  }
  if (!file_) {
    io_fail(CheckpointRule::kIo, final_.string(), "",
            "cannot create its temporary file: " + errno_text(errno));
  }
}

StagedFile::~StagedFile() {
  if (!published_ && dir_) ::unlinkat(dir_.get(), temp_name_.c_str(), 0);
}

void StagedFile::write(const std::string& text) {
  const std::string label = final_.string();
  write_all(file_.get(), text.data(), text.size(), label);
  fsync_checked(file_.get(), label);
  file_.close_checked(label);
  written_ = true;
}

void StagedFile::publish() {
  if (!written_)
    io_fail(CheckpointRule::kInvalidArgument, final_.string(), "", "published before written");
  if (::renameat(dir_.get(), temp_name_.c_str(), dir_.get(), final_.filename().c_str()) != 0) {
    io_fail(CheckpointRule::kIo, final_.string(), "",
            "cannot move into place: " + errno_text(errno));
  }
  published_ = true;
  if (::fsync(dir_.get()) != 0) {
    io_fail(CheckpointRule::kIo, final_.string(), "",
            "fsync of its folder failed: " + errno_text(errno));
  }
}

}  // namespace edgefuse::detail
