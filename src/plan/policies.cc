// Index-list generators and the width/depth budget chooser (plan/policies.h).
#include "edgefuse/plan/policies.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>

#include "edgefuse/core/error.h"
#include "edgefuse/plan/schema.h"
#include "src/core/splitmix.h"

namespace edgefuse {

using detail::fail;

namespace {

std::uint64_t checked_n(std::uint64_t n, const char* fn) {
  if (n == 0) fail(fn, ": the axis has no indices");
  if (n > UINT32_MAX) fail(fn, ": axis size ", n, " exceeds 2^32 - 1");
  return n;
}

// SplitMix64 (Steele, Lea, Flood 2014), the generator Java's SplittableRandom uses.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    state_ += detail::kSplitMixGamma;
    return detail::splitmix_finalize(state_);
  }
  // Uniform in [0, range), without modulo bias (Lemire, "Fast random integer generation in an
  // interval", TOMACS 2019).
  std::uint64_t below(std::uint64_t range) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * range;
    auto low = static_cast<std::uint64_t>(m);
    if (low < range) {
      const std::uint64_t threshold = (0 - range) % range;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * range;
        low = static_cast<std::uint64_t>(m);
      }
    }
    return static_cast<std::uint64_t>(m >> 64);
  }

 private:
  std::uint64_t state_;
};

}  // namespace

Rational Rational::parse(std::string_view text) {
  const std::string t(text);
  auto bad = [&](const char* why) -> Rational {
    fail("rate '", t, "': ", why, " (expected a number in (0, 1], e.g. 0.25 or \"1/4\")");
  };
  Rational r;
  if (const auto slash = t.find('/'); slash != std::string::npos) {
    const std::string a = t.substr(0, slash), b = t.substr(slash + 1);
    auto digits = [](const std::string& s) {
      return !s.empty() && s.size() <= 18 &&
             std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
    };
    if (!digits(a) || !digits(b)) return bad("not <integer>/<integer>");
    r.num = std::stoull(a);
    r.den = std::stoull(b);
    if (r.den == 0) return bad("zero denominator");
  } else {
    // Decimal: digits [. digits] [e [+-] digits], read exactly.
    std::size_t i = 0;
    std::uint64_t mant = 0;
    int frac = 0, ndig = 0;
    bool dot = false;
    for (; i < t.size(); ++i) {
      const char c = t[i];
      if (c == '.' && !dot) {
        dot = true;
      } else if (c >= '0' && c <= '9') {
        if (mant == 0 && c == '0') {
          if (dot) ++frac;
          continue;
        }
        if (++ndig > 18) return bad("more than 18 significant digits");
        mant = mant * 10 + static_cast<std::uint64_t>(c - '0');
        if (dot) ++frac;
      } else {
        break;
      }
    }
    if (i == 0 || (i == 1 && dot)) return bad("not a number");
    int exp10 = 0;
    if (i < t.size() && (t[i] == 'e' || t[i] == 'E')) {
      ++i;
      bool neg = false;
      if (i < t.size() && (t[i] == '+' || t[i] == '-')) neg = t[i++] == '-';
      if (i == t.size()) return bad("empty exponent");
      for (; i < t.size() && t[i] >= '0' && t[i] <= '9'; ++i) {
        exp10 = exp10 * 10 + (t[i] - '0');
        if (exp10 > 40) return bad("exponent out of range");
      }
      if (neg) exp10 = -exp10;
    }
    if (i != t.size()) return bad("trailing characters");
    const int scale = frac - exp10;  // value = mant / 10^scale
    if (scale < 0) {
      for (int k = 0; k < -scale; ++k) {
        if (mant > UINT64_MAX / 10) return bad("out of range");
        mant *= 10;
      }
      r.num = mant;
      r.den = 1;
    } else {
      if (scale > 19) return bad("too many decimals");
      r.num = mant;
      r.den = 1;
      for (int k = 0; k < scale; ++k) r.den *= 10;
    }
  }
  if (r.num == 0) return bad("zero");
  const std::uint64_t g = std::gcd(r.num, r.den);
  r.num /= g;
  r.den /= g;
  if (r.num > r.den) return bad("above 1");
  return r;
}

Rational Rational::from_double(double x) {
  if (!(x > 0.0 && x <= 1.0)) {
    fail("rate ", x, ": expected a number in (0, 1]");
  }
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  return parse(buf);
}

std::uint64_t Rational::count(std::uint64_t n) const noexcept {
  const unsigned __int128 p = static_cast<unsigned __int128>(n) * num;
  const auto k = static_cast<std::uint64_t>((p + den - 1) / den);
  return std::max<std::uint64_t>(k, 1);
}

std::string Rational::to_string() const { return std::to_string(num) + "/" + std::to_string(den); }

std::vector<std::uint32_t> prefix_indices(std::uint64_t n, Rational rate) {
  checked_n(n, "prefix_indices");
  std::vector<std::uint32_t> out(rate.count(n));
  std::iota(out.begin(), out.end(), 0u);
  return out;
}

std::vector<std::uint32_t> rolling_window(std::uint64_t n, Rational rate, std::uint64_t round,
                                          RollingConvention convention, std::uint64_t offset) {
  checked_n(n, "rolling_window");
  const std::uint64_t k = rate.count(n);
  const std::uint64_t shift = (round % n + offset % n) % n;
  std::vector<std::uint32_t> out(k);
  for (std::uint64_t j = 0; j < k; ++j) {
    // forward: (shift + j) mod n; backward (torch.roll to the right): (j - shift) mod n.
    out[j] = static_cast<std::uint32_t>(
        convention == RollingConvention::kForward ? (shift + j) % n : (j + n - shift) % n);
  }
  return out;
}

