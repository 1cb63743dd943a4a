// edgefuse/io/checkpoint.h — Hugging Face checkpoints: one safetensors file or several shards
// with `model.safetensors.index.json`; read lazily, written streamed and committed atomically.
//
// Reading follows the index's `weight_map` only (as transformers and mergekit do) and
// validates every shard on its own (safetensors.h) and the set as a whole: a missing shard, a
// tensor listed but absent, a tensor in two shards, a tensor no index entry names and a shard
// path that leaves the folder are errors.
//
// Writing is huggingface_hub's layout (greedy shards of at most `max_shard_bytes`, 5 GB by
// default, a larger tensor alone in its shard; `model-00001-of-0000N.safetensors`; the index
// with `metadata.total_size`) behind a commit protocol: everything
// goes to a staging folder beside the destination, every file and the folder are fsynced,
// then one rename (an atomic exchange when the destination exists) publishes it and the parent
// folder is fsynced. A crash at any instant leaves the destination either entirely old or
// entirely new; the staging folder it leaves is removed by the next writer. Tensor bytes are
// produced in pieces by callbacks, so the model is never in memory.
//
// Tensors are produced in the order they were added, each written at its place in its shard
// (offsets fixed by the plan, so the files' layout does not depend on that order). A file group
// (add_group) puts some tensors in files of their own, with their own index and metadata, in
// the same commit: an optimizer's state beside the model it belongs to, published together. A
// linked tensor (add_linked) is written by the producer of another tensor while it runs.
//
// Resumable writing (WriteOptions::resume_identity): the staging folder then has a fixed name
// and holds a journal. Each finished tensor (with the tensors linked to it) is fdatasync'ed,
// then one journal line names each. A writer killed at any instant (SIGKILL, power loss) and
// started again with the same identity and the same tensors keeps the journaled tensors and
// produces only the rest; the published bytes equal an uninterrupted run's.
//
//   edgefuse::CheckpointWriter w("out/fused");
//   w.add("lm_head.weight", source_view);   // or a callback producing the bytes in pieces
//   w.commit();
//   auto ckpt = edgefuse::Checkpoint::open("out/fused");
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "edgefuse/io/output_guard.h"
#include "edgefuse/io/safetensors.h"

namespace edgefuse {

// A checkpoint opened for reading: one file, or the shards of an index.
class Checkpoint {
 public:
  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };

  // `path` is a .safetensors file, an index JSON file, or a folder. A folder is resolved in
  // this order: model.safetensors.index.json, model.safetensors, adapter_model.safetensors,
  // then the only *.safetensors.index.json, then the only *.safetensors; none or several
  // candidates is an error (NoCheckpoint). Opening reads the headers of all shards, no data.
  static Checkpoint open(const std::filesystem::path& path);

  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  // The file opened: the index when there is one, else the single safetensors file.
  const std::filesystem::path& path() const noexcept;
  bool is_sharded() const noexcept;
  // Shards in the order of their names.
  const std::vector<SafetensorsFile>& shards() const noexcept;
  // Every tensor, shard by shard in data order (the order that reads each file sequentially).
  const std::vector<Entry>& tensors() const noexcept;
  std::size_t size() const noexcept { return tensors().size(); }
  // The index's metadata (values as JSON text, e.g. total_size -> "1234"); empty without one.
  const std::map<std::string, std::string>& index_metadata() const noexcept;
  // Sum of the tensors' data bytes (what metadata.total_size should say).
  std::uint64_t total_bytes() const noexcept;

  const Entry* find(std::string_view name) const noexcept;
  // Throws CheckpointError (TensorNotFound).
  const Entry& at(std::string_view name) const;
  ConstTensorView view(std::string_view name) const;

 private:
  struct Impl;
  explicit Checkpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Produces bytes [offset, offset + len) of one tensor into dst (len <= WriteOptions::chunk_bytes).
// Called in increasing offset order, once per piece; may throw to abort the commit.
using TensorProducer = std::function<void(std::uint64_t offset, std::byte* dst, std::size_t len)>;

struct WriteOptions {
  // Data bytes per shard; a tensor larger than this gets a shard of its own.
  std::uint64_t max_shard_bytes = 5'000'000'000;
  // File names: <stem>.safetensors for one shard, <stem>-00001-of-0000N.safetensors and
  // <stem>.safetensors.index.json for several. "adapter_model" for PEFT folders.
  std::string file_stem = "model";
  // __metadata__ of every shard (transformers writes {"format": "pt"}).
  std::map<std::string, std::string> metadata{{"format", "pt"}};
  // Replace an existing destination folder (atomically). Without it an existing, non-empty
  // destination is an error, so a typo cannot replace an unrelated folder. Even with it, only
  // a checkpoint folder (regular files, one of them *.safetensors) is replaced.
  bool replace_existing = false;
  // How the user asks to replace, in the message for a non-empty destination (the CLI and
  // the job file name their own flag or key).
  std::string replace_hint = "set replace_existing";
  // The files and folders the writing command reads: the destination may not be, contain or
  // lie inside any of them (io/output_guard.h). Checked when the writer is made and again in
  // commit().
  InputSet inputs;
  // When replacing, copy the destination's other top-level files (config.json, tokenizer
  // files ...) that this writer does not write itself into the new checkpoint.
  bool keep_other_files = true;
  // Size of the pieces a TensorProducer fills (one reused buffer of this size).
  std::size_t chunk_bytes = std::size_t{8} << 20;
  // Called at each step of commit() with its name: "staged" (staging folder created),
  // "file-written" (after each file is written and fsynced), "synced" (staging folder
  // fsynced), "published" (renamed into place, parent fsynced), "cleaned" (old copy removed).
  // For progress reports and fault-injection tests.
  std::function<void(std::string_view phase)> on_phase;
  // Called after each piece of tensor data is written, with the tensor's name and the piece's
  // size in bytes (for progress bars).
  std::function<void(std::string_view tensor, std::uint64_t bytes)> on_tensor_bytes;

