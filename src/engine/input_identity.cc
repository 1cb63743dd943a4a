// What a fusion's output bytes depend on (src/engine/input_identity.h).
#include "src/engine/input_identity.h"

#include <algorithm>
#include <vector>

namespace edgefuse::detail {

namespace fs = std::filesystem;

void InputIdentity::add_file(const fs::path& p) {
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(p, ec)) {
      if (e.is_regular_file(ec)) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) add_file(f);
    return;
  }
  const auto size = fs::file_size(p, ec);
  const auto mtime = fs::last_write_time(p, ec).time_since_epoch().count();
  j_["files"].push_back({fs::absolute(p).lexically_normal().string(), ec ? 0 : size,
                         static_cast<std::int64_t>(mtime)});
}

std::uint64_t folder_bytes(const fs::path& p) {
  std::error_code ec;
  if (fs::is_regular_file(p, ec)) return fs::file_size(p, ec);
  std::uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(p, ec)) {
    if (e.is_regular_file(ec)) n += e.file_size(ec);
  }
  return n;
}

}  // namespace edgefuse::detail
