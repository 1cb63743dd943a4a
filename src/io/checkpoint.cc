// Sharded checkpoints: the index reader and the streamed, atomically committed writer.
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
using detail::io_fail;
using detail::printable;

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

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

// ------------------------------------------------------------------------ writer

std::string shard_file_name(std::string_view stem, std::size_t index, std::size_t total) {
  if (total == 1) return std::string(stem) + ".safetensors";
  char buf[48];
  std::snprintf(buf, sizeof buf, "-%05zu-of-%05zu.safetensors", index + 1, total);
  return std::string(stem) + buf;
}

namespace {

// The journal of a resumable write (WriteOptions::resume_identity): a first line naming the
// identity and plan, then one JSON line {"tensor", "note"} per tensor made durable. A torn or
// unreadable last line (the process died while appending it) ends the journal there.
class ResumeJournal {
 public:
  static constexpr const char* kFile = "edgefuse-resume.journal";

  // Continues the journal in `staging` when it starts with `header`; otherwise clears the
  // folder and starts a new journal there.
  ResumeJournal(const fs::path& staging, const std::string& header) : file_(staging / kFile) {
    std::error_code ec;
    std::uint64_t good = 0;
    bool reuse = false;
    if (fs::is_directory(fs::symlink_status(staging, ec))) {
      try {
        const std::string text =
            detail::read_small_file(file_, std::uint64_t{1} << 30, CheckpointRule::kIo);
        std::size_t pos = text.find('\n');
        reuse =
            pos != std::string::npos && text.compare(0, pos, header) == 0 && pos == header.size();
        if (reuse) good = pos + 1;
        while (reuse && good < text.size()) {
          const std::size_t end = text.find('\n', good);
          if (end == std::string::npos) break;
          const auto line = nlohmann::json::parse(text.begin() + static_cast<std::ptrdiff_t>(good),
                                                  text.begin() + static_cast<std::ptrdiff_t>(end),
                                                  nullptr, false);
          if (!line.is_object() || !line.contains("tensor") || !line["tensor"].is_string() ||
              !line.contains("note") || !line["note"].is_string()) {
            break;
          }
          done_[line["tensor"].get<std::string>()] = line["note"].get<std::string>();
          good = end + 1;
        }
      } catch (const Error&) {
        reuse = false;  // no journal, or an unreadable one: start afresh
      }
    }
    if (reuse) {
      fd_ = detail::Fd(::open(file_.c_str(), O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC));
      if (!fd_ || ::ftruncate(fd_.get(), static_cast<off_t>(good)) != 0) {
        io_fail(CheckpointRule::kIo, file_.string(), "",
                "cannot continue the resume journal: " + detail::errno_text(errno));
      }
      return;
    }
    done_.clear();
    fs::remove_all(staging, ec);
    if (ec) {
      io_fail(CheckpointRule::kIo, staging.string(), "",
              "cannot remove an outdated resumable staging folder: " + ec.message());
    }
    if (::mkdir(staging.c_str(), 0755) != 0) {
      io_fail(CheckpointRule::kIo, staging.string(), "",
              "cannot create the staging folder: " + detail::errno_text(errno));
    }
    fd_ = detail::Fd(::open(file_.c_str(),
                            O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!fd_) {
      io_fail(CheckpointRule::kIo, file_.string(), "",
              "cannot create the resume journal: " + detail::errno_text(errno));
    }
    append(header + "\n");
    detail::fsync_directory(staging);
  }

  const std::map<std::string, std::string>& done() const noexcept { return done_; }

  // Records a tensor whose bytes are already durable.
  void record(const std::string& tensor, const std::string& note) {
    nlohmann::json line = {{"tensor", tensor}, {"note", note}};
    append(line.dump() + "\n");
  }

  // Removes the journal (just before the staging folder is published).
  void remove() {
    fd_.close_checked(file_.string());
    if (::unlink(file_.c_str()) != 0) {
      io_fail(CheckpointRule::kIo, file_.string(), "",
              "cannot remove the resume journal: " + detail::errno_text(errno));
    }
  }

 private:
  void append(const std::string& text) {
    detail::write_all(fd_.get(), text.data(), text.size(), file_.string());
    detail::fsync_checked(fd_.get(), file_.string());
  }

  fs::path file_;
  detail::Fd fd_;
  std::map<std::string, std::string> done_;
};

}  // namespace

struct CheckpointWriter::Impl {
  struct Planned {
    std::string name;
    DType dtype;
    Shape shape;
    std::uint64_t nbytes;
    TensorProducer produce;
  };

