// The streamed, atomically committed checkpoint writer (io/checkpoint.h).
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "edgefuse/io/checkpoint.h"
#include "src/io/io_util.h"

namespace edgefuse {

namespace fs = std::filesystem;
using detail::ends_with;
using detail::io_fail;
using detail::printable;

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
  static constexpr std::size_t kNone = ~std::size_t{0};

  struct Planned {
    std::string name;
    DType dtype;
    Shape shape;
    std::uint64_t nbytes;
    TensorProducer produce;  // empty for a linked tensor
    std::size_t group;       // index into groups
    std::size_t lead;        // a linked tensor's lead (index into tensors), else kNone
  };
  // Files of their own: [0] is the default files (options.file_stem, options.metadata).
  struct Group {
    std::string stem;
    std::map<std::string, std::string> metadata;
  };
  // One file of the plan: its members in file order and where its data starts.
  struct Shard {
    std::size_t group;
    std::string file;
    std::vector<std::size_t> members;
    std::string header;  // with its 8-byte length prefix
    detail::Fd fd;
  };

  fs::path dest;
  fs::path parent;
  std::string dest_name;
  WriteOptions options;
  detail::Fd lock;
  std::vector<Group> groups;
  std::vector<Planned> tensors;
  std::unordered_map<std::string, std::size_t> index_of;
  // Side files: their contents, or (late files) a function making them after the tensors.
  struct SideFile {
    std::string name, contents;
    std::function<std::string()> make;
  };
  std::vector<SideFile> files;
  bool committed = false;

  // The plan, made by commit(): the shards, and each tensor's shard and data offset.
  std::vector<Shard> shards;
  std::vector<std::size_t> shard_of;
  std::vector<std::uint64_t> offset_of;  // from the start of the shard file
  fs::path staging;
  // While a lead is produced: its index, and how far each tensor linked to it is written.
  std::mutex linked_mutex;
  std::size_t producing = kNone;
  std::vector<std::uint64_t> linked_end;

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

  void check_stem(const std::string& stem) const {
    if (!detail::name_problem(stem).empty() || stem.find('/') != std::string::npos || stem == "." ||
        stem == "..") {
      misuse("", "file_stem '" + printable(stem) + "' is not a plain file name");
    }
  }

  void check_metadata(const std::map<std::string, std::string>& metadata) const {
    std::size_t md_bytes = 0;
    for (const auto& [k, v] : metadata) md_bytes += k.size() + v.size();
    if (md_bytes > kMaxMetadataBytes) misuse("", "metadata above kMaxMetadataBytes");
  }

