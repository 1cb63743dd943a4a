// Sharded checkpoints: the index reader (the writer is in checkpoint_writer.cc).
#include "edgefuse/io/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "src/io/io_util.h"

namespace edgefuse {

namespace fs = std::filesystem;
using detail::ends_with;
using detail::io_fail;
using detail::printable;

namespace {

// Empty when `shard` is a relative path that stays inside the checkpoint folder.
std::string shard_path_problem(const std::string& shard) {
  if (shard.empty()) return "the shard path is empty";
  std::string problem = detail::name_problem(shard);
  if (!problem.empty()) return problem;
  if (shard.front() == '/') return "the shard path is absolute";
  if (shard.find('\\') != std::string::npos) return "the shard path holds a backslash";
  for (const auto& part : fs::path(shard)) {
    if (part == "..") return "the shard path climbs out of the folder with '..'";
  }
  return {};
}

}  // namespace

// ------------------------------------------------------------------------ Checkpoint

struct Checkpoint::Impl {
  fs::path path;
  bool sharded = false;
  std::vector<SafetensorsFile> shards;
  std::vector<Entry> tensors;
  std::unordered_map<std::string_view, std::size_t> by_name;
  std::map<std::string, std::string> index_metadata;
  std::uint64_t total = 0;

  // Reads the index at `path`, opens its shards and checks them against weight_map.
  void open_index();
  void index_entries() {
    for (const auto& f : shards) {
      for (const auto& t : f.tensors()) {
        tensors.push_back({&f, &t});
        total += t.nbytes();
      }
    }
    by_name.reserve(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) by_name.emplace(tensors[i].info->name, i);
  }
};

namespace {

fs::path resolve_folder(const fs::path& dir) {
  for (const char* preferred :
       {"model.safetensors.index.json", "model.safetensors", "adapter_model.safetensors"}) {
    std::error_code ec;
    if (fs::exists(dir / preferred, ec)) return dir / preferred;
  }
  std::vector<fs::path> indexes, files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (ends_with(name, ".safetensors.index.json")) indexes.push_back(e.path());
    if (ends_with(name, ".safetensors")) files.push_back(e.path());
  }
  if (ec) {
    io_fail(CheckpointRule::kIo, dir.string(), "", "cannot list the folder: " + ec.message());
  }
  std::sort(indexes.begin(), indexes.end());
  std::sort(files.begin(), files.end());
  auto names = [](const std::vector<fs::path>& v) {
    std::string s;
    for (std::size_t i = 0; i < v.size() && i < 4; ++i) {
      s += (i ? ", " : "") + printable(v[i].filename().string(), 80);
    }
    return s + (v.size() > 4 ? ", ..." : "");
  };
  if (indexes.size() == 1) return indexes[0];
  if (indexes.size() > 1) {
    io_fail(CheckpointRule::kNoCheckpoint, dir.string(), "",
            "several index files (" + names(indexes) + "); open one of them");
  }
  if (files.size() == 1) return files[0];
  if (files.size() > 1) {
    io_fail(CheckpointRule::kNoCheckpoint, dir.string(), "",
            std::to_string(files.size()) + " .safetensors files (" + names(files) +
                ") and no index; open one of them");
  }
  io_fail(CheckpointRule::kNoCheckpoint, dir.string(), "",
          "no .safetensors file or index in this folder");
}

}  // namespace

