// Shared by the LibTorch examples and `edgefuse-lab demo`: the Debian `fortunes` corpus as
// character ids, split per category into training, proxy and held-out text.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgefuse::examples {

inline constexpr std::int64_t kCharVocab = 97;  // 0: other bytes, 1: '\n', 2..96: ASCII 32..126
inline const char* kFortunesDir = "/usr/share/games/fortunes";

inline std::int64_t char_id(unsigned char c) {
  if (c == '\n') return 1;
  if (c >= 32 && c <= 126) return 2 + (c - 32);
  return 0;
}

// The fortunes of one category file: entries separated by lines holding only "%".
inline std::vector<std::string> read_fortunes(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + file.string() + " (install the fortunes package)");
  std::vector<std::string> out;
  std::string line, cur;
  while (std::getline(in, line)) {
    if (line == "%") {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += line + "\n";
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

struct Splits {
  std::vector<std::int64_t> train, proxy, test;
};

// Fortune i goes to the proxy split when i % 10 == 8, to the held-out split when i % 10 == 9,
// else to training. Each fortune ends with id 0 (a separator).
inline void add_category(const std::filesystem::path& file, Splits& s) {
  const auto fortunes = read_fortunes(file);
  for (std::size_t i = 0; i < fortunes.size(); ++i) {
    auto& dst = i % 10 == 8 ? s.proxy : i % 10 == 9 ? s.test : s.train;
    for (unsigned char c : fortunes[i]) dst.push_back(char_id(c));
    dst.push_back(0);
  }
}

// 0, 1, ..., n-1 in a Fisher-Yates order from a fixed seed: the same batches on every run.
inline std::vector<std::int64_t> shuffled(std::int64_t n, std::uint64_t seed) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  std::mt19937_64 rng(seed);
  for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
  return order;
}

}  // namespace edgefuse::examples