  std::size_t group_of(const std::string& stem, const std::string& tensor) const {
    if (stem.empty()) return 0;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      if (groups[g].stem == stem) return g;
    }
    misuse(tensor, "file group '" + printable(stem) + "' was not added (add_group)");
  }

  void declare(std::string name, DType dtype, const Shape& shape, TensorProducer produce,
               std::size_t group, std::size_t lead) {
    if (committed) misuse(name, "add() after commit()");
    const std::string problem = detail::name_problem(name);
    if (!problem.empty()) io_fail(CheckpointRule::kInvalidName, label(), name, problem);
    if (name == "__metadata__") {
      io_fail(CheckpointRule::kInvalidName, label(), name,
              "a tensor cannot be named __metadata__ (safetensors issue #849)");
    }
    std::uint64_t nbytes = 0;
    try {
      nbytes = dtype_bytes(dtype, shape.numel());
    } catch (const Error& e) {
      misuse(name, e.what());
    }
    if (!index_of.emplace(name, tensors.size()).second) misuse(name, "added twice");
    tensors.push_back({std::move(name), dtype, shape, nbytes, std::move(produce), group, lead});
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
  void sort_members(std::vector<std::size_t>& members) const {
    std::sort(members.begin(), members.end(), [this](std::size_t ia, std::size_t ib) {
      const Planned& a = tensors[ia];
      const Planned& b = tensors[ib];
      if (a.dtype != b.dtype) return a.dtype > b.dtype;
      return a.name < b.name;
    });
  }

  // The shard's header with its 8-byte length prefix; sets offset_of for its members.
  std::string shard_header(const Shard& shard) {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    const auto& metadata = groups[shard.group].metadata;
    if (!metadata.empty()) {
      nlohmann::ordered_json md = nlohmann::ordered_json::object();
      for (const auto& [k, v] : metadata) md[k] = v;
      header["__metadata__"] = std::move(md);
    }
    std::uint64_t offset = 0;
    for (const std::size_t i : shard.members) {
      const Planned& t = tensors[i];
      nlohmann::ordered_json e = nlohmann::ordered_json::object();
      e["dtype"] = std::string(dtype_name(t.dtype));
      e["shape"] = std::vector<std::uint64_t>(t.shape.begin(), t.shape.end());
      e["data_offsets"] = {offset, offset + t.nbytes};
      header[t.name] = std::move(e);
      offset += t.nbytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // data section on an 8-byte boundary
    if (text.size() > kMaxHeaderBytes) {
      io_fail(CheckpointRule::kHeaderTooLarge, (staging / shard.file).string(), "",
              "header would be " + std::to_string(text.size()) + " bytes, above the cap of " +
                  std::to_string(kMaxHeaderBytes));
    }
    std::string out(8, '\0');
    const std::uint64_t n = text.size();
    for (int i = 0; i < 8; ++i)
      out[i] = static_cast<char>(static_cast<unsigned char>(n >> (8 * i)));
    offset = out.size() + text.size();
    for (const std::size_t i : shard.members) {
      offset_of[i] = offset;
      offset += tensors[i].nbytes;
    }
    return out + text;
  }

  // Greedy shards per group in declaration order (huggingface_hub's split), members sorted.
  void plan_shards() {
    shards.clear();
    shard_of.assign(tensors.size(), 0);
    offset_of.assign(tensors.size(), 0);
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const std::size_t first = shards.size();
      std::uint64_t current = 0;
      for (std::size_t i = 0; i < tensors.size(); ++i) {
        if (tensors[i].group != g) continue;
        if (shards.size() == first ||
            (current > 0 && current + tensors[i].nbytes > options.max_shard_bytes)) {
          shards.push_back({g, "", {}, "", {}});
          current = 0;
        }
        shards.back().members.push_back(i);
        current += tensors[i].nbytes;
      }
      if (g == 0 && shards.size() == first) {
        shards.push_back({0, "", {}, "", {}});  // an empty checkpoint is one empty file
      }
      const std::size_t count = shards.size() - first;
      for (std::size_t s = first; s < shards.size(); ++s) {
        shards[s].file = shard_file_name(groups[g].stem, s - first, count);
        sort_members(shards[s].members);
        for (const std::size_t i : shards[s].members) shard_of[i] = s;
      }
    }
    std::set<std::string> names;
    for (const auto& s : shards) {
      if (!names.insert(s.file).second) {
        misuse("", "two file groups both write '" + printable(s.file) + "'");
      }
    }
  }

  // Produces tensor `lead` (and its linked tensors through write_linked) into the shards.
  void produce(std::size_t lead, const std::vector<std::size_t>& linked,
               std::vector<std::byte>& buffer) {
    const Planned& t = tensors[lead];
    const Shard& shard = shards[shard_of[lead]];
    const std::string path = (staging / shard.file).string();
    {
      std::lock_guard<std::mutex> hold(linked_mutex);
      producing = lead;
      for (const std::size_t j : linked) linked_end[j] = 0;
    }
    for (std::uint64_t done = 0; done < t.nbytes;) {
      const auto len =
          static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), t.nbytes - done));
      t.produce(done, buffer.data(), len);
      detail::pwrite_all(shard.fd.get(), buffer.data(), len, offset_of[lead] + done, path);
      done += len;
      if (options.on_tensor_bytes) options.on_tensor_bytes(t.name, len);
    }
    std::lock_guard<std::mutex> hold(linked_mutex);
    producing = kNone;
    for (const std::size_t j : linked) {
      if (linked_end[j] != tensors[j].nbytes) {
        misuse(tensors[j].name, "the producer of '" + t.name + "' wrote " +
                                    std::to_string(linked_end[j]) + " of its " +
                                    std::to_string(tensors[j].nbytes) + " bytes");
      }
    }
  }

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

  std::vector<std::string> commit();
};

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
  w.check_stem(w.options.file_stem);
  w.check_metadata(w.options.metadata);
  w.groups.push_back({w.options.file_stem, w.options.metadata});

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
  add(std::move(name), dtype, shape, std::move(produce), std::string());
}

