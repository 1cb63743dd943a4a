// The id tying a round's state to its model (src/engine/lineage_id.h).
#include "src/engine/lineage_id.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <memory>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <nlohmann/json.hpp>

#include "edgefuse/core/error.h"

namespace edgefuse::detail {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Feeds a file's name, size and its first and last 64 KiB to `h`.
void add_sample(XXH3_state_t* h, const fs::path& file) {
  constexpr std::size_t kSample = 64 << 10;
  const std::string name = file.filename().string();
  XXH3_64bits_update(h, name.data(), name.size() + 1);
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(file.string(), ": cannot be read");
  in.seekg(0, std::ios::end);
  const std::uint64_t size = static_cast<std::uint64_t>(in.tellg());
  XXH3_64bits_update(h, &size, sizeof size);
  std::vector<char> buf(static_cast<std::size_t>(std::min<std::uint64_t>(size, kSample)));
  for (const std::uint64_t at : {std::uint64_t{0}, size - buf.size()}) {
    in.seekg(static_cast<std::streamoff>(at));
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (!in) fail(file.string(), ": cannot be read");
    XXH3_64bits_update(h, buf.data(), buf.size());
  }
}

// A checkpoint file or folder: its .safetensors files and index, in name order (not the
// reports or configs a folder also holds).
void add_checkpoint_sample(XXH3_state_t* h, const fs::path& path) {
  if (!fs::is_directory(path)) return add_sample(h, path);
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(path)) {
    const std::string n = e.path().filename().string();
    const bool tensors = n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0;
    const bool index =
        n.size() > 23 && n.compare(n.size() - 23, 23, ".safetensors.index.json") == 0;
    if (e.is_regular_file() && (tensors || index)) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) add_sample(h, f);
}

}  // namespace

std::string lineage_id(const FusionJob& job, const Checkpoint& target, const std::string& params,
                       const std::vector<fs::path>& extra_files) {
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> h(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(h.get());
  XXH3_64bits_update(h.get(), params.data(), params.size());
  for (const auto& shard : target.shards()) add_sample(h.get(), shard.path());
  if (target.is_sharded()) add_sample(h.get(), target.path());
  for (const auto& f : extra_files) add_sample(h.get(), f);
  std::vector<const FusionClient*> clients;
  for (const auto& c : job.clients) clients.push_back(&c);
  std::sort(clients.begin(), clients.end(),
            [](const FusionClient* a, const FusionClient* b) { return a->name < b->name; });
  for (const FusionClient* c : clients) {
    const std::string head = json{c->name, c->weight}.dump();
    XXH3_64bits_update(h.get(), head.data(), head.size());
    add_checkpoint_sample(h.get(), c->path);
    if (c->plan) add_sample(h.get(), *c->plan);
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016" PRIx64,
                static_cast<std::uint64_t>(XXH3_64bits_digest(h.get())));
  return hex;
}

std::string checkpoint_metadata_value(const Checkpoint& checkpoint, const char* key) {
  const auto& m = checkpoint.shards().front().metadata();
  const auto it = m.find(key);
  return it == m.end() ? "" : it->second;
}

}  // namespace edgefuse::detail
