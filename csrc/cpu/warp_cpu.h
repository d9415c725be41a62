// CPU side of the warped distribution and the exponential race (kernels/sampling.cuh states the rule):
// plain loops and a sort, the ground truth for the CUDA radix selects. Used by sample.cpp and
// speculative_verify.cpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/sampling.cuh"

namespace pass_ext::sampling::cpu {

// (order_key(z), fixed-point weight) per token, reused across rows by one thread.
using KeyMass = std::vector<std::pair<uint32_t, uint64_t>>;

template <typename T>
Warp warp_row(const T* row, int64_t vocab, float temperature, int32_t top_k, float top_p, KeyMass& scratch) {
  Warp w{};
  const bool greedy = is_greedy(temperature);
  w.inv_temperature = greedy ? 1.f : inverse_temperature(temperature);
  w.mass = 1.f;
  uint32_t best_key = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    const float l = static_cast<float>(row[j]);
    const uint32_t key = order_key(greedy ? clean_logit(l) : scaled_logit(l, w.inv_temperature));
    if (j == 0 || key > best_key) {
      best_key = key;
      w.argmax = static_cast<int32_t>(j);
    }
  }
  w.zmax = key_float(best_key);
  w.one_hot = greedy || w.zmax == -INFINITY;
  if (w.one_hot) return w;

  scratch.resize(vocab);
  for (int64_t j = 0; j < vocab; ++j) {
    const float z = scaled_logit(static_cast<float>(row[j]), w.inv_temperature);
    scratch[j] = {order_key(z), fixed_mass(exp_weight(z - w.zmax))};
  }
  std::sort(scratch.begin(), scratch.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  const int32_t k = effective_top_k(top_k, vocab);
  w.keep_key = k > 0 ? scratch[k - 1].first : 0;
  // Tokens kept by top-k are a prefix of the sorted order (ties with the k-th included).
  int64_t kept = 0;
  uint64_t mass = 0;
  while (kept < vocab && scratch[kept].first >= w.keep_key) mass += scratch[kept++].second;
  if (top_p_active(top_p)) {
    const uint64_t target = top_p_target(top_p, mass);
    uint64_t cum = 0;
    for (int64_t i = 0; i < kept; ++i) {
      cum += scratch[i].second;
      if (cum < target) continue;
      w.keep_key = scratch[i].first;
      for (int64_t t = i + 1; t < kept && scratch[t].first == w.keep_key; ++t) cum += scratch[t].second;
      mass = cum;
      break;
    }
  }
  w.mass = static_cast<float>(static_cast<double>(mass) * kMassUnit);
  return w;
}

// Exponential race over the row with the same Philox words as the CUDA kernel: weight_fn(l_j, j) -> w_j >= 0.
// Returns the winner, or -1 when no token has positive weight.
template <typename T, typename WeightFn>
int32_t race(const T* row, int64_t vocab, const philox::Stream& rng, WeightFn&& weight_fn) {
  uint64_t best = 0;
  for (int64_t j0 = 0; j0 < vocab; j0 += 4) {
    float w[4] = {0.f, 0.f, 0.f, 0.f};
    bool any = false;
    for (int c = 0; c < 4 && j0 + c < vocab; ++c) {
      w[c] = weight_fn(static_cast<float>(row[j0 + c]), static_cast<int32_t>(j0 + c));
      any |= w[c] > 0.f;
    }
    if (!any) continue;
    const philox::Block r = rng.group(static_cast<uint32_t>(j0 / 4));
    for (int c = 0; c < 4; ++c)
      if (w[c] > 0.f) best = std::max(best, race_entry(race_score(w[c], r.v[c]), static_cast<int32_t>(j0 + c)));
  }
  return race_winner(best);
}

}  // namespace pass_ext::sampling::cpu