  fs::path dest;
  fs::path parent;
  std::string dest_name;
  WriteOptions options;
  detail::Fd lock;
  std::vector<Planned> tensors;
  std::unordered_set<std::string> names;
  // Side files: their contents, or (late files) a function making them after the tensors.
  struct SideFile {
    std::string name, contents;
    std::function<std::string()> make;
  };
  std::vector<SideFile> files;
  bool committed = false;

  std::string staging_prefix() const { return "." + dest_name + ".staging-"; }
  std::string label() const { return dest.string(); }

  [[noreturn]] void misuse(const std::string& tensor, const std::string& detail) const {
    io_fail(CheckpointRule::kInvalidArgument, label(), tensor, detail);
  }

  // The rule of io/output_guard.h: absent, empty, or (when replacing) a checkpoint folder;
  // never one of the command's inputs.
  void check_destination() const {
    check_output_folder(dest, options.inputs, options.replace_existing, options.replace_hint);
  }

  bool resumable() const { return !options.resume_identity.empty(); }
  fs::path resume_staging() const { return parent / (staging_prefix() + "resume"); }

  void remove_stale_staging() const {
    std::error_code ec;
    const std::string prefix = staging_prefix();
    for (const auto& e : fs::directory_iterator(parent, ec)) {
      const std::string name = e.path().filename().string();
      if (resumable() && e.path() == resume_staging()) continue;  // commit() decides
      if (name.compare(0, prefix.size(), prefix) == 0) {
        std::error_code rm;
        fs::remove_all(e.path(), rm);
        if (rm) {
          io_fail(CheckpointRule::kIo, e.path().string(), "",
                  "cannot remove a stale staging folder: " + rm.message());
        }
      }
    }
  }

  // Writes one regular file in the staging folder from a sequence of pieces, then fsyncs it.
  // A resumable staging folder may hold the file from a killed run: it is then truncated.
  template <typename WriteBody>
  void write_file(const fs::path& path, WriteBody&& body) const {
    const int fresh = resumable() ? O_TRUNC : O_EXCL;
    detail::Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | fresh | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!fd) {
      io_fail(CheckpointRule::kIo, path.string(), "",
              "cannot create: " + detail::errno_text(errno));
    }
    body(fd.get());
    detail::fsync_checked(fd.get(), path.string());
    fd.close_checked(path.string());
    if (options.on_phase) options.on_phase("file-written");
  }

  // The reference writer's order within a shard: descending dtype alignment, then name.
  static void sort_members(std::vector<const Planned*>& members) {
    std::sort(members.begin(), members.end(), [](const Planned* a, const Planned* b) {
      if (a->dtype != b->dtype) return a->dtype > b->dtype;
      return a->name < b->name;
    });
  }

