// Example: knowledge distillation from four small edge models into one larger model.
//
// Four clients each train a small character-level language model (LibTorch, an MLP over the
// previous 8 characters) on their own categories of the Debian `fortunes` corpus — a non-IID
// split, as edge data is: one holds computing and science, one literature and verse, one
// everyday life, one society and work. None of them sends weights. Each runs its model on a
// shared proxy split (text from every category, which no client trained on) and sends its
// logits as a teacher signal file (distill/signals.h; bf16). The server loads and validates
// the signals, aggregates them into one teacher per proxy character (distill/teacher.h), and
// trains a larger model (16 characters of context, two wider layers) against it with the fused
// KL loss (interop/distill.h), mixing in the proxy text's own next characters with weight
// alpha.
//
// It prints held-out bits per character, on text of all categories none of the models saw,
// for each small model, for the larger model trained on the proxy text alone (no teachers),
// and for the distilled larger model, and says whether the distilled model beats every small
// one. Seeds are fixed; a run takes a few minutes on 2 cores.
//
//   ./example_distill_char_lm [--fortunes /usr/share/games/fortunes] [--out distill-run]
//                             [--rule mean_probs] [--temperature 2] [--alpha 0.5] [--threads 2]
#include <torch/torch.h>

#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "edgefuse/core/parallel.h"
#include "edgefuse/distill/signals.h"
#include "edgefuse/distill/teacher.h"
#include "edgefuse/interop/distill.h"
#include "examples/common/fortunes.h"

namespace ef = edgefuse;
namespace fs = std::filesystem;