void CheckpointWriter::add(std::string name, DType dtype, const Shape& shape,
                           TensorProducer produce, const std::string& file_stem) {
  Impl& w = *impl_;
  if (!produce) w.misuse(name, "no producer given");
  const std::size_t group = w.group_of(file_stem, name);
  w.declare(std::move(name), dtype, shape, std::move(produce), group, Impl::kNone);
}

void CheckpointWriter::add(std::string name, ConstTensorView source) {
  const std::byte* base = source.bytes();
  add(std::move(name), source.dtype(), source.shape(),
      [base](std::uint64_t offset, std::byte* dst, std::size_t len) {
        std::memcpy(dst, base + offset, len);
      });
}

void CheckpointWriter::add_group(std::string file_stem,
                                 std::map<std::string, std::string> metadata) {
  Impl& w = *impl_;
  if (w.committed) w.misuse("", "add_group() after commit()");
  w.check_stem(file_stem);
  w.check_metadata(metadata);
  for (const auto& g : w.groups) {
    if (g.stem == file_stem) {
      w.misuse("", "file group '" + printable(file_stem) + "' added twice or is the file_stem");
    }
  }
  w.groups.push_back({std::move(file_stem), std::move(metadata)});
}

void CheckpointWriter::add_linked(std::string name, DType dtype, const Shape& shape,
                                  const std::string& lead, const std::string& file_stem) {
  Impl& w = *impl_;
  const auto it = w.index_of.find(lead);
  if (it == w.index_of.end() || w.tensors[it->second].lead != Impl::kNone) {
    w.misuse(name, "its lead '" + printable(lead) + "' is not a tensor added before");
  }
  const std::size_t group = w.group_of(file_stem, name);
  w.declare(std::move(name), dtype, shape, {}, group, it->second);
}

