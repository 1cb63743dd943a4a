// The experiment's text (lab/corpus.h).
#include "lab/corpus.h"

#include <fstream>
#include <set>
#include <sstream>

#include "edgefuse/core/error.h"

namespace edgefuse::lab {
namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail("data file ", path.string(), ": cannot be read");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

std::size_t heldout_cut(const std::string& text, double heldout_fraction) {
  const auto point =
      static_cast<std::size_t>(static_cast<double>(text.size()) * (1.0 - heldout_fraction));
  const std::size_t nl = text.find('\n', point == 0 ? 0 : point - 1);
  return nl == std::string::npos ? text.size() : nl + 1;
}

std::int64_t utf8_characters(const std::string& bytes) {
  std::int64_t n = 0;
  for (unsigned char c : bytes) n += (c & 0xC0) != 0x80;
  return n;
}

Windows make_windows(const std::string& text, std::int64_t context, std::int64_t stride) {
  const auto size = static_cast<std::int64_t>(text.size());
  if (size < context + 1)
    detail::fail("make_windows: ", size, " bytes hold no window of ", context + 1);
  torch::Tensor all = torch::empty({size}, torch::kLong);
  auto* ids = all.data_ptr<std::int64_t>();
  for (std::int64_t i = 0; i < size; ++i)
    ids[i] = static_cast<unsigned char>(text[static_cast<std::size_t>(i)]);
  const std::int64_t n = (size - context - 1) / stride + 1;
  torch::Tensor w = all.unfold(0, context + 1, stride).slice(0, 0, n);
  Windows out{w.slice(1, 0, context).contiguous(), w.slice(1, 1).contiguous(), 0};
  const auto* y = out.y.data_ptr<std::int64_t>();
  for (std::int64_t i = 0; i < out.y.numel(); ++i) out.characters += (y[i] & 0xC0) != 0x80;
  return out;
}

Corpus read_corpus(const Experiment& x) {
  Corpus c;
  std::map<std::string, std::set<std::string>> group_files;
  std::set<std::string> client_files;
  for (const auto& spec : x.clients) {
    std::string train;
    if (!group_files.count(spec.group)) c.groups.push_back(spec.group);
    for (const auto& file : spec.data) {
      const std::string text = read_file(file);
      const std::size_t cut = heldout_cut(text, x.heldout_fraction);
      train += text.substr(0, cut);
      client_files.insert(fs::weakly_canonical(file).string());
      if (group_files[spec.group].insert(fs::weakly_canonical(file).string()).second) {
        c.heldout[spec.group] += text.substr(cut);
      }
    }
    if (static_cast<std::int64_t>(train.size()) < x.model.context + 1) {
      detail::fail("experiment ", x.file.string(), ": client '", spec.name, "' has ", train.size(),
                   " bytes of training text after the held-out cut (at least context + 1 = ",
                   x.model.context + 1, " are needed)");
    }
    c.train.push_back(std::move(train));
  }
  for (const auto& g : c.groups) {
    std::string& h = c.heldout[g];
    if (x.eval_bytes > 0 && static_cast<std::int64_t>(h.size()) > x.eval_bytes)
      h.resize(static_cast<std::size_t>(x.eval_bytes));
    if (static_cast<std::int64_t>(h.size()) < x.model.context + 1) {
      detail::fail("experiment ", x.file.string(), ": group '", g, "' has ", h.size(),
                   " bytes of held-out text (at least context + 1 = ", x.model.context + 1,
                   " are needed; raise heldout_fraction or add data)");
    }
  }
  for (std::size_t i = 0; i < x.proxy.files.size(); ++i) {
    if (client_files.count(fs::weakly_canonical(x.proxy.files[i]).string())) {
      detail::fail("experiment ", x.file.string(), ": proxy.files[", i, "] (",
                   x.proxy.files[i].string(),
                   ") is a client's data file: its held-out text must stay unseen");
    }
    const std::size_t share = static_cast<std::size_t>(x.proxy.bytes) / x.proxy.files.size();
    c.proxy += read_file(x.proxy.files[i]).substr(0, share);
  }
  if (!x.proxy.files.empty() && static_cast<std::int64_t>(c.proxy.size()) < x.model.context + 1) {
    detail::fail("experiment ", x.file.string(), ": the proxy text holds ", c.proxy.size(),
                 " bytes (at least context + 1 = ", x.model.context + 1, " are needed)");
  }
  return c;
}

}  // namespace edgefuse::lab
