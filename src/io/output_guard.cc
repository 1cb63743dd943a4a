// What a command may write over (io/output_guard.h).
#include "edgefuse/io/output_guard.h"

#include <sys/stat.h>

#include <algorithm>

#include "edgefuse/io/checkpoint.h"
#include "src/io/io_util.h"

namespace edgefuse {

namespace fs = std::filesystem;

namespace {

std::optional<FileId> stat_id(const fs::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  return FileId{st.st_dev, st.st_ino};
}

// The ids of the folders above the real path of `path` (which need not exist: its longest
// existing prefix is resolved), up to and including /.
std::vector<FileId> ancestor_ids(const fs::path& path) {
  std::error_code ec;
  fs::path real = fs::weakly_canonical(fs::absolute(path, ec), ec);
  if (ec) real = fs::absolute(path).lexically_normal();
  std::vector<FileId> out;
  for (fs::path p = real.parent_path();; p = p.parent_path()) {
    if (const auto id = stat_id(p)) out.push_back(*id);
    if (p == p.parent_path() || p.empty()) break;
  }
  return out;
}

bool contains(const std::vector<FileId>& ids, const FileId& id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}

[[noreturn]] void refuse(const fs::path& output, const std::string& why) {
  detail::io_fail(CheckpointRule::kInvalidArgument, output.string(), "", why);
}

}  // namespace

std::optional<FileId> file_id(const fs::path& path) { return stat_id(path); }

void InputSet::add(const fs::path& path, std::string role) {
  const auto id = stat_id(path);
  if (!id) return;
  std::error_code ec;
  inputs_.push_back({path, std::move(role), *id, fs::is_directory(path, ec), ancestor_ids(path)});
}

void InputSet::add_checkpoint(const Checkpoint& checkpoint, const std::string& role) {
  add(checkpoint.path(), role);
  for (const auto& shard : checkpoint.shards()) add(shard.path(), role);
}

std::string InputSet::conflict(const fs::path& output) const {
  const auto id = stat_id(output);
  const std::vector<FileId> above = ancestor_ids(output);
  for (const Input& in : inputs_) {
    const std::string named = in.role + " (" + detail::printable(in.path.string()) + ")";
    if (id && *id == in.id) return "is " + named;
    if (id && contains(in.ancestors, *id)) return "contains " + named;
    if (in.is_folder && contains(above, in.id)) return "lies inside " + named;
  }
  return "";
}

void check_not_input(const fs::path& output, const InputSet& inputs, const std::string& what) {
  const std::string why = inputs.conflict(output);
  if (!why.empty())
    refuse(output, what + " " + why + ", which this command reads; choose another path");
}

void check_output_folder(const fs::path& folder, const InputSet& inputs, bool replace,
                         const std::string& replace_hint) {
  check_not_input(folder, inputs, "the output");
  std::error_code ec;
  const auto st = fs::symlink_status(folder, ec);
  if (!fs::exists(st)) return;
  if (!fs::is_directory(st)) refuse(folder, "the destination exists and is not a folder");
  bool empty = true, checkpoint = false;
  for (const auto& e : fs::directory_iterator(folder, ec)) {
    empty = false;
    const std::string name = e.path().filename().string();
    std::error_code sec;
    if (!fs::is_regular_file(fs::symlink_status(e.path(), sec))) {
      if (!replace) break;
      refuse(folder, "the destination holds '" + detail::printable(name) +
                         "', which is not a regular file: only a checkpoint folder (regular "
                         "files, no subfolders or links) is ever replaced");
    }
    if (name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0)
      checkpoint = true;
  }
  if (ec) refuse(folder, "cannot list the destination: " + ec.message());
  if (empty) return;
  if (!replace) {
    refuse(folder, "the destination folder exists and is not empty (" + replace_hint +
                       " to replace it atomically)");
  }
  if (!checkpoint) {
    refuse(folder,
           "the destination folder holds no *.safetensors file: it is not a checkpoint, "
           "and only a checkpoint folder is ever replaced");
  }
}

void check_output_file(const fs::path& file, const InputSet& inputs, bool replace,
                       const std::string& what, const std::string& replace_hint,
                       bool (*is_ours)(const fs::path&)) {
  check_not_input(file, inputs, what);
  std::error_code ec;
  const fs::path dir = fs::absolute(file, ec).parent_path();
  if (!fs::is_directory(dir, ec)) {
    detail::io_fail(CheckpointRule::kIo, file.string(), "",
                    what + ": the folder '" + detail::printable(dir.string()) + "' does not exist");
  }
  const auto st = fs::symlink_status(file, ec);
  if (!fs::exists(st)) return;
  if (fs::is_symlink(st)) refuse(file, what + " is a symbolic link; it is never written through");
  if (!fs::is_regular_file(st)) refuse(file, what + " exists and is not a regular file");
  if (!replace) refuse(file, what + " exists (" + replace_hint + " to replace it)");
  if (is_ours != nullptr && !is_ours(file)) {
    refuse(file, what + " exists and is not a file this command writes; it is never replaced");
  }
}

}  // namespace edgefuse