  // Resumable writing. Non-empty: the staging folder is `.<dest>.staging-resume` and keeps a
  // journal whose first line holds this identity and the tensor plan (names, dtypes, shapes,
  // shard files, metadata). The caller makes the identity describe everything the bytes
  // depend on (for the fusion engine: the job and the size and mtime of each input file); a
  // journal with another identity or plan is discarded and the write starts afresh. Tensors
  // the journal lists are not produced again.
  std::string resume_identity;
  // With resume_identity: called after each tensor is durable; the returned text is stored in
  // its journal line (e.g. a coverage record) and handed back by on_resumed.
  std::function<std::string(std::string_view tensor)> journal_note;
  // With resume_identity: called once per tensor kept from an earlier run (in commit(), before
  // anything is written), with its note and its size in bytes.
  std::function<void(std::string_view tensor, std::string_view note, std::uint64_t bytes)>
      on_resumed;
};

// Writes one checkpoint folder. The constructor takes the destination's lock (a second writer
// on the same destination fails fast with WriterBusy) and removes staging folders left by
// crashed writers (except, with resume_identity, the resumable one); add() only records what
// to write; commit() writes and publishes. If commit() throws or is never called, the
// destination is untouched and the staging folder is removed; a resumable one is kept when
// the process dies without unwinding (SIGKILL, power loss) and when commit() fails on an
// I/O error (a full disk, a file-size limit), so the same write started again resumes.
class CheckpointWriter {
 public:
  explicit CheckpointWriter(std::filesystem::path destination, WriteOptions options = {});
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  ~CheckpointWriter();

  // Declares a tensor whose bytes `produce` writes at commit time. Throws CheckpointError
  // (InvalidName, InvalidArgument) for a bad or duplicate name or a size that overflows.
  void add(std::string name, DType dtype, const Shape& shape, TensorProducer produce);
  // Declares a tensor copied from `source` (which must stay valid until commit()).
  void add(std::string name, ConstTensorView source);
  // A group of tensors with files of their own: <stem>.safetensors, or
  // <stem>-0000i-of-0000N.safetensors and <stem>.safetensors.index.json, sharded on their own
  // by max_shard_bytes, with `metadata` as their __metadata__. Throws CheckpointError
  // (InvalidArgument) for a stem that is not a plain file name, is WriteOptions::file_stem or
  // was added before.
  void add_group(std::string file_stem, std::map<std::string, std::string> metadata);
  // Declares a tensor in the files of group `file_stem` (add_group first; "" is the default
  // files, as add()).
  void add(std::string name, DType dtype, const Shape& shape, TensorProducer produce,
           const std::string& file_stem);
  // Declares a tensor whose bytes the producer of tensor `lead` (added before, not linked
  // itself) writes through write_linked() while it runs, in the files of group `file_stem`
  // ("": the default files). Throws CheckpointError (InvalidName, InvalidArgument).
  void add_linked(std::string name, DType dtype, const Shape& shape, const std::string& lead,
                  const std::string& file_stem = "");
  // From the producer of linked tensor `name`'s lead, during commit(): its bytes [offset,
  // offset + len). Writes come in increasing offset order, each starting at or before the end
  // of what was written (an overlap writes those bytes again), and cover the whole tensor by
  // the time the lead's last piece is produced. Thread-safe. Throws CheckpointError
  // (InvalidArgument) for a tensor that is not linked to the lead being produced, a range past
  // its end or a gap, and (kIo) for a failed write.
  void write_linked(std::string_view name, std::uint64_t offset, const std::byte* src,
                    std::size_t len);
  // A small side file (adapter_config.json, config.json ...) written beside the shards.
  void add_file(std::string relative_name, std::string contents);
  // The same, its contents made by `make` in commit() once every tensor is written (a report
  // of the write). A throw from `make` aborts the commit; the destination is then untouched.
  void add_file(std::string relative_name, std::function<std::string()> make);

  // Writes, fsyncs and publishes. Returns the paths of the files written, relative to the
  // destination. Throws CheckpointError; the destination is then unchanged.
  std::vector<std::string> commit();

  const std::filesystem::path& destination() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The shard file name huggingface_hub uses: shard_file_name("model", 0, 3) ==
// "model-00001-of-00003.safetensors"; with total == 1, "model.safetensors".
std::string shard_file_name(std::string_view stem, std::size_t index, std::size_t total);

}  // namespace edgefuse
