// Private: what a fusion's output bytes depend on, for the resume journal: the job's content
// and the size and modification time of every input file (a folder: each regular file in it).
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

namespace edgefuse::detail {

class InputIdentity {
 public:
  void add(const std::string& key, const std::string& value) { j_[key] = value; }
  void add_file(const std::filesystem::path& p);
  std::string text() const { return j_.dump(); }

 private:
  nlohmann::json j_ = nlohmann::json::object();
};

// Bytes of a file, or of the regular files directly in a folder.
std::uint64_t folder_bytes(const std::filesystem::path& p);

}  // namespace edgefuse::detail