void CheckpointWriter::write_linked(std::string_view name, std::uint64_t offset,
                                    const std::byte* src, std::size_t len) {
  Impl& w = *impl_;
  const auto it = w.index_of.find(std::string(name));
  std::lock_guard<std::mutex> hold(w.linked_mutex);
  if (it == w.index_of.end() || w.producing == Impl::kNone ||
      w.tensors[it->second].lead != w.producing) {
    w.misuse(std::string(name), "write_linked() outside the producer of its lead");
  }
  const std::size_t i = it->second;
  const Impl::Planned& t = w.tensors[i];
  if (offset > t.nbytes || len > t.nbytes - offset) {
    w.misuse(t.name, "write_linked() of bytes [" + std::to_string(offset) + ", " +
                         std::to_string(offset + len) + ") of a tensor of " +
                         std::to_string(t.nbytes) + " bytes");
  }
  if (offset > w.linked_end[i]) {
    w.misuse(t.name, "write_linked() at byte " + std::to_string(offset) +
                         " leaves a gap after byte " + std::to_string(w.linked_end[i]));
  }
  const Impl::Shard& shard = w.shards[w.shard_of[i]];
  detail::pwrite_all(shard.fd.get(), src, len, w.offset_of[i] + offset,
                     (w.staging / shard.file).string());
  w.linked_end[i] = std::max(w.linked_end[i], offset + len);
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

std::vector<std::string> CheckpointWriter::commit() { return impl_->commit(); }

std::vector<std::string> CheckpointWriter::Impl::commit() {
  if (committed) misuse("", "commit() called twice");
  check_destination();
  plan_shards();

  std::unique_ptr<ResumeJournal> journal;
  std::vector<bool> kept(tensors.size(), false);
  if (resumable()) {
    staging = resume_staging();
    // The journal's first line: the caller's identity and the whole plan.
    nlohmann::ordered_json plan = nlohmann::ordered_json::object();
    plan["edgefuse_resume"] = 2;
    plan["identity"] = options.resume_identity;
    plan["groups"] = nlohmann::ordered_json::array();
    for (const auto& g : groups) plan["groups"].push_back({g.stem, g.metadata});
    plan["shards"] = nlohmann::ordered_json::array();
    for (auto& shard : shards) {
      shard.header = shard_header(shard);
      nlohmann::ordered_json sh = nlohmann::ordered_json::array();
      for (const std::size_t i : shard.members) {
        const Planned& t = tensors[i];
        sh.push_back({t.name, std::string(dtype_name(t.dtype)),
                      std::vector<std::uint64_t>(t.shape.begin(), t.shape.end()),
                      t.lead == kNone ? std::string() : tensors[t.lead].name});
      }
      plan["shards"].push_back({{"file", shard.file}, {"tensors", std::move(sh)}});
    }
    journal = std::make_unique<ResumeJournal>(staging, plan.dump());
    // Kept: the journaled tensors their file holds, a lead only with all its linked tensors.
    std::vector<std::uint64_t> sizes(shards.size(), 0);
    for (std::size_t s = 0; s < shards.size(); ++s) {
      std::error_code ec;
      const fs::path file = staging / shards[s].file;
      if (!fs::is_regular_file(fs::symlink_status(file, ec))) continue;
      const std::uint64_t size = fs::file_size(file, ec);
      if (!ec) sizes[s] = size;
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      kept[i] = journal->done().count(tensors[i].name) &&
                offset_of[i] + tensors[i].nbytes <= sizes[shard_of[i]];
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].lead != kNone && !kept[i]) kept[tensors[i].lead] = false;
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].lead != kNone) kept[i] = kept[tensors[i].lead];
    }
    for (std::size_t i = 0; i < tensors.size() && options.on_resumed; ++i) {
      if (kept[i])
        options.on_resumed(tensors[i].name, journal->done().at(tensors[i].name), tensors[i].nbytes);
    }
  } else {
    std::random_device rd;
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, "%d-%08x", static_cast<int>(::getpid()), rd());
    staging = parent / (staging_prefix() + suffix);
    if (::mkdir(staging.c_str(), 0755) != 0) {
      io_fail(CheckpointRule::kIo, staging.string(), "",
              "cannot create the staging folder: " + detail::errno_text(errno));
    }
    for (auto& shard : shards) shard.header = shard_header(shard);
  }
  bool published = false;
  try {
    if (options.on_phase) options.on_phase("staged");
    // Every shard file created and its header written (a resumed file keeps its data).
    for (auto& shard : shards) {
      const fs::path path = staging / shard.file;
      const int fresh = resumable() ? 0 : O_EXCL;
      shard.fd = detail::Fd(
          ::open(path.c_str(), O_WRONLY | O_CREAT | fresh | O_NOFOLLOW | O_CLOEXEC, 0644));
      if (!shard.fd) {
        io_fail(CheckpointRule::kIo, path.string(), "",
                "cannot create: " + detail::errno_text(errno));
      }
      detail::pwrite_all(shard.fd.get(), shard.header.data(), shard.header.size(), 0,
                         path.string());
    }
    std::vector<std::vector<std::size_t>> linked(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].lead != kNone) linked[tensors[i].lead].push_back(i);
    }
    linked_end.assign(tensors.size(), 0);
    std::vector<std::byte> buffer(options.chunk_bytes);
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].lead != kNone || kept[i]) continue;
      produce(i, linked[i], buffer);
      if (journal != nullptr) {
        std::set<std::size_t> touched{shard_of[i]};
        for (const std::size_t j : linked[i]) touched.insert(shard_of[j]);
        for (const std::size_t s : touched) {
          if (::fdatasync(shards[s].fd.get()) != 0) {
            io_fail(CheckpointRule::kIo, (staging / shards[s].file).string(), tensors[i].name,
                    "fdatasync failed: " + detail::errno_text(errno));
          }
        }
        journal->record(tensors[i].name,
                        options.journal_note ? options.journal_note(tensors[i].name) : "");
        for (const std::size_t j : linked[i]) {
          journal->record(tensors[j].name,
                          options.journal_note ? options.journal_note(tensors[j].name) : "");
        }
      }
    }
    std::vector<std::string> written;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      std::uint64_t total = 0;
      std::map<std::string, std::string> file_of;
      std::size_t count = 0;
      for (auto& shard : shards) {
        if (shard.group != g) continue;
        const fs::path path = staging / shard.file;
        detail::fsync_checked(shard.fd.get(), path.string());
        shard.fd.close_checked(path.string());
        if (options.on_phase) options.on_phase("file-written");
        written.push_back(shard.file);
        ++count;
        for (const std::size_t i : shard.members) {
          file_of[tensors[i].name] = shard.file;
          total += tensors[i].nbytes;
        }
      }
      if (count > 1) {
        nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
        for (const auto& [name, file] : file_of) weight_map[name] = file;
        nlohmann::ordered_json index = nlohmann::ordered_json::object();
        index["metadata"] = {{"total_size", total}};
        index["weight_map"] = std::move(weight_map);
        const std::string name = groups[g].stem + ".safetensors.index.json";
        const std::string text = index.dump(2) + "\n";
        write_file(staging / name, [&](int fd) {
          detail::write_all(fd, text.data(), text.size(), (staging / name).string());
        });
        written.push_back(name);
      }
    }
    std::set<std::string> taken(written.begin(), written.end());
    for (const auto& file : files) {
      const std::string& name = file.name;
      const std::string contents = file.make ? file.make() : file.contents;
      write_file(staging / name, [&](int fd) {
        detail::write_all(fd, contents.data(), contents.size(), (staging / name).string());
      });
      written.push_back(name);
      taken.insert(name);
    }
    std::error_code ec;
    const bool dest_exists = fs::exists(fs::symlink_status(dest, ec));
    if (dest_exists && options.keep_other_files) {
      for (const auto& e : fs::directory_iterator(dest, ec)) {
        const std::string name = e.path().filename().string();
        std::error_code sec;
        if (!fs::is_regular_file(fs::symlink_status(e.path(), sec)) || taken.count(name) ||
            ends_with(name, ".safetensors") || ends_with(name, ".safetensors.index.json")) {
          continue;
        }
        copy_file(e.path(), staging / name, buffer);
        written.push_back(name);
      }
      if (ec) {
        io_fail(CheckpointRule::kIo, label(), "", "cannot list the destination: " + ec.message());
      }
    }
    if (journal) journal->remove();  // a staging folder without a journal is never resumed
    detail::fsync_directory(staging);
    if (options.on_phase) options.on_phase("synced");

      // Publish: one rename. Over an existing folder it is an atomic exchange, after which the
      // staging name holds the old checkpoint until it is removed below (or by the next writer).