  // The shard's header with its 8-byte length prefix.
  std::string shard_header(const fs::path& path, const std::vector<const Planned*>& members) const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!options.metadata.empty()) {
      nlohmann::ordered_json md = nlohmann::ordered_json::object();
      for (const auto& [k, v] : options.metadata) md[k] = v;
      header["__metadata__"] = std::move(md);
    }
    std::uint64_t offset = 0;
    for (const Planned* t : members) {
      nlohmann::ordered_json e = nlohmann::ordered_json::object();
      e["dtype"] = std::string(dtype_name(t->dtype));
      e["shape"] = std::vector<std::uint64_t>(t->shape.begin(), t->shape.end());
      e["data_offsets"] = {offset, offset + t->nbytes};
      header[t->name] = std::move(e);
      offset += t->nbytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // data section on an 8-byte boundary
    if (text.size() > kMaxHeaderBytes) {
      io_fail(CheckpointRule::kHeaderTooLarge, path.string(), "",
              "header would be " + std::to_string(text.size()) + " bytes, above the cap of " +
                  std::to_string(kMaxHeaderBytes));
    }
    std::string out(8, '\0');
    const std::uint64_t n = text.size();
    for (int i = 0; i < 8; ++i)
      out[i] = static_cast<char>(static_cast<unsigned char>(n >> (8 * i)));
    return out + text;
  }

  // Writes one shard (members sorted), the first `kept` members already in the file from an
  // earlier run (resumable writing only). With a journal, each tensor is made durable and
  // journaled as soon as its last byte is written.
  void write_shard(const fs::path& path, const std::vector<const Planned*>& members,
                   std::size_t kept, std::vector<std::byte>& buffer, ResumeJournal* journal) const;

  void copy_file(const fs::path& from, const fs::path& to, std::vector<std::byte>& buffer) const {
    std::uint64_t size = 0;
    detail::Fd in = detail::open_regular_file(from, &size);
    write_file(to, [&](int fd) {
      for (std::uint64_t done = 0; done < size;) {
        const auto len = std::min<std::uint64_t>(buffer.size(), size - done);
        detail::pread_exact(in.get(), buffer.data(), len, done, from.string());
        detail::write_all(fd, buffer.data(), len, to.string());
        done += len;
      }
    });
  }
};

void CheckpointWriter::Impl::write_shard(const fs::path& path,
                                         const std::vector<const Planned*>& members,
                                         std::size_t kept, std::vector<std::byte>& buffer,
                                         ResumeJournal* journal) const {
  const std::string head = shard_header(path, members);
  std::uint64_t start = head.size();
  for (std::size_t i = 0; i < kept; ++i) start += members[i]->nbytes;
  detail::Fd fd;
  if (kept > 0) {  // continue the file a killed run left: cut it after the last kept tensor
    fd = detail::Fd(::open(path.c_str(), O_WRONLY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd || ::ftruncate(fd.get(), static_cast<off_t>(start)) != 0 ||
        ::lseek(fd.get(), static_cast<off_t>(start), SEEK_SET) < 0) {
      io_fail(CheckpointRule::kIo, path.string(), "",
              "cannot continue the shard: " + detail::errno_text(errno));
    }
  } else {
    const int fresh = journal != nullptr ? O_TRUNC : O_EXCL;
    fd =
        detail::Fd(::open(path.c_str(), O_WRONLY | O_CREAT | fresh | O_NOFOLLOW | O_CLOEXEC, 0644));
    if (!fd) {
      io_fail(CheckpointRule::kIo, path.string(), "",
              "cannot create: " + detail::errno_text(errno));
    }
    detail::write_all(fd.get(), head.data(), head.size(), path.string());
  }
  for (std::size_t i = kept; i < members.size(); ++i) {
    const Planned* t = members[i];
    for (std::uint64_t done = 0; done < t->nbytes;) {
      const auto len =
          static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), t->nbytes - done));
      t->produce(done, buffer.data(), len);
      detail::write_all(fd.get(), buffer.data(), len, path.string());
      done += len;
      if (options.on_tensor_bytes) options.on_tensor_bytes(t->name, len);
    }
    if (journal != nullptr) {
      if (::fdatasync(fd.get()) != 0) {
        io_fail(CheckpointRule::kIo, path.string(), t->name,
                "fdatasync failed: " + detail::errno_text(errno));
      }
      journal->record(t->name, options.journal_note ? options.journal_note(t->name) : "");
    }
  }
  detail::fsync_checked(fd.get(), path.string());
  fd.close_checked(path.string());
  if (options.on_phase) options.on_phase("file-written");
}