namespace {

using edgefuse::examples::add_category;
using edgefuse::examples::read_fortunes;
using edgefuse::examples::shuffled;
using edgefuse::examples::Splits;
constexpr std::int64_t kVocab = edgefuse::examples::kCharVocab;

// Inputs [n, context] (the previous characters, 0 before the start) and labels [n].
std::pair<torch::Tensor, torch::Tensor> windows(const std::vector<std::int64_t>& text,
                                                std::int64_t context) {
  const auto n = static_cast<std::int64_t>(text.size());
  torch::Tensor padded = torch::zeros({n + context}, torch::kLong);
  std::copy(text.begin(), text.end(), padded.data_ptr<std::int64_t>() + context);
  torch::Tensor x = padded.unfold(0, context, 1).slice(0, 0, n).contiguous();
  torch::Tensor y = torch::from_blob(const_cast<std::int64_t*>(text.data()), {n}, torch::kLong).clone();
  return {x, y};
}

struct CharLMImpl : torch::nn::Module {
  CharLMImpl(std::int64_t context, std::int64_t embed, std::int64_t hidden, int layers) {
    emb = register_module("emb", torch::nn::Embedding(kVocab, embed));
    std::int64_t in = context * embed;
    for (int i = 0; i < layers; ++i) {
      fcs.push_back(register_module("fc" + std::to_string(i), torch::nn::Linear(in, hidden)));
      in = hidden;
    }
    out = register_module("out", torch::nn::Linear(in, kVocab));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor h = emb(x).flatten(1);
    for (auto& fc : fcs) h = torch::gelu(fc(h));
    return out(h);
  }
  torch::nn::Embedding emb{nullptr};
  std::vector<torch::nn::Linear> fcs;
  torch::nn::Linear out{nullptr};
};
TORCH_MODULE(CharLM);

struct Spec {
  std::int64_t context, embed, hidden;
  int layers;
};
const Spec kSmall{8, 16, 128, 1};
const Spec kLarge{16, 32, 384, 2};

std::int64_t param_count(CharLM& m) {
  std::int64_t n = 0;
  for (const auto& p : m->parameters()) n += p.numel();
  return n;
}

// Plain next-character training (cross-entropy), Adam, batches of 256.
void train_lm(CharLM& m, const torch::Tensor& x, const torch::Tensor& y, int epochs,
              double lr, std::uint64_t seed) {
  torch::optim::Adam opt(m->parameters(), torch::optim::AdamOptions(lr));
  const std::int64_t n = x.size(0), batch = 256;
  for (int e = 0; e < epochs; ++e) {
    const auto order = shuffled(n, seed + static_cast<std::uint64_t>(e));
    for (std::int64_t b = 0; b < n; b += batch) {
      const std::int64_t end = std::min(n, b + batch);
      const torch::Tensor idx = torch::tensor(
          std::vector<std::int64_t>(order.begin() + b, order.begin() + end), torch::kLong);
      opt.zero_grad();
      const torch::Tensor loss =
          torch::nn::functional::cross_entropy(m->forward(x.index_select(0, idx)), y.index_select(0, idx));
      loss.backward();
      opt.step();
    }
  }
}

double bits_per_char(CharLM& m, const torch::Tensor& x, const torch::Tensor& y) {
  torch::NoGradGuard no_grad;
  double nats = 0.0;
  const std::int64_t n = x.size(0);
  for (std::int64_t b = 0; b < n; b += 8192) {
    const std::int64_t e = std::min(n, b + 8192);
    nats += torch::nn::functional::cross_entropy(
                m->forward(x.slice(0, b, e)), y.slice(0, b, e),
                torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                .item<double>();
  }
  return nats / static_cast<double>(n) / std::log(2.0);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Distil four small character-level LMs into one larger one (edgefuse example)"};
  std::string corpus = "/usr/share/games/fortunes";
  std::string out = "distill-run";
  std::string rule_name = "mean_probs";
  double temperature = 2.0, alpha = 0.5;
  int threads = 2, local_epochs = 3, distill_epochs = 6;
  app.add_option("--fortunes", corpus, "folder of the fortunes corpus")->check(CLI::ExistingDirectory);
  app.add_option("--out", out, "folder for the teacher signal files");
  app.add_option("--rule", rule_name, "teacher aggregation rule");
  app.add_option("--temperature", temperature, "distillation temperature T")->check(CLI::PositiveNumber);
  app.add_option("--alpha", alpha, "weight of the proxy text's own labels")->check(CLI::Range(0.0, 1.0));
  app.add_option("--threads", threads, "LibTorch and edgefuse threads")->check(CLI::Range(1, 256));
  app.add_option("--local-epochs", local_epochs, "epochs of each client's training")->check(CLI::Range(1, 100));
  app.add_option("--distill-epochs", distill_epochs, "epochs over the proxy split")->check(CLI::Range(1, 1000));
  CLI11_PARSE(app, argc, argv);

  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines appear as they are printed
  try {
    const auto t0 = std::chrono::steady_clock::now();
    at::set_num_threads(threads);
    ef::set_num_threads(static_cast<std::size_t>(threads));
    const ef::TeacherRule rule = ef::parse_teacher_rule(rule_name);

    // 1. Data: four clients' categories (non-IID); shared proxy and held-out text.
    const std::vector<std::pair<std::string, std::vector<std::string>>> clients{
        {"tech", {"computers", "linux", "debian", "linuxcookie", "perl", "science"}},
        {"letters", {"literature", "art", "songs-poems", "humorists", "definitions"}},
        {"life", {"love", "men-women", "food", "kids", "pets", "medicine", "people"}},
        {"society", {"politics", "law", "news", "work", "sports", "education"}},
    };
    std::vector<Splits> client_text(clients.size());
    std::vector<std::int64_t> proxy, test;
    for (std::size_t k = 0; k < clients.size(); ++k) {
      for (const auto& cat : clients[k].second) add_category(fs::path(corpus) / cat, client_text[k]);
      proxy.insert(proxy.end(), client_text[k].proxy.begin(), client_text[k].proxy.end());
      test.insert(test.end(), client_text[k].test.begin(), client_text[k].test.end());
    }
    std::printf("data: %zu proxy and %zu held-out characters from %zu clients' categories\n",
                proxy.size(), test.size(), clients.size());

    // 2. Each client trains its small model on its own text and sends its proxy logits.
    const auto [px_small, py] = windows(proxy, kSmall.context);
    const auto [tx_small, ty] = windows(test, kSmall.context);
    const auto [px_large, py_large] = windows(proxy, kLarge.context);
    const auto [tx_large, ty_large] = windows(test, kLarge.context);
    const auto rows = static_cast<std::size_t>(px_small.size(0));
    std::vector<double> small_bpc;
    fs::create_directories(out);
    for (std::size_t k = 0; k < clients.size(); ++k) {
      torch::manual_seed(100 + k);
      CharLM m(kSmall.context, kSmall.embed, kSmall.hidden, kSmall.layers);
      const auto [x, y] = windows(client_text[k].train, kSmall.context);
      train_lm(m, x, y, local_epochs, 2e-3, 1000 + k);
      small_bpc.push_back(bits_per_char(m, tx_small, ty));
      torch::NoGradGuard no_grad;
      const torch::Tensor logits = m->forward(px_small).contiguous();
      const float* p = logits.data_ptr<float>();
      const ef::TeacherSignal signal = ef::dense_signal(
          clients[k].first, rows, kVocab, std::vector<float>(p, p + logits.numel()));
      ef::save_teacher_signal(fs::path(out) / clients[k].first, signal, ef::DType::kBF16, true);
      std::printf("client %-8s %7zu training characters, %lld parameters: held-out %.3f bits/char "
                  "(%.0f s)\n",
                  clients[k].first.c_str(), client_text[k].train.size(),
                  static_cast<long long>(param_count(m)), small_bpc.back(), seconds_since(t0));
    }

    // 3. The server: load and validate the signals, aggregate one teacher per proxy row.
    std::vector<ef::TeacherSignal> signals;
    for (const auto& c : clients) signals.push_back(ef::load_teacher_signal(fs::path(out) / c.first, c.first));
    std::vector<ef::WeightedSignal> weighted;
    for (std::size_t k = 0; k < signals.size(); ++k) {
      weighted.push_back({&signals[k], static_cast<double>(client_text[k].train.size())});
    }
    ef::TeacherOptions topts;
    topts.rule = rule;
    topts.temperature = temperature;
    std::vector<ef::RejectedSignal> rejected;
    const ef::TeacherTarget teacher = ef::aggregate_teachers(weighted, topts, &rejected);
    std::printf("teacher: %s at T = %g over %zu clients (%zu rejected)\n", rule_name.c_str(),
                temperature, teacher.clients.size(), rejected.size());

    // 4. The larger model: proxy text alone, then distilled from the teacher.
    torch::manual_seed(7);
    CharLM alone(kLarge.context, kLarge.embed, kLarge.hidden, kLarge.layers);
    train_lm(alone, px_large, py_large, distill_epochs, 1e-3, 77);
    const double alone_bpc = bits_per_char(alone, tx_large, ty_large);
    std::printf("larger model, proxy text only: held-out %.3f bits/char (%.0f s)\n", alone_bpc,
                seconds_since(t0));

    torch::manual_seed(7);
    CharLM student(kLarge.context, kLarge.embed, kLarge.hidden, kLarge.layers);
    torch::optim::Adam opt(student->parameters(), torch::optim::AdamOptions(1e-3));
    ef::DistillerOptions dopts;
    dopts.loss.temperature = temperature;
    dopts.alpha = alpha;
    dopts.batch_rows = 256;
    dopts.seed = 77;
    ef::Distiller distiller([&](const torch::Tensor& x) { return student->forward(x); }, opt, dopts);
    for (int e = 0; e < distill_epochs; ++e) {
      const ef::DistillStats st = distiller.epoch(px_large, teacher, py_large);
      if (e == 0 || e + 1 == distill_epochs) {
        std::printf("  distill epoch %2d: KL %.4f, CE %.4f\n", e + 1, st.kd, st.ce);
      }
    }
    const double distilled_bpc = bits_per_char(student, tx_large, ty_large);

    std::printf("\nheld-out bits per character (%zu characters of all categories):\n", test.size());
    for (std::size_t k = 0; k < clients.size(); ++k) {
      std::printf("  small model %-8s            %.3f\n", clients[k].first.c_str(), small_bpc[k]);
    }
    std::printf("  larger model, proxy text only    %.3f\n", alone_bpc);
    std::printf("  larger model, distilled          %.3f  (%lld parameters)\n", distilled_bpc,
                static_cast<long long>(param_count(student)));
    const bool beats = distilled_bpc < *std::min_element(small_bpc.begin(), small_bpc.end());
    std::printf("%s (%.0f s)\n",
                beats ? "distilled model beats every client model" : "distilled model does NOT beat every client model",
                seconds_since(t0));
    return beats ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
