// A job's clients registered with the aggregator (src/engine/client_registry.h).
#include "src/engine/client_registry.h"

#include <algorithm>
#include <tuple>

#include "edgefuse/core/error.h"
#include "edgefuse/io/output_guard.h"
#include "edgefuse/io/peft.h"
#include "src/engine/adapter_client.h"
#include "src/engine/input_identity.h"
#include "src/engine/job_files.h"
#include "src/plan/json_util.h"

namespace edgefuse::detail {

namespace fs = std::filesystem;

namespace {

// Weights are sample counts or fractions. Outside [kMinWeight, kMaxWeight] a weight is
// refused: the sum of weights must stay finite and meaningful in f32, and a smaller weight
// would round to 0 or to a subnormal there and contribute nothing.
constexpr double kMinWeight = 1e-12;
constexpr double kMaxWeight = 1e12;

}  // namespace

void ClientRegistry::register_one(const FusionClient& c, RejectionKind& step) {
  step = RejectionKind::kDuplicateName;
  if (!names_.insert(c.name).second) fail("duplicate client name '", c.name, "'");
  step = RejectionKind::kWeight;
  if (!(c.weight >= kMinWeight && c.weight <= kMaxWeight)) {
    fail("weight ", c.weight, " must be in [1e-12, 1e12]");
  }
  // One file is one client, whatever its spelling, links or hard links: the file read (an
  // update's index or single file, an adapter's weights) is compared by device and inode.
  step = RejectionKind::kUnreadable;
  const bool update = c.kind == FusionClient::Kind::kUpdate;
  const fs::path read =
      update ? Checkpoint::open(c.path).path() : PeftAdapter::open(c.path).checkpoint().path();
  step = RejectionKind::kDuplicateFile;
  if (const auto id = file_id(read)) {
    const auto [it, fresh] = files_.emplace(std::pair{id->dev, id->ino}, c.name);
    if (!fresh) {
      fail("the same ", update ? "update" : "adapter", " as client '", it->second, "' (",
           c.path.string(), ")");
    }
  }
  step = RejectionKind::kBadPlan;
  std::optional<Plan> plan;
  if (c.plan) plan = parse_plan(read_config_file(*c.plan, kMaxJobBytes), layout_, c.plan->string());
  const float w = static_cast<float>(c.weight);
  if (update) {
    step = RejectionKind::kUnreadable;
    updates_.push_back(std::make_unique<Checkpoint>(Checkpoint::open(c.path)));
    step = RejectionKind::kBadUpdate;
    agg_.add(views_of(*updates_.back()), *plan, w, c.path.string());
    files_bytes_ += sizeof(Checkpoint) + 64 * updates_.back()->shards().size();
    for (const auto& e : updates_.back()->tensors()) {
      files_bytes_ += sizeof(e) + sizeof(*e.info) + e.info->name.size();
    }
    return;
  }
  step = RejectionKind::kBadUpdate;
  // The aggregator's source keeps the client (and its mapped file) until the round ends.
  auto client = std::make_shared<const AdapterClient>(c.path, layout_, plan);
  agg_.add_low_rank(client->tensors(), w, c.path.string(),
                    [client](const std::string& t) { return client->make(t); });
  adapters_bytes_ += client->bytes();
}

void ClientRegistry::register_all(const FusionJob& job, std::uint64_t working, FusionReport& rep) {
  std::vector<const FusionClient*> order;
  for (const auto& c : job.clients) order.push_back(&c);
  std::sort(order.begin(), order.end(), [](const FusionClient* a, const FusionClient* b) {
    return std::tie(a->name, a->path, a->weight) < std::tie(b->name, b->path, b->weight);
  });
  // The budget holds the writer's buffers, the tile buffers and the clients' state (their
  // plans and index lists, file indexes, and the most one tensor's per-client state reaches:
  // row lists and adapter factors made for it). Exceeding it is an error before anything is
  // written, whatever the number of clients.
  std::size_t registered = 0;
  for (const FusionClient* c : order) {
    ++registered;
    RejectionKind step = RejectionKind::kDuplicateName;
    try {
      register_one(*c, step);
      rep.bytes_read += folder_bytes(c->path);
      rep.accepted.push_back(c->name);
    } catch (const Error& e) {
      rep.rejected.push_back({c->name, step, e.what()});
    }
    rep.client_state_bytes = agg_.resident_bytes() + files_bytes_ + adapters_bytes_;
    if (working + rep.client_state_bytes > job.memory_budget) {
      fail("memory budget: after ", registered, " of ", order.size(), " clients (the last '",
           c->name, "') the clients' state needs ", rep.client_state_bytes,
           " bytes (plans and index lists, file indexes, and one tensor's row lists and adapter "
           "factors), which with the engine's ",
           working, " bytes of writer and tile buffers exceeds the memory budget of ",
           job.memory_budget,
           " bytes; raise \"memory_budget\" or split the clients over several jobs. The output "
           "was not written");
    }
  }
}

}  // namespace edgefuse::detail