void Checkpoint::Impl::open_index() {
  Impl& impl = *this;
  const std::string file = impl.path.string();
  const std::string text =
      detail::read_small_file(impl.path, kMaxIndexBytes, CheckpointRule::kInvalidIndex);
  const nlohmann::json j = detail::parse_json_strict(text, file, CheckpointRule::kInvalidIndex);
  if (!j.is_object())
    io_fail(CheckpointRule::kInvalidIndex, file, "", "index is not a JSON object");
  const auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) {
    io_fail(CheckpointRule::kInvalidIndex, file, "", "index has no \"weight_map\" object");
  }
  if (const auto md = j.find("metadata"); md != j.end()) {
    if (!md->is_object()) {
      io_fail(CheckpointRule::kInvalidIndex, file, "", "\"metadata\" is not an object");
    }
    for (const auto& [k, v] : md->items()) {
      impl.index_metadata[k] = v.is_string() ? v.get<std::string>() : v.dump();
    }
    if (const auto ts = md->find("total_size");
        ts != md->end() && !ts->is_number_unsigned() &&
        !(ts->is_number_integer() && ts->get<std::int64_t>() >= 0)) {
      io_fail(CheckpointRule::kInvalidIndex, file, "",
              "metadata.total_size is not a non-negative integer");
    }
  }
  std::unordered_map<std::string, std::string> shard_of;
  shard_of.reserve(wm->size());
  std::set<std::string> shard_names;
  for (const auto& [name, value] : wm->items()) {
    const std::string problem = detail::name_problem(name);
    if (!problem.empty()) io_fail(CheckpointRule::kInvalidName, file, name, problem);
    if (!value.is_string()) {
      io_fail(CheckpointRule::kInvalidIndex, file, name,
              "weight_map value is " + std::string(value.type_name()) + ", not a shard file name");
    }
    const auto& shard = value.get_ref<const std::string&>();
    const std::string bad = shard_path_problem(shard);
    if (!bad.empty()) {
      io_fail(CheckpointRule::kShardPathEscapes, file, name,
              "shard '" + printable(shard) + "': " + bad);
    }
    shard_of.emplace(name, shard);
    shard_names.insert(shard);
  }
  const fs::path folder = impl.path.parent_path();
  std::vector<std::string> order(shard_names.begin(), shard_names.end());
  impl.shards.reserve(order.size());
  for (const auto& shard : order) {
    const fs::path p = folder / shard;
    std::error_code ec;
    if (!fs::exists(p, ec)) {
      std::string some;
      for (const auto& [n, s] : shard_of) {
        if (s == shard) {
          some = n;
          break;
        }
      }
      io_fail(CheckpointRule::kMissingShard, file, some,
              "its shard '" + printable(shard) + "' does not exist");
    }
    impl.shards.push_back(SafetensorsFile::open(p));
  }
  // Every tensor of every shard must be listed for that shard, and every listing present.
  std::size_t present = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    for (const auto& t : impl.shards[i].tensors()) {
      const auto it = shard_of.find(t.name);
      if (it == shard_of.end()) {
        io_fail(CheckpointRule::kTensorNotInIndex, impl.shards[i].path().string(), t.name,
                "is in this shard but not in the index's weight_map");
      }
      if (it->second != order[i]) {
        io_fail(CheckpointRule::kTensorInTwoShards, file, t.name,
                "the index maps it to '" + printable(it->second) + "' but shard '" +
                    printable(order[i]) + "' holds it too");
      }
      ++present;
    }
  }
  if (present != shard_of.size()) {
    for (const auto& [name, shard] : shard_of) {
      const std::size_t i = static_cast<std::size_t>(
          std::lower_bound(order.begin(), order.end(), shard) - order.begin());
      if (impl.shards[i].find(name) == nullptr) {
        io_fail(CheckpointRule::kTensorNotInShard, file, name,
                "listed in weight_map for '" + printable(shard) + "', which does not hold it");
      }
    }
  }
  impl.sharded = true;
}

Checkpoint::Checkpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

Checkpoint Checkpoint::open(const fs::path& path) {
  auto impl = std::make_unique<Impl>();
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (ec || !fs::exists(st)) {
    io_fail(CheckpointRule::kIo, path.string(), "", "no such file or folder");
  }
  impl->path = fs::is_directory(st) ? resolve_folder(path) : path;
  if (ends_with(impl->path.filename().string(), ".json")) {
    impl->open_index();
  } else {
    impl->shards.push_back(SafetensorsFile::open(impl->path));
  }
  impl->index_entries();
  return Checkpoint(std::move(impl));
}

const fs::path& Checkpoint::path() const noexcept { return impl_->path; }
bool Checkpoint::is_sharded() const noexcept { return impl_->sharded; }
const std::vector<SafetensorsFile>& Checkpoint::shards() const noexcept { return impl_->shards; }
const std::vector<Checkpoint::Entry>& Checkpoint::tensors() const noexcept {
  return impl_->tensors;
}
const std::map<std::string, std::string>& Checkpoint::index_metadata() const noexcept {
  return impl_->index_metadata;
}
std::uint64_t Checkpoint::total_bytes() const noexcept { return impl_->total; }

const Checkpoint::Entry* Checkpoint::find(std::string_view name) const noexcept {
  const auto it = impl_->by_name.find(name);
  return it == impl_->by_name.end() ? nullptr : &impl_->tensors[it->second];
}

const Checkpoint::Entry& Checkpoint::at(std::string_view name) const {
  const Entry* e = find(name);
  if (e == nullptr) {
    io_fail(CheckpointRule::kTensorNotFound, impl_->path.string(), std::string(name),
            "no such tensor in the checkpoint");
  }
  return *e;
}

ConstTensorView Checkpoint::view(std::string_view name) const {
  const Entry& e = at(name);
  return e.file->view(*e.info);
}

}  // namespace edgefuse