CheckpointWriter::CheckpointWriter(fs::path destination, WriteOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& w = *impl_;
  w.options = std::move(options);
  w.dest = fs::absolute(destination).lexically_normal();
  if (!w.dest.has_filename()) w.dest = w.dest.parent_path();
  w.parent = w.dest.parent_path();
  w.dest_name = w.dest.filename().string();
  if (w.dest_name.empty() || w.dest_name == "." || w.dest_name == "..") {
    w.misuse("", "the destination must name a folder");
  }
  if (w.options.max_shard_bytes == 0) w.misuse("", "max_shard_bytes must be positive");
  if (w.options.chunk_bytes == 0 || w.options.chunk_bytes > (std::size_t{1} << 30)) {
    w.misuse("", "chunk_bytes must be in [1, 2^30]");
  }
  const std::string& stem = w.options.file_stem;
  if (!detail::name_problem(stem).empty() || stem.find('/') != std::string::npos || stem == "." ||
      stem == "..") {
    w.misuse("", "file_stem '" + printable(stem) + "' is not a plain file name");
  }
  std::size_t md_bytes = 0;
  for (const auto& [k, v] : w.options.metadata) md_bytes += k.size() + v.size();
  if (md_bytes > kMaxMetadataBytes) w.misuse("", "metadata above kMaxMetadataBytes");

  std::error_code ec;
  if (!fs::is_directory(w.parent, ec)) {
    io_fail(CheckpointRule::kIo, w.label(), "",
            "the parent folder '" + printable(w.parent.string()) + "' does not exist");
  }
  w.check_destination();
  const fs::path lock_path = w.parent / ("." + w.dest_name + ".edgefuse-lock");
  w.lock = detail::Fd(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!w.lock) {
    io_fail(CheckpointRule::kIo, lock_path.string(), "",
            "cannot open the lock file: " + detail::errno_text(errno));
  }
  if (::flock(w.lock.get(), LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EWOULDBLOCK) {
      io_fail(CheckpointRule::kWriterBusy, w.label(), "",
              "another writer holds the lock " + printable(lock_path.filename().string()));
    }
    io_fail(CheckpointRule::kIo, lock_path.string(), "",
            "flock failed: " + detail::errno_text(err));
  }
  w.remove_stale_staging();
}

CheckpointWriter::~CheckpointWriter() = default;  // the lock goes with its descriptor

const fs::path& CheckpointWriter::destination() const noexcept { return impl_->dest; }

void CheckpointWriter::add(std::string name, DType dtype, const Shape& shape,
                           TensorProducer produce) {
  Impl& w = *impl_;
  if (w.committed) w.misuse(name, "add() after commit()");
  const std::string problem = detail::name_problem(name);
  if (!problem.empty()) io_fail(CheckpointRule::kInvalidName, w.label(), name, problem);
  if (name == "__metadata__") {
    io_fail(CheckpointRule::kInvalidName, w.label(), name,
            "a tensor cannot be named __metadata__ (safetensors issue #849)");
  }
  if (!produce) w.misuse(name, "no producer given");
  std::uint64_t nbytes = 0;
  try {
    nbytes = dtype_bytes(dtype, shape.numel());
  } catch (const Error& e) {
    w.misuse(name, e.what());
  }
  if (!w.names.insert(name).second) w.misuse(name, "added twice");
  w.tensors.push_back({std::move(name), dtype, shape, nbytes, std::move(produce)});
}

void CheckpointWriter::add(std::string name, ConstTensorView source) {
  const std::byte* base = source.bytes();
  add(std::move(name), source.dtype(), source.shape(),
      [base](std::uint64_t offset, std::byte* dst, std::size_t len) {
        std::memcpy(dst, base + offset, len);
      });
}

void CheckpointWriter::add_file(std::string relative_name, std::string contents) {
  Impl& w = *impl_;
  if (w.committed) w.misuse("", "add_file() after commit()");
  if (!detail::name_problem(relative_name).empty() ||
      relative_name.find('/') != std::string::npos || relative_name == "." ||
      relative_name == ".." || ends_with(relative_name, ".safetensors") ||
      ends_with(relative_name, ".safetensors.index.json")) {
    w.misuse("", "side file name '" + printable(relative_name) +
                     "' must be a plain file name that is not a shard or index");
  }
  for (const auto& f : w.files) {
    if (f.name == relative_name) w.misuse("", "side file '" + relative_name + "' added twice");
  }
  w.files.push_back({std::move(relative_name), std::move(contents), {}});
}

