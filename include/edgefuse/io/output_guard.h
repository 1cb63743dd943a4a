// edgefuse/io/output_guard.h — what a command may write over: the one rule every writer of
// edgefuse applies before it creates anything.
//
// An output (a checkpoint folder, a file, a report) may be written where nothing is, or, when
// the caller asked to replace, over something this program could have written: a folder whose
// entries are all regular files and that holds a `*.safetensors` file (a checkpoint with its
// config and tokenizer files), or a regular file of the kind the command writes. And never
// where the output is, contains or lies inside one of the command's inputs (target, updates,
// plans, adapters, job file, schema, model config). Inputs are compared by device and inode,
// not by spelling, so `.`, `..`, `./target/`, a symbolic link and a hard link to an input are
// all the input.
//
//   edgefuse::InputSet inputs;
//   inputs.add(job_file, "the job file");
//   inputs.add_checkpoint(target_ckpt, "the target");
//   edgefuse::WriteOptions wo;
//   wo.inputs = inputs;                       // CheckpointWriter applies the rule
//   edgefuse::check_output_file(report, inputs, "the report", ...);  // a file output
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace edgefuse {

class Checkpoint;

// A file or folder by device and inode (lstat after resolving every link but the last when
// `follow_last` is false).
struct FileId {
  dev_t dev = 0;
  ino_t ino = 0;
  bool operator==(const FileId& o) const noexcept { return dev == o.dev && ino == o.ino; }
  bool operator!=(const FileId& o) const noexcept { return !(*this == o); }
};
// The id of what `path` names (following links), or nothing when it does not exist.
std::optional<FileId> file_id(const std::filesystem::path& path);

// The files and folders one command reads.
class InputSet {
 public:
  // `role` names the input in messages ("the target", "the update of client 'a'"). A path
  // that does not exist is ignored (reading it fails later with its own message).
  void add(const std::filesystem::path& path, std::string role);
  // The checkpoint's index or file and every shard it reads.
  void add_checkpoint(const Checkpoint& checkpoint, const std::string& role);

  struct Input {
    std::filesystem::path path;
    std::string role;
    FileId id;
    bool is_folder = false;
    std::vector<FileId> ancestors;  // the folders above it, from its real path up to /
  };
  const std::vector<Input>& inputs() const noexcept { return inputs_; }

  // Why `output` may not be written because of an input ("is the target", "contains the
  // update of client 'a' (a.update)", "lies inside the target (target)"), or "" when none
  // is in the way. `output` need not exist.
  std::string conflict(const std::filesystem::path& output) const;

 private:
  std::vector<Input> inputs_;
};

// Throws CheckpointError (InvalidArgument) naming `output` when `inputs` forbid it (see
// InputSet::conflict); `what` names the output in the message ("the output", "the report").
void check_not_input(const std::filesystem::path& output, const InputSet& inputs,
                     const std::string& what);

// The rule for a folder output (CheckpointWriter calls it): absent, or empty, or with
// `replace` a folder of regular files holding a *.safetensors file; and not an input. Throws
// CheckpointError (InvalidArgument) naming it; `replace_hint` says how the user asks to
// replace (e.g. "set \"replace\": true in the job").
void check_output_folder(const std::filesystem::path& folder, const InputSet& inputs, bool replace,
                         const std::string& replace_hint);

// The rule for a file output: absent, or with `replace` a regular file (not a link) for which
// `is_ours(path)` holds; its folder exists; not an input, and not inside one. Throws
// CheckpointError (InvalidArgument, or Io for a missing folder) naming it.
void check_output_file(const std::filesystem::path& file, const InputSet& inputs, bool replace,
                       const std::string& what, const std::string& replace_hint,
                       bool (*is_ours)(const std::filesystem::path&));

}  // namespace edgefuse
