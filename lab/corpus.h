// The text of an experiment as byte ids: each client's training text, each group's held-out
// text and the server's proxy text.
//
// Held-out cut: the last `heldout_fraction` of every data file, moved forward to just after a
// line end, is held out (never trained on); the rest is training text. A file with no line end
// after the cut point holds nothing out. Held-out text of a group is the held-out part of each
// distinct data file of its clients, in the order the clients name them, at most `eval_bytes`
// per group (0: all). Proxy text is the first proxy.bytes / (number of proxy files) bytes of
// each proxy file, in order; a proxy file may not be a client's data file (its held-out part
// must stay unseen).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "lab/experiment.h"

namespace edgefuse::lab {

// Byte offset of the held-out cut of `text`.
std::size_t heldout_cut(const std::string& text, double heldout_fraction);

// Number of UTF-8 characters in `bytes`: every byte that is not a continuation
// byte (10xxxxxx) starts one.
std::int64_t utf8_characters(const std::string& bytes);

// Windows of context + 1 bytes: inputs x [n, context] and next-byte labels y [n, context].
struct Windows {
  torch::Tensor x, y;
  std::int64_t characters = 0;  // UTF-8 characters among the labels (for bits per character)
  std::int64_t size() const { return x.defined() ? x.size(0) : 0; }
};

// Windows starting every `stride` bytes; the text must hold at least context + 1 bytes.
Windows make_windows(const std::string& text, std::int64_t context, std::int64_t stride);

struct Corpus {
  std::vector<std::string> train;              // per client, in experiment order
  std::vector<std::string> groups;             // group names, in order of first appearance
  std::map<std::string, std::string> heldout;  // per group
  std::string proxy;
};

// Reads and splits every file. Throws Error naming the client, group or file for a client
// with too little training text (fewer than context + 1 bytes), a group with no held-out text,
// or a proxy that is empty or a client's data file.
Corpus read_corpus(const Experiment& experiment);

}  // namespace edgefuse::lab
