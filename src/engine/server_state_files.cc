// A server optimizer's state as files beside its model (src/engine/server_state_files.h).
#include "src/engine/server_state_files.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <fstream>
#include <vector>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <nlohmann/json.hpp>

#include "edgefuse/aggregate/server_state.h"
#include "edgefuse/core/error.h"

namespace edgefuse::detail {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string metadata_value(const Checkpoint& c, const char* key) {
  const auto& m = c.shards().front().metadata();
  const auto it = m.find(key);
  return it == m.end() ? "" : it->second;
}

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

PreviousServerState open_previous_server_state(const ServerOptimizerJob& optimizer,
                                               const Checkpoint& target,
                                               const fs::path& target_folder) {
  PreviousServerState prev;
  prev.folder = optimizer.state.value_or(target_folder);
  if (!optimizer.resume_state) return prev;
  const std::string where =
      "server_optimizer: the previous state in '" + prev.folder.string() + "'";
  const fs::path index = prev.folder / (std::string(kServerStateStem) + ".safetensors.index.json");
  const fs::path single = prev.folder / (std::string(kServerStateStem) + ".safetensors");
  std::error_code ec;
  if (!fs::exists(index, ec) && !fs::exists(single, ec)) {
    fail(where, ": there is none (", kServerStateStem, ".safetensors or its index); set ",
         "\"resume_state\": false to start from zeros (the first round)");
  }
  prev.checkpoint = Checkpoint::open(fs::exists(index, ec) ? index : single);
  const Checkpoint& state = *prev.checkpoint;
  const std::string rule = metadata_value(state, kServerRuleKey);
  if (rule != server_rule_name(optimizer.step.rule)) {
    fail(where, ": it was written by rule '", rule, "' and the job asks for '",
         server_rule_name(optimizer.step.rule), "' (set \"resume_state\": false to start anew)");
  }
  const std::string steps = metadata_value(state, kServerStepKey);
  try {
    std::size_t used = 0;
    prev.steps = std::stoull(steps, &used);
    if (used != steps.size() || steps.empty() || steps[0] == '-')
      throw std::invalid_argument(steps);
  } catch (const std::exception&) {
    fail(where, ": its metadata '", kServerStepKey, "' is '", steps, "', not a step count");
  }
  const std::string id = metadata_value(state, kServerStateIdKey);
  const std::string target_id = metadata_value(target, kServerStateIdKey);
  if (id.empty() || id != target_id) {
    fail(where, ": it belongs to another model (state id '", id, "'; the target '",
         target.path().string(), "' carries ",
         target_id.empty() ? std::string("none") : "'" + target_id + "'",
         "): a state is stepped only beside the model it was written with");
  }
  return prev;
}

std::string server_state_id(const FusionJob& job, const Checkpoint& target,
                            const PreviousServerState& previous) {
  const ServerOptimizerJob& o = *job.server_optimizer;
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> h(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(h.get());
  const std::string params = json{server_rule_name(o.step.rule),
                                  o.step.delta,
                                  o.step.lr,
                                  o.step.momentum,
                                  o.step.beta1,
                                  o.step.beta2,
                                  o.step.tau,
                                  o.bias_correction,
                                  previous.steps + 1}
                                 .dump();
  XXH3_64bits_update(h.get(), params.data(), params.size());
  for (const auto& shard : target.shards()) add_sample(h.get(), shard.path());
  if (target.is_sharded()) add_sample(h.get(), target.path());
  if (previous.checkpoint) {
    for (const auto& shard : previous.checkpoint->shards()) add_sample(h.get(), shard.path());
  }
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

std::map<std::string, std::string> server_state_metadata(const ServerOptimizerJob& optimizer,
                                                         const std::string& id,
                                                         std::uint64_t steps) {
  return {{"format", "pt"},
          {kServerStateIdKey, id},
          {kServerRuleKey, server_rule_name(optimizer.step.rule)},
          {kServerStepKey, std::to_string(steps)}};
}

}  // namespace edgefuse::detail