void CheckpointWriter::add_file(std::string relative_name, std::function<std::string()> make) {
  if (!make) impl_->misuse("", "side file '" + printable(relative_name) + "': no maker given");
  add_file(std::move(relative_name), std::string());
  impl_->files.back().make = std::move(make);
}

std::vector<std::string> CheckpointWriter::commit() {
  Impl& w = *impl_;
  if (w.committed) w.misuse("", "commit() called twice");
  w.check_destination();

  // Greedy shards in declaration order (huggingface_hub's split).
  std::vector<std::vector<const Impl::Planned*>> shards;
  std::uint64_t current = 0;
  for (const auto& t : w.tensors) {
    if (shards.empty() || (current > 0 && current + t.nbytes > w.options.max_shard_bytes)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(&t);
    current += t.nbytes;
  }
  if (shards.empty()) shards.emplace_back();  // an empty checkpoint is one empty file
  for (auto& members : shards) Impl::sort_members(members);

  fs::path staging;
  std::unique_ptr<ResumeJournal> journal;
  std::vector<std::size_t> kept(shards.size(), 0);
  if (w.resumable()) {
    // The journal's first line: the caller's identity and the whole plan.
    nlohmann::ordered_json plan = nlohmann::ordered_json::object();
    plan["edgefuse_resume"] = 1;
    plan["identity"] = w.options.resume_identity;
    plan["metadata"] = w.options.metadata;
    plan["shards"] = nlohmann::ordered_json::array();
    for (std::size_t i = 0; i < shards.size(); ++i) {
      nlohmann::ordered_json sh = nlohmann::ordered_json::array();
      for (const auto* t : shards[i]) {
        sh.push_back({t->name, std::string(dtype_name(t->dtype)),
                      std::vector<std::uint64_t>(t->shape.begin(), t->shape.end())});
      }
      plan["shards"].push_back({{"file", shard_file_name(w.options.file_stem, i, shards.size())},
                                {"tensors", std::move(sh)}});
    }
    staging = w.resume_staging();
    journal = std::make_unique<ResumeJournal>(staging, plan.dump());
    // Kept: per shard, the journaled tensors at its start that its file still holds.
    for (std::size_t i = 0; i < shards.size(); ++i) {
      const fs::path file = staging / shard_file_name(w.options.file_stem, i, shards.size());
      std::error_code ec;
      const auto st = fs::symlink_status(file, ec);
      if (!fs::is_regular_file(st)) continue;
      const std::uint64_t size = fs::file_size(file, ec);
      if (ec) continue;
      std::uint64_t end = w.shard_header(file, shards[i]).size();
      for (const auto* t : shards[i]) {
        if (!journal->done().count(t->name) || end + t->nbytes > size) break;
        end += t->nbytes;
        ++kept[i];
      }
    }
    for (std::size_t i = 0; i < shards.size(); ++i) {
      for (std::size_t k = 0; k < kept[i] && w.options.on_resumed; ++k) {
        const auto* t = shards[i][k];
        w.options.on_resumed(t->name, journal->done().at(t->name), t->nbytes);
      }
    }
  } else {
    std::random_device rd;
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, "%d-%08x", static_cast<int>(::getpid()), rd());
    staging = w.parent / (w.staging_prefix() + suffix);
    if (::mkdir(staging.c_str(), 0755) != 0) {
      io_fail(CheckpointRule::kIo, staging.string(), "",
              "cannot create the staging folder: " + detail::errno_text(errno));
    }
  }
  bool published = false;
  try {
    if (w.options.on_phase) w.options.on_phase("staged");
    std::vector<std::byte> buffer(w.options.chunk_bytes);
    std::vector<std::string> written;
    std::uint64_t total = 0;
    nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
    std::map<std::string, std::string> shard_of;
    for (std::size_t i = 0; i < shards.size(); ++i) {
      const std::string file = shard_file_name(w.options.file_stem, i, shards.size());
      w.write_shard(staging / file, shards[i], kept[i], buffer, journal.get());
      written.push_back(file);
      for (const auto* t : shards[i]) {
        shard_of[t->name] = file;
        total += t->nbytes;
      }
    }
    if (shards.size() > 1) {
      for (const auto& [name, file] : shard_of) weight_map[name] = file;
      nlohmann::ordered_json index = nlohmann::ordered_json::object();
      index["metadata"] = {{"total_size", total}};
      index["weight_map"] = std::move(weight_map);
      const std::string name = w.options.file_stem + ".safetensors.index.json";
      const std::string text = index.dump(2) + "\n";
      w.write_file(staging / name, [&](int fd) {
        detail::write_all(fd, text.data(), text.size(), (staging / name).string());
      });
      written.push_back(name);
    }
    std::set<std::string> taken(written.begin(), written.end());
    for (const auto& file : w.files) {
      const std::string& name = file.name;
      const std::string contents = file.make ? file.make() : file.contents;
      w.write_file(staging / name, [&](int fd) {
        detail::write_all(fd, contents.data(), contents.size(), (staging / name).string());
      });
      written.push_back(name);
      taken.insert(name);
    }
    std::error_code ec;
    const bool dest_exists = fs::exists(fs::symlink_status(w.dest, ec));
    if (dest_exists && w.options.keep_other_files) {
      for (const auto& e : fs::directory_iterator(w.dest, ec)) {
        const std::string name = e.path().filename().string();
        std::error_code sec;
        if (!fs::is_regular_file(fs::symlink_status(e.path(), sec)) || taken.count(name) ||
            ends_with(name, ".safetensors") || ends_with(name, ".safetensors.index.json")) {
          continue;
        }
        w.copy_file(e.path(), staging / name, buffer);
        written.push_back(name);
      }
      if (ec) {
        io_fail(CheckpointRule::kIo, w.label(), "", "cannot list the destination: " + ec.message());
      }
    }
    if (journal) journal->remove();  // a staging folder without a journal is never resumed
    detail::fsync_directory(staging);
    if (w.options.on_phase) w.options.on_phase("synced");

      // Publish: one rename. Over an existing folder it is an atomic exchange, after which the
      // staging name holds the old checkpoint until it is removed below (or by the next writer).
#if defined(__linux__)
    const unsigned flags = dest_exists ? RENAME_EXCHANGE : RENAME_NOREPLACE;
    const int renamed = ::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, w.dest.c_str(), flags);
#else
    // No atomic exchange of folders (Linux's renameat2): refuse rather than publish in two steps.
    errno = ENOSYS;
    const int renamed = -1;
#endif
    if (renamed != 0) {
      const int err = errno;
      io_fail(CheckpointRule::kIo, w.label(), "",
              std::string(dest_exists ? "atomic exchange with the existing folder"
                                      : "rename into place") +
                  " failed: " + detail::errno_text(err) +
                  (err == EINVAL || err == ENOSYS
                       ? "; this filesystem or system cannot exchange folders atomically "
                         "(checkpoint folders are published with Linux's renameat2)"
                       : ""));
    }
    published = true;
    detail::fsync_directory(w.parent);
    if (w.options.on_phase) w.options.on_phase("published");
    w.committed = true;
    std::error_code rm;
    fs::remove_all(staging, rm);  // the old checkpoint, or nothing; a leftover is stale
    if (w.options.on_phase) w.options.on_phase("cleaned");
    return written;
  } catch (const CheckpointError& e) {
    // A resumable write that failed on I/O (a full disk, a file-size limit) keeps what its
    // journal holds: the same write started again, once there is room, resumes from it.
    if (!published && !(w.resumable() && e.rule() == CheckpointRule::kIo)) {
      std::error_code rm;
      fs::remove_all(staging, rm);
    }
    throw;
  } catch (...) {
    if (!published) {
      std::error_code rm;
      fs::remove_all(staging, rm);
    }
    throw;
  }
}

}  // namespace edgefuse