std::vector<std::uint32_t> random_indices(std::uint64_t n, Rational rate, std::uint64_t seed,
                                          std::string_view stream_key) {
  checked_n(n, "random_indices");
  const std::uint64_t k = rate.count(n);
  SplitMix64 rng(detail::stream_state(seed, stream_key));
  std::vector<std::uint32_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0u);
  for (std::uint64_t i = 0; i < k; ++i) {
    const std::uint64_t j = i + rng.below(n - i);
    std::swap(perm[i], perm[j]);
  }
  perm.resize(k);
  std::sort(perm.begin(), perm.end());
  return perm;
}

std::vector<std::uint32_t> stride_indices(std::uint64_t n, Rational rate) {
  checked_n(n, "stride_indices");
  const std::uint64_t k = rate.count(n);
  if (k == 1) return {0};
  std::vector<std::uint32_t> out(k);
  for (std::uint64_t i = 0; i < k; ++i) {
    // round(i (n-1) / (k-1)), halves up, in integers.
    out[i] = static_cast<std::uint32_t>((2 * i * (n - 1) + (k - 1)) / (2 * (k - 1)));
  }
  return out;
}

std::vector<std::uint32_t> top_magnitude_indices(const float* w, std::size_t n, Rational size) {
  checked_n(n, "top_magnitude_indices");
  const auto k = static_cast<std::size_t>(static_cast<unsigned __int128>(n) * size.num / size.den);
  if (k == 0) fail("top_magnitude_indices: floor(", n, " x ", size.to_string(), ") keeps nothing");
  for (std::size_t i = 0; i < n; ++i) {
    if (!std::isfinite(w[i])) fail("top_magnitude_indices: w[", i, "] = ", w[i], " is not finite");
  }
  std::vector<std::uint32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0u);
  std::stable_sort(idx.begin(), idx.end(), [&](std::uint32_t a, std::uint32_t b) {
    return std::fabs(w[a]) > std::fabs(w[b]);
  });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<std::uint64_t> stagger_offsets(std::uint64_t n, const std::vector<Rational>& rates) {
  checked_n(n, "stagger_offsets");
  std::vector<std::uint64_t> out;
  out.reserve(rates.size());
  std::uint64_t at = 0;
  for (const auto& r : rates) {
    out.push_back(at);
    at = (at + r.count(n)) % n;
  }
  return out;
}

std::uint64_t submodel_params(const ModelConfig& c, Rational width, std::uint64_t layers) {
  if (c.hidden == 0 || c.heads == 0 || c.intermediate == 0 || c.vocab == 0 || c.layers == 0) {
    fail("submodel_params: the config needs hidden, heads, intermediate, vocab and layers");
  }
  const std::uint64_t kv = c.kv_heads ? c.kv_heads : c.heads;
  const std::uint64_t g = c.heads / kv;
  const std::uint64_t hd = c.head_dim ? c.head_dim : c.hidden / c.heads;
  const std::uint64_t kv2 = width.count(kv), h2 = kv2 * g, d2 = width.count(c.hidden),
                      f2 = width.count(c.intermediate);
  const std::uint64_t per_layer = d2 * h2 * hd * 2 + d2 * kv2 * hd * 2 + 3 * d2 * f2 + 2 * d2;
  return c.vocab * d2 * (c.tied_embeddings ? 1 : 2) + d2 + layers * per_layer;
}

BudgetChoice choose_budget(const ModelConfig& c, std::uint64_t budget) {
  const std::uint64_t kv = c.kv_heads ? c.kv_heads : c.heads;
  if (kv == 0) fail("choose_budget: the config has no heads");
  struct Cand {
    std::uint64_t j, layers, params;
  };
  std::vector<Cand> ok;
  std::uint64_t best = 0;
  for (std::uint64_t j = 1; j <= kv; ++j) {
    const Rational w{j / std::gcd(j, kv), kv / std::gcd(j, kv)};
    for (std::uint64_t l = 1; l <= c.layers; ++l) {
      const auto p = submodel_params(c, w, l);
      if (p > budget) break;  // grows with l
      ok.push_back({j, l, p});
      best = std::max(best, p);
    }
  }
  if (ok.empty()) {
    fail("choose_budget: even one KV group of one layer (", submodel_params(c, Rational{1, kv}, 1),
         " parameters) exceeds the budget of ", budget);
  }
  const Cand* pick = nullptr;
  double pick_gap = 0;
  for (const auto& x : ok) {
    if (x.params * 20 < best * 19) continue;  // below 95% of the best
    const double gap = std::fabs(std::log(double(x.j) / double(kv)) -
                                 std::log(double(x.layers) / double(c.layers)));
    if (pick == nullptr || gap < pick_gap - 1e-12 ||
        (std::fabs(gap - pick_gap) <= 1e-12 && x.params > pick->params)) {
      pick = &x;
      pick_gap = gap;
    }
  }
  BudgetChoice out;
  const std::uint64_t g = std::gcd(pick->j, kv);
  out.width = {pick->j / g, kv / g};
  out.layers = pick->layers;
  out.kv_heads = pick->j;
  out.heads = pick->j * (c.heads / kv);
  out.hidden = out.width.count(c.hidden);
  out.intermediate = out.width.count(c.intermediate);
  out.params = pick->params;
  return out;
}

}  // namespace edgefuse