#if defined(__linux__)
    const unsigned flags = dest_exists ? RENAME_EXCHANGE : RENAME_NOREPLACE;
    const int renamed = ::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dest.c_str(), flags);
#else
    // No atomic exchange of folders (Linux's renameat2): refuse rather than publish in two steps.
    errno = ENOSYS;
    const int renamed = -1;
#endif
    if (renamed != 0) {
      const int err = errno;
      io_fail(CheckpointRule::kIo, label(), "",
              std::string(dest_exists ? "atomic exchange with the existing folder"
                                      : "rename into place") +
                  " failed: " + detail::errno_text(err) +
                  (err == EINVAL || err == ENOSYS
                       ? "; this filesystem or system cannot exchange folders atomically "
                         "(checkpoint folders are published with Linux's renameat2)"
                       : ""));
    }
    published = true;
    detail::fsync_directory(parent);
    if (options.on_phase) options.on_phase("published");
    committed = true;
    std::error_code rm;
    fs::remove_all(staging, rm);  // the old checkpoint, or nothing; a leftover is stale
    if (options.on_phase) options.on_phase("cleaned");
    return written;
  } catch (const CheckpointError& e) {
    for (auto& shard : shards) shard.fd = detail::Fd();
    // A resumable write that failed on I/O (a full disk, a file-size limit) keeps what its
    // journal holds: the same write started again, once there is room, resumes from it.
    if (!published && !(resumable() && e.rule() == CheckpointRule::kIo)) {
      std::error_code rm;
      fs::remove_all(staging, rm);
    }
    throw;
  } catch (...) {
    for (auto& shard : shards) shard.fd = detail::Fd();
    if (!published) {
      std::error_code rm;
      fs::remove_all(staging, rm);
    }
    throw;
  }
}

}  // namespace edgefuse
