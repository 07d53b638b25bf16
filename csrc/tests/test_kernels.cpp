// C++ tests of the CPU kernels through the torch-free API, with expected values worked out by
// hand or by a straightforward brute force written here (not by the kernels themselves).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "moe_fast/kernels.h"

namespace {

int failures = 0;

#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

bool near(double a, double b, double tol) { return std::fabs(a - b) <= tol * (1.0 + std::fabs(b)); }

using moe_fast::DType;
using moe_fast::RouteArgs;

// What route writes: weights [T, k], ids [T, k], counts [E], offsets [E + 1], perm [T * k].
struct Routed {
  std::vector<float> w;
  std::vector<int32_t> ids, counts, offsets, perm;
};

// Routes float32 logits [T, E] with the CPU kernel; gaps [k] and keep [E] may be null.
Routed route_float32(const std::vector<float>& logits, int64_t T, int32_t E, int32_t k, const double* gaps,
                     const uint8_t* keep) {
  RouteArgs a;
  a.num_tokens = T;
  a.num_experts = E;
  a.top_k = k;
  a.skip_gap = gaps;
  a.keep = keep;
  Routed r{std::vector<float>(T * k), std::vector<int32_t>(T * k), std::vector<int32_t>(E),
           std::vector<int32_t>(E + 1), std::vector<int32_t>(T * k)};
  const char* err = moe_fast::cpu::route(DType::Float32, logits.data(), a, r.w.data(), r.ids.data(), r.counts.data(),
                                         r.offsets.data(), r.perm.data());
  EXPECT(err == nullptr);
  return r;
}

void test_route_top2_with_skip() {
  // Two tokens, 4 experts, top-2. Token 0: experts 2 and 0 (gap 0.5); token 1: experts 1 and 3
  // (gap 2.0). beta = exp(-1): token 1's second slot is skipped.
  const std::vector<float> logits = {1.0f, -1.0f, 1.5f, 0.0f,  //
                                     0.0f, 3.0f, -2.0f, 1.0f};
  const double gaps[2] = {std::numeric_limits<double>::infinity(), 1.0};
  const auto [w, ids, counts, offsets, perm] = route_float32(logits, 2, 4, 2, gaps, nullptr);
  EXPECT(ids[0] == 2 && ids[1] == 0 && ids[2] == 1 && ids[3] == 4);
  const double w0 = 1.0 / (1.0 + std::exp(-0.5));
  EXPECT(near(w[0], w0, 1e-6) && near(w[1], 1.0 - w0, 1e-6));
  EXPECT(w[2] == 1.0f && w[3] == 0.0f);
  // Expert 0: slot 1; expert 1: slot 2; expert 2: slot 0; skipped: slot 3.
  EXPECT(counts[0] == 1 && counts[1] == 1 && counts[2] == 1 && counts[3] == 0);
  EXPECT(offsets[0] == 0 && offsets[1] == 1 && offsets[2] == 2 && offsets[3] == 3 && offsets[4] == 3);
  EXPECT(perm[0] == 1 && perm[1] == 2 && perm[2] == 0 && perm[3] == 3);
}

void test_route_ties_mask_and_degenerate_rows() {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Row 0: ties -> lower index first. Row 1: all -inf -> lowest allowed, equal weights.
  // Row 2: NaN never wins. Expert 1 is masked everywhere.
  const std::vector<float> logits = {2.0f, 2.0f, 2.0f, 2.0f,  //
                                     -inf, -inf, -inf, -inf,  //
                                     nan, 5.0f, nan, 0.0f};
  const uint8_t keep[4] = {1, 0, 1, 1};
  const auto [w, ids, counts, offsets, perm] = route_float32(logits, 3, 4, 2, nullptr, keep);
  EXPECT(ids[0] == 0 && ids[1] == 2);
  EXPECT(ids[2] == 0 && ids[3] == 2 && w[2] == 0.5f && w[3] == 0.5f);
  EXPECT(ids[4] == 3 && ids[5] == 0 && w[4] == 1.0f && w[5] == 0.0f);
}

void test_bf16_and_fp16_conversion() {
  // bf16 0x3F80 = 1.0, 0xC000 = -2.0; fp16 0x3C00 = 1.0, 0x0001 = 2^-24, 0x7C00 = +inf.
  EXPECT(moe_fast::to_float(moe_fast::bf16_t{0x3F80}) == 1.0f);
  EXPECT(moe_fast::to_float(moe_fast::bf16_t{0xC000}) == -2.0f);
  EXPECT(moe_fast::to_float(moe_fast::fp16_t{0x3C00}) == 1.0f);
  EXPECT(moe_fast::to_float(moe_fast::fp16_t{0x0001}) == std::ldexp(1.0f, -24));
  EXPECT(moe_fast::to_float(moe_fast::fp16_t{0x7C00}) == std::numeric_limits<float>::infinity());
  EXPECT(moe_fast::to_float(moe_fast::fp16_t{0xBC00}) == -1.0f);
}

// Brute force: the error of keeping `keep` for one token, from explicit expert outputs.
double brute_error(const std::vector<float>& logits, const std::vector<std::vector<double>>& y,
                   const std::vector<int>& keep, int k, const std::vector<double>& z) {
  const int E = static_cast<int>(logits.size());
  std::vector<int> order;
  for (int e = 0; e < E; ++e)
    if (keep[e]) order.push_back(e);
  // Selection sort by logit, ties to the lower index.
  for (size_t i = 0; i < order.size(); ++i)
    for (size_t j = i + 1; j < order.size(); ++j)
      if (logits[order[j]] > logits[order[i]]) std::swap(order[i], order[j]);
  double sum = 0;
  for (int j = 0; j < k; ++j) sum += std::exp(static_cast<double>(logits[order[j]]));
  std::vector<double> out(z.size(), 0.0);
  for (int j = 0; j < k; ++j) {
    const double w = std::exp(static_cast<double>(logits[order[j]])) / sum;
    for (size_t h = 0; h < z.size(); ++h) out[h] += w * y[order[j]][h];
  }
  double err = 0;
  for (size_t h = 0; h < z.size(); ++h) err += (out[h] - z[h]) * (out[h] - z[h]);
  return err;
}

void test_subset_loss_against_brute_force() {
  const int T = 50, E = 6, k = 2, H = 5, M = 4;  // M = k + 2: up to two experts may be dropped
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> logits(T * E);
  for (auto& v : logits) v = normal(rng);
  std::vector<std::vector<std::vector<double>>> y(T, std::vector<std::vector<double>>(E, std::vector<double>(H)));
  for (auto& t : y)
    for (auto& e : t)
      for (auto& v : e) v = normal(rng);
  // Ranked ids (top-M) and their outputs, via the route kernel.
  RouteArgs a;
  a.num_tokens = T;
  a.num_experts = E;
  a.top_k = M;
  std::vector<float> wm(T * M);
  std::vector<int32_t> ids(T * M);
  moe_fast::cpu::route_rows(DType::Float32, logits.data(), a, 0, T, wm.data(), ids.data());
  std::vector<float> outputs(T * M * H), target(T * H);
  std::vector<std::vector<double>> z(T, std::vector<double>(H));
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < M; ++i)
      for (int h = 0; h < H; ++h) outputs[(t * M + i) * H + h] = static_cast<float>(y[t][ids[t * M + i]][h]);
    for (int h = 0; h < H; ++h) z[t][h] = target[t * H + h] = normal(rng);
  }
  const int P = M * (M + 1) / 2;
  std::vector<float> gram(T * P), cross(T * M), target_sq(T);
  moe_fast::cpu::expert_gram_rows(DType::Float32, outputs.data(), target.data(), M, H, 0, T, gram.data(),
                                  cross.data(), target_sq.data());
  // Candidates: every set that drops two experts; two groups (even / odd tokens).
  std::vector<uint8_t> keep;
  std::vector<std::vector<int>> cands;
  for (int d0 = 0; d0 < E; ++d0)
    for (int d1 = d0 + 1; d1 < E; ++d1) {
      std::vector<int> kp(E, 1);
      kp[d0] = kp[d1] = 0;
      cands.push_back(kp);
      keep.insert(keep.end(), kp.begin(), kp.end());
    }
  std::vector<int64_t> group(T);
  for (int t = 0; t < T; ++t) group[t] = t % 2;
  moe_fast::SubsetLossArgs s;
  s.num_tokens = T;
  s.num_experts = E;
  s.rank = M;
  s.top_k = k;
  s.gram = gram.data();
  s.ids = ids.data();
  s.logits = logits.data();
  s.cross = cross.data();
  s.target_sq = target_sq.data();
  const int64_t C = static_cast<int64_t>(cands.size());
  std::vector<double> out(C * 2);
  moe_fast::cpu::subset_loss(s, keep.data(), C, group.data(), 2, out.data());
  for (int64_t c = 0; c < C; ++c) {
    double want[2] = {0.0, 0.0};
    for (int t = 0; t < T; ++t) {
      std::vector<float> row(logits.begin() + t * E, logits.begin() + (t + 1) * E);
      want[t % 2] += brute_error(row, y[t], cands[c], k, z[t]);
    }
    EXPECT(near(out[c * 2], want[0], 1e-4) && near(out[c * 2 + 1], want[1], 1e-4));
  }
}

moe_fast::SubsetLossArgs small_problem(std::vector<float>& gram, std::vector<int32_t>& ids, std::vector<float>& logits,
                                       std::vector<float>& tw) {
  // Two tokens, E = 3, k = 1, M = 2, layer-wise; ids ranked by hand.
  logits = {1.0f, 2.0f, 0.0f, 0.5f, -1.0f, 3.0f};
  ids = {1, 0, 2, 0};
  gram.assign(2 * 3, 1.0f);
  tw = {1.0f, 0.0f, 1.0f, 0.0f};
  moe_fast::SubsetLossArgs s;
  s.num_tokens = 2;
  s.num_experts = 3;
  s.rank = 2;
  s.top_k = 1;
  s.gram = gram.data();
  s.ids = ids.data();
  s.logits = logits.data();
  s.target_weights = tw.data();
  return s;
}

void test_expert_gram_target_with_zero_hidden() {
  // H = 0 in target mode: no data to read (target may be null), cross and target_sq are zeros.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> gram(3 * 3, nan), cross(3 * 2, nan), target_sq(3, nan);
  moe_fast::cpu::expert_gram_rows(DType::Float32, nullptr, nullptr, 2, 0, 0, 3, gram.data(), cross.data(),
                                  target_sq.data());
  for (float v : gram) EXPECT(v == 0.0f);
  for (float v : cross) EXPECT(v == 0.0f);
  for (float v : target_sq) EXPECT(v == 0.0f);
  std::fill(cross.begin(), cross.end(), nan);
  EXPECT(moe_fast::cpu::expert_gram(DType::BFloat16, nullptr, nullptr, 3, 2, 0, gram.data(), cross.data(),
                                    target_sq.data()) == nullptr);
  for (float v : cross) EXPECT(v == 0.0f);
  // A target without cross / target_sq outputs, or H > 0 without a target, is reported.
  const float y[4] = {1, 2, 3, 4};
  EXPECT(moe_fast::cpu::expert_gram(DType::Float32, y, y, 1, 2, 2, gram.data(), nullptr, nullptr) != nullptr);
  EXPECT(moe_fast::cpu::expert_gram(DType::Float32, y, nullptr, 1, 2, 2, gram.data(), cross.data(),
                                    target_sq.data()) != nullptr);
  EXPECT(moe_fast::cpu::expert_gram(DType::Float32, y, nullptr, 1, 600, 2, gram.data(), nullptr, nullptr) != nullptr);
}

void test_route_checks_its_limits() {
  RouteArgs a;
  a.num_tokens = int64_t{1} << 28;  // T * k = 2^31: perm's int32 slot indices would overflow
  a.num_experts = 16;
  a.top_k = 8;
  EXPECT(moe_fast::validate_route(a) != nullptr);
  // cpu::route reports before touching any buffer (all null here).
  EXPECT(moe_fast::cpu::route(DType::Float32, nullptr, a, nullptr, nullptr, nullptr, nullptr, nullptr) != nullptr);
  a.num_tokens = (int64_t{1} << 28) - 1;
  EXPECT(moe_fast::validate_route(a) == nullptr);
  a.num_tokens = 1;
  a.num_experts = 513;
  EXPECT(moe_fast::validate_route(a) != nullptr);
  a.num_experts = 4;
  a.top_k = 5;
  EXPECT(moe_fast::validate_route(a) != nullptr);
  a.top_k = 2;
  const double bad_gap[2] = {0.0, -1.0};  // beta > 1
  a.skip_gap = bad_gap;
  EXPECT(moe_fast::validate_route(a) != nullptr);
  a.skip_gap = nullptr;
  const uint8_t keep[4] = {0, 1, 0, 0};  // one allowed expert, k = 2
  a.keep = keep;
  const float logits[4] = {0, 1, 2, 3};
  float w[2];
  int32_t ids[2], counts[4], offsets[5], perm[2];
  EXPECT(moe_fast::cpu::route(DType::Float32, logits, a, w, ids, counts, offsets, perm) != nullptr);
}

void test_skip_gaps_from_beta() {
  double gaps[4];
  const double one[1] = {0.5};
  EXPECT(moe_fast::skip_gaps_from_beta(one, 1, 4, gaps) == nullptr);
  EXPECT(std::isinf(gaps[0]) && near(gaps[1], std::log(2.0), 1e-15) && gaps[3] == gaps[1]);
  const double per_slot[3] = {0.0, 1.0, 0.25};
  EXPECT(moe_fast::skip_gaps_from_beta(per_slot, 3, 4, gaps) == nullptr);
  EXPECT(std::isinf(gaps[1]) && gaps[2] == 0.0 && near(gaps[3], std::log(4.0), 1e-15));
  const double two[2] = {0.1, 0.2};
  EXPECT(moe_fast::skip_gaps_from_beta(two, 2, 4, gaps) != nullptr);  // neither 1 nor k - 1 values
  const double out_of_range[1] = {1.5};
  EXPECT(moe_fast::skip_gaps_from_beta(out_of_range, 1, 2, gaps) != nullptr);
  const double nan_beta[1] = {std::numeric_limits<double>::quiet_NaN()};
  EXPECT(moe_fast::skip_gaps_from_beta(nan_beta, 1, 2, gaps) != nullptr);
}

void test_ranked_rows() {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float row[3] = {-inf, -0.8f, 3.0f};
  const int32_t ranked[3] = {2, 1, 0}, unranked[3] = {2, 0, 1}, repeated[3] = {2, 2, 1}, out[3] = {2, 1, 3};
  EXPECT(moe_fast::ranked_row_ok(ranked, row, 3, 3));
  EXPECT(!moe_fast::ranked_row_ok(unranked, row, 3, 3));
  EXPECT(!moe_fast::ranked_row_ok(repeated, row, 3, 3));
  EXPECT(!moe_fast::ranked_row_ok(out, row, 3, 3));
  const int32_t top2[2] = {2, 1}, not_top2[2] = {2, 0};
  EXPECT(moe_fast::ranked_row_ok(top2, row, 2, 3));
  EXPECT(!moe_fast::ranked_row_ok(not_top2, row, 2, 3));
  // Equal (sanitized) logits rank by index: NaN and -inf are equal; +inf is the largest.
  const float ties[4] = {nan, -inf, inf, 1.0f};
  const int32_t by_index[4] = {2, 3, 0, 1}, reversed[4] = {2, 3, 1, 0};
  EXPECT(moe_fast::ranked_row_ok(by_index, ties, 4, 4));
  EXPECT(!moe_fast::ranked_row_ok(reversed, ties, 4, 4));
}

void test_subset_loss_checks_its_limits() {
  std::vector<float> gram, logits, tw;
  std::vector<int32_t> ids;
  moe_fast::SubsetLossArgs s = small_problem(gram, ids, logits, tw);
  const uint8_t keep[3] = {1, 1, 0};
  const int64_t group[2] = {0, 0};
  double out[1] = {-1.0};
  EXPECT(moe_fast::cpu::subset_loss(s, keep, 1, group, 1, out) == nullptr);
  // Token 0 keeps expert 1 (weight 1 = target): 0. Token 1 loses expert 2: d = (-1, 1) over the
  // ranked slots (2, 0) with an all-ones Gram, so d'Gd = 0 as well.
  EXPECT(out[0] == 0.0);
  // E > 512 would read past the mask words.
  moe_fast::SubsetLossArgs big = s;
  big.num_experts = 600;
  EXPECT(moe_fast::validate_subset_loss(big, 1, 1) != nullptr);
  EXPECT(moe_fast::cpu::subset_loss(big, keep, 1, group, 1, out) != nullptr);
  // Bad data: group out of range, too many drops, a repeated or unranked ids row.
  const int64_t bad_group[2] = {0, 1};
  EXPECT(moe_fast::cpu::subset_loss(s, keep, 1, bad_group, 1, out) != nullptr);
  const uint8_t drops_two[3] = {1, 0, 0};
  EXPECT(moe_fast::cpu::subset_loss(s, drops_two, 1, group, 1, out) != nullptr);
  ids = {1, 1, 2, 0};
  EXPECT(moe_fast::cpu::subset_loss(s, keep, 1, group, 1, out) != nullptr);
  ids = {0, 1, 2, 0};
  EXPECT(moe_fast::cpu::subset_loss(s, keep, 1, group, 1, out) != nullptr);
  // The review's case: logits [-inf, -0.8, 3] with ids [2, 0, 1] (not in rank order).
  const float inf = std::numeric_limits<float>::infinity();
  logits = {-inf, -0.8f, 3.0f, -inf, -0.8f, 3.0f};
  ids = {2, 0, 2, 1};  // token 0: in order, but expert 1 ranks before 0: not the top two
  EXPECT(moe_fast::cpu::subset_loss(s, keep, 1, group, 1, out) != nullptr);
  // A layer-wise target with more than k nonzero weights.
  ids = {2, 1, 2, 1};
  tw = {0.5f, 0.5f, 1.0f, 0.0f};
  EXPECT(moe_fast::cpu::subset_loss(s, keep, 1, group, 1, out) != nullptr);
}

void test_gram_index_packing() {
  // M = 3: (0,0) (0,1) (0,2) (1,1) (1,2) (2,2), either order of (i, j).
  int64_t want = 0;
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = i; j < 3; ++j) {
      EXPECT(moe_fast::gram_index(i, j, 3) == want);
      EXPECT(moe_fast::gram_index(j, i, 3) == want);
      ++want;
    }
}

void test_route_slot_weights() {
  // Logits 2, 1, 0 (gaps 1 and 2 to the top); the third slot's gap 2 exceeds its threshold 1.5.
  const float top_v[3] = {2.0f, 1.0f, 0.0f};
  const double gaps[3] = {std::numeric_limits<double>::infinity(), 1.5, 1.5};
  float w[3];
  bool skipped[3];
  moe_fast::route_slot_weights(top_v, 3, true, gaps, true, 0.0, w, skipped);
  EXPECT(!skipped[0] && !skipped[1] && skipped[2]);
  const double w0 = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT(near(w[0], w0, 1e-6) && near(w[1], 1.0 - w0, 1e-6) && w[2] == 0.0f);
  // Not renormalized: the kept slots carry the top-3's softmax mass over a partition z.
  const double z = 1.0 + std::exp(-1.0) + std::exp(-2.0) + 1.0;  // one more allowed expert at l = 2
  moe_fast::route_slot_weights(top_v, 3, false, gaps, false, z, w, skipped);
  EXPECT(!skipped[2] && near(w[0], 1.0 / z, 1e-6) && near(w[2], std::exp(-2.0) / z, 1e-6));
}

void test_candidate_rules() {
  moe_fast::ExpertMask mask{};
  mask.words[0] = (uint64_t{1} << 0) | (uint64_t{1} << 3) | (uint64_t{1} << 5);  // keeps 0, 3, 5
  const int32_t ids[4] = {5, 1, 3, 0};
  int32_t slot[2];
  EXPECT(moe_fast::kept_ranked_slots(mask, ids, 4, 2, slot) == 2 && slot[0] == 0 && slot[1] == 2);
  const uint8_t keep[5] = {1, 0, 1, 1, 0};
  EXPECT(moe_fast::count_nonzero(keep, 5) == 3);
  // E = 8, M = 4, k = 2: keep at least 2, drop at most 2.
  EXPECT(moe_fast::candidate_keeps_k(2, 2) && !moe_fast::candidate_keeps_k(1, 2));
  EXPECT(moe_fast::candidate_drops_within_rank(6, 8, 4, 2) && !moe_fast::candidate_drops_within_rank(5, 8, 4, 2));
}

// Logits for comparing the CPU levels: random, with ties, NaN, +-inf, -0, all--inf and all-NaN
// rows, and rows whose gap to the top lies exactly on a skip threshold (see skip_border_gaps).
std::vector<float> adversarial_logits(int64_t T, int32_t E, uint32_t seed) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int> small(-2, 2), pick(0, 15);
  std::vector<float> x(static_cast<size_t>(T) * E);
  for (int64_t t = 0; t < T; ++t) {
    const int kind = pick(rng);
    for (int32_t e = 0; e < E; ++e) {
      float v = kind < 6 ? normal(rng) : static_cast<float>(small(rng));  // kinds 6+: many ties
      const int special = pick(rng);
      if (kind >= 10 && special == 0) v = nan;
      if (kind >= 10 && special == 1) v = -inf;
      if (kind >= 10 && special == 2) v = inf;
      if (kind >= 10 && special == 3) v = -0.0f;
      if (kind == 14) v = -inf;
      if (kind == 15) v = (e % 2 == 0) ? nan : -inf;
      x[static_cast<size_t>(t) * E + e] = v;
    }
  }
  return x;
}

// Gaps that some rows meet exactly: l_0 - l_j in float64 of the first row with finite logits
// (the skip test is strict, so that slot stays), and one a hair below it (that slot goes).
std::vector<double> skip_border_gaps(const std::vector<float>& x, int32_t E, int32_t k, bool just_below) {
  std::vector<double> gaps(k, 1.0);
  gaps[0] = std::numeric_limits<double>::infinity();
  std::vector<float> row(x.begin(), x.begin() + E);
  for (float& v : row) v = std::isfinite(v) ? v : -1e30f;
  std::sort(row.begin(), row.end(), std::greater<float>());
  for (int32_t j = 1; j < k; ++j) {
    const double gap = static_cast<double>(row[0]) - static_cast<double>(row[j]);
    gaps[j] = just_below ? std::nextafter(gap, 0.0) : gap;
  }
  return gaps;
}

uint16_t to_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return static_cast<uint16_t>(u >> 16);  // truncation: any bf16 pattern will do
}

uint16_t to_fp16_bits(float v) {  // round toward zero, with inf/NaN/overflow; enough for a test
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  if (v != v) return static_cast<uint16_t>(sign | 0x7E00u);
  const float a = std::fabs(v);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7C00u);
  if (a < 6.1035156e-05f) return static_cast<uint16_t>(sign | static_cast<uint16_t>(a / 5.9604645e-08f));
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
  return static_cast<uint16_t>(sign | (exp << 10) | ((u >> 13) & 0x3FFu));
}

int64_t ulp_distance(float a, float b) {
  auto ordered = [](float v) {
    int32_t i;
    std::memcpy(&i, &v, sizeof(i));
    return i < 0 ? static_cast<int64_t>(INT32_MIN) - i : static_cast<int64_t>(i);
  };
  return std::llabs(ordered(a) - ordered(b));
}

// route_rows at every level against the scalar code: the same ids, weights within 2 ulps, for
// every dtype, E, k, skip and renormalize setting, keep mask, and token range (unaligned ones too).
void test_route_levels_agree() {
  using moe_fast::cpu::CpuLevel;
  EXPECT(moe_fast::cpu::cpu_level_supported(CpuLevel::Default));
  if (!moe_fast::cpu::cpu_level_supported(CpuLevel::Avx2)) {
    std::printf("test_route_levels_agree: this build or CPU has no AVX2 kernel; skipped\n");
    return;
  }
  int64_t worst_ulps = 0, cases = 0;
  const int32_t experts[] = {1, 2, 3, 7, 8, 9, 16, 60, 64, 256};
  for (const int32_t E : experts) {
    const int64_t T = E >= 64 ? 45 : 203;
    const std::vector<float> x = adversarial_logits(T, E, static_cast<uint32_t>(E));
    std::vector<uint16_t> xb(x.size()), xh(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      xb[i] = to_bf16_bits(x[i]);
      xh[i] = to_fp16_bits(x[i]);
    }
    std::vector<uint8_t> keep(E, 1);
    for (int32_t e = 0; e < E; e += 3) keep[e] = 0;
    for (int32_t k = 1; k <= std::min(8, E); ++k) {
      const bool can_mask = moe_fast::count_nonzero(keep.data(), E) >= k;
      const std::vector<double> border = skip_border_gaps(x, E, k, false), below = skip_border_gaps(x, E, k, true);
      const std::vector<double> half(k, -std::log(0.5));
      for (int variant = 0; variant < 16; ++variant) {
        const int dtype = variant % 3;
        const int skip = (variant / 3) % 4;  // none, 0.5, exactly at a border, just below it
        RouteArgs a;
        a.num_tokens = T;
        a.num_experts = E;
        a.top_k = k;
        a.renormalize = (variant & 1) == 0;
        a.skip_gap = skip == 1 ? half.data() : skip == 2 ? border.data() : skip == 3 ? below.data() : nullptr;
        a.keep = (variant >= 8 && can_mask) ? keep.data() : nullptr;
        const void* src = dtype == 0 ? static_cast<const void*>(x.data())
                                     : dtype == 1 ? static_cast<const void*>(xb.data()) : xh.data();
        const DType dt = dtype == 0 ? DType::Float32 : dtype == 1 ? DType::BFloat16 : DType::Float16;
        std::vector<float> w0(T * k, -1.f), w1(T * k, -2.f);
        std::vector<int32_t> i0(T * k, -1), i1(T * k, -2);
        const int64_t cut = 1 + variant % 13;  // two ranges, the first unaligned
        for (const CpuLevel level : {CpuLevel::Default, CpuLevel::Avx2}) {
          float* w = level == CpuLevel::Default ? w0.data() : w1.data();
          int32_t* id = level == CpuLevel::Default ? i0.data() : i1.data();
          moe_fast::cpu::route_rows_at(level, dt, src, a, 0, cut, w, id);
          moe_fast::cpu::route_rows_at(level, dt, src, a, cut, T, w, id);
        }
        ++cases;
        bool same_ids = true;
        for (int64_t s = 0; s < T * k; ++s) {
          same_ids = same_ids && i0[s] == i1[s];
          worst_ulps = std::max(worst_ulps, ulp_distance(w0[s], w1[s]));
        }
        if (!same_ids) std::fprintf(stderr, "levels differ in ids: E=%d k=%d variant=%d\n", E, k, variant);
        EXPECT(same_ids);
      }
    }
  }
  EXPECT(worst_ulps <= 2);
  std::printf("test_route_levels_agree: %lld cases, weights within %lld ulps\n", static_cast<long long>(cases),
              static_cast<long long>(worst_ulps));
}

// Routes float32 logits [T, E] with the general CPU kernel (cpu::route_spec); gaps [k] may be null.
Routed route_spec_float32(const std::vector<float>& logits, int64_t T, moe_fast::RouteSpecArgs a, int32_t E,
                          int32_t k, const double* gaps) {
  a.route.num_tokens = T;
  a.route.num_experts = E;
  a.route.top_k = k;
  a.route.skip_gap = gaps;
  Routed r{std::vector<float>(T * k), std::vector<int32_t>(T * k), std::vector<int32_t>(E),
           std::vector<int32_t>(E + 1), std::vector<int32_t>(T * k)};
  const char* err = moe_fast::cpu::route_spec(DType::Float32, logits.data(), a, r.w.data(), r.ids.data(),
                                              r.counts.data(), r.offsets.data(), r.perm.data());
  EXPECT(err == nullptr);
  return r;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

void test_route_spec_groups_and_bias() {
  // E = 4 in groups {0, 1} and {2, 3}, one eligible group, k = 1. Scores s = sigmoid(l):
  // group 0 scores s(2) + s(-3) = 0.928 < group 1's 2 s(1) = 1.462, so expert 2 (the tie with 3
  // goes to the lower index) although expert 0 scores best.
  const std::vector<float> logits = {2.0f, -3.0f, 1.0f, 1.0f};
  moe_fast::RouteSpecArgs a;
  a.scoring = moe_fast::Scoring::Sigmoid;
  a.n_group = 2;
  a.topk_group = 1;
  Routed r = route_spec_float32(logits, 1, a, 4, 1, nullptr);
  EXPECT(r.ids[0] == 2 && r.w[0] == 1.0f);
  // Without groups expert 0 wins.
  moe_fast::RouteSpecArgs flat = a;
  flat.n_group = 1;
  flat.topk_group = 1;
  r = route_spec_float32(logits, 1, flat, 4, 1, nullptr);
  EXPECT(r.ids[0] == 0);
  // A bias of 0.5 on expert 3 picks it (group 1 still wins); its weight is its unbiased score
  // times the scaling (no renormalizing).
  const float bias[4] = {0.0f, 0.0f, 0.0f, 0.5f};
  a.selection_bias = bias;
  a.route.renormalize = false;
  a.scaling = 2.0f;
  r = route_spec_float32(logits, 1, a, 4, 1, nullptr);
  EXPECT(r.ids[0] == 3 && near(r.w[0], 2.0 * sigmoid(1.0), 1e-6));
  // A bias of 1.0 on expert 1 lifts group 0 to s(2) + s(-3) + 1 = 1.928 and picks expert 1 by
  // biased score (1.047 > 0.881), weighted s(-3) before renormalizing: k = 2 gives experts 1, 0.
  const float bias1[4] = {0.0f, 1.0f, 0.0f, 0.0f};
  a.selection_bias = bias1;
  a.route.renormalize = true;
  a.scaling = 1.0f;
  r = route_spec_float32(logits, 1, a, 4, 2, nullptr);
  EXPECT(r.ids[0] == 1 && r.ids[1] == 0);
  const double total = sigmoid(-3.0) + sigmoid(2.0);
  EXPECT(near(r.w[0], sigmoid(-3.0) / total, 1e-6) && near(r.w[1], sigmoid(2.0) / total, 1e-6));
  EXPECT(r.counts[0] == 1 && r.counts[1] == 1 && r.offsets[2] == 2 && r.perm[0] == 1 && r.perm[1] == 0);
}

void test_route_spec_masked_group_and_skip() {
  // E = 4, groups {0, 1} {2, 3}; expert 2 masked: group 1 scores s(3) alone (0.953) against
  // group 0's s(0) + s(-1) = 0.769, so expert 3 first; then the other group fills slot 1 with
  // expert 0, whose s(0) / s(3) = 0.525 is below beta = 0.6: skipped.
  const std::vector<float> logits = {0.0f, -1.0f, 5.0f, 3.0f};
  const uint8_t keep[4] = {1, 1, 0, 1};
  moe_fast::RouteSpecArgs a;
  a.scoring = moe_fast::Scoring::Sigmoid;
  a.n_group = 2;
  a.topk_group = 1;
  a.route.keep = keep;
  const double gaps[2] = {std::numeric_limits<double>::infinity(), -std::log(0.6)};
  Routed r = route_spec_float32(logits, 1, a, 4, 2, gaps);
  EXPECT(r.ids[0] == 3 && r.ids[1] == 4 && near(r.w[0], 1.0, 1e-6) && r.w[1] == 0.0f);
  EXPECT(r.offsets[4] == 1 && r.perm[1] == 1);
  r = route_spec_float32(logits, 1, a, 4, 2, nullptr);
  EXPECT(r.ids[0] == 3 && r.ids[1] == 0);
}

void test_route_spec_fills_from_ineligible_groups_by_index() {
  // E = 4 in groups {0, 1} {2, 3}, one eligible group, k = 3 > its 2 experts. Group 1 scores
  // s(2) + s(1) = 1.612 > group 0's s(-1) + s(3) = 1.222, so experts 2, 3 first; the third slot is
  // filled as transformers' -inf mask makes it: by index among the ineligible, expert 0 (not
  // expert 1, whose score is larger). Weights: the unbiased scores, renormalized.
  const std::vector<float> logits = {-1.0f, 3.0f, 2.0f, 1.0f};
  moe_fast::RouteSpecArgs a;
  a.scoring = moe_fast::Scoring::Sigmoid;
  a.n_group = 2;
  a.topk_group = 1;
  Routed r = route_spec_float32(logits, 1, a, 4, 3, nullptr);
  EXPECT(r.ids[0] == 2 && r.ids[1] == 3 && r.ids[2] == 0);
  const double total = sigmoid(2.0) + sigmoid(1.0) + sigmoid(-1.0);
  EXPECT(near(r.w[0], sigmoid(2.0) / total, 1e-6) && near(r.w[2], sigmoid(-1.0) / total, 1e-6));
  // k = E: every expert, the ineligible ones last in index order.
  r = route_spec_float32(logits, 1, a, 4, 4, nullptr);
  EXPECT(r.ids[0] == 2 && r.ids[1] == 3 && r.ids[2] == 0 && r.ids[3] == 1);
}

void test_route_spec_softmax_topk_and_scaling() {
  // softmax over the 2 chosen logits only (2 and 1), times 1.5: expert 3 (logit 0) is ignored.
  const std::vector<float> logits = {1.0f, 2.0f, -4.0f, 0.0f};
  moe_fast::RouteSpecArgs a;
  a.scoring = moe_fast::Scoring::SoftmaxTopK;
  a.route.renormalize = false;
  a.scaling = 1.5f;
  const Routed r = route_spec_float32(logits, 1, a, 4, 2, nullptr);
  const double w0 = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT(r.ids[0] == 1 && r.ids[1] == 0);
  EXPECT(near(r.w[0], 1.5 * w0, 1e-6) && near(r.w[1], 1.5 * (1.0 - w0), 1e-6));
}

void test_route_spec_checks_its_limits() {
  moe_fast::RouteSpecArgs a;
  a.route.num_tokens = 1;
  a.route.num_experts = 8;
  a.route.top_k = 2;
  EXPECT(moe_fast::validate_route_spec(a) == nullptr);
  a.scoring = moe_fast::Scoring::Sigmoid;
  a.n_group = 3;  // does not divide 8
  a.topk_group = 1;
  EXPECT(moe_fast::validate_route_spec(a) != nullptr);
  a.n_group = 8;  // one eligible group of one expert < k: the other groups fill the slots
  EXPECT(moe_fast::validate_route_spec(a) == nullptr);
  a.topk_group = 2;
  EXPECT(moe_fast::validate_route_spec(a) == nullptr);
  a.scoring = moe_fast::Scoring::Softmax;  // groups need sigmoid
  EXPECT(moe_fast::validate_route_spec(a) != nullptr);
  a.n_group = a.topk_group = 1;
  a.scaling = 0.0f;
  EXPECT(moe_fast::validate_route_spec(a) != nullptr);
  // cpu::route_spec reports a non-finite bias before writing anything (outputs null here).
  a.scaling = 1.0f;
  a.scoring = moe_fast::Scoring::Sigmoid;
  const float bias[8] = {0, 0, 0, std::numeric_limits<float>::infinity(), 0, 0, 0, 0};
  a.selection_bias = bias;
  const float logits[8] = {};
  EXPECT(moe_fast::cpu::route_spec(DType::Float32, logits, a, nullptr, nullptr, nullptr, nullptr, nullptr) != nullptr);
}

void test_route_keys_and_group_rules() {
  // Lower tier first, then larger value (-0 == +0), then lower index.
  EXPECT(moe_fast::route_key(0, -5.0f, 7) > moe_fast::route_key(1, 5.0f, 0));
  EXPECT(moe_fast::route_key(0, 0.0f, 1) > moe_fast::route_key(0, -0.0f, 2));
  EXPECT(moe_fast::route_key(0, -0.0f, 1) > moe_fast::route_key(0, 0.0f, 2));
  EXPECT(moe_fast::route_key(2, -std::numeric_limits<float>::infinity(), 255) != 0);
  EXPECT(moe_fast::route_key_expert(moe_fast::route_key(1, 0.25f, 200)) == 200);
  EXPECT(moe_fast::route_key_value(moe_fast::route_key(1, -0.25f, 200)) == -0.25f);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT(moe_fast::group_score(0.5f, -inf) == 0.5f && moe_fast::group_score(-inf, -inf) == -inf);
  // Scores 1, 3, 3, 2 with 2 eligible: groups 1 and 2 (the tie keeps both, then 3 is out).
  const float scores[4] = {1.0f, 3.0f, 3.0f, 2.0f};
  EXPECT(!moe_fast::group_is_eligible(scores, 4, 0, 2) && moe_fast::group_is_eligible(scores, 4, 1, 2));
  EXPECT(moe_fast::group_is_eligible(scores, 4, 2, 2) && !moe_fast::group_is_eligible(scores, 4, 3, 2));
}

}  // namespace

// subset_loss with a routing descriptor, worked by hand: E = 4, k = 2, M = 3, one token with logits
// (2, 1, 0, -1), an identity Gram and a zero layer-wise target, so a candidate's error is the sum
// of its squared weights.
double subset_loss_one(moe_fast::SubsetLossArgs a, const std::vector<int32_t>& ids, const uint8_t* keep) {
  static const std::vector<float> logits = {2.0f, 1.0f, 0.0f, -1.0f};
  static const std::vector<float> gram = {1.0f, 0.0f, 0.0f, 1.0f, 0.0f, 1.0f};
  static const std::vector<float> tw = {0.0f, 0.0f, 0.0f};
  a.num_tokens = 1;
  a.num_experts = 4;
  a.rank = 3;
  a.top_k = 2;
  a.gram = gram.data();
  a.ids = ids.data();
  a.logits = logits.data();
  a.target_weights = tw.data();
  const int64_t group[1] = {0};
  double out[1] = {-1.0};
  if (moe_fast::cpu::subset_loss(a, keep, 1, group, 1, out) != nullptr) return -1.0;
  return out[0];
}

void test_subset_loss_descriptors() {
  const auto sig = [](double l) { return 1.0 / (1.0 + std::exp(-l)); };
  const uint8_t all[4] = {1, 1, 1, 1}, no3[4] = {1, 1, 1, 0}, no0[4] = {0, 1, 1, 1};
  // Sigmoid, bias (0, 0, 0, 2): biased scores rank expert 3 first, then 0, 1: ids (3, 0, 1).
  // Weights: the unbiased scores of the chosen two, renormalized, times scaling 2.
  const float bias[4] = {0.0f, 0.0f, 0.0f, 2.0f};
  moe_fast::SubsetLossArgs a;
  a.scoring = moe_fast::Scoring::Sigmoid;
  a.selection_bias = bias;
  a.scaling = 2.0;
  const auto renorm_sq = [](double x, double y) { return 4.0 * (x * x + y * y) / ((x + y) * (x + y)); };
  EXPECT(near(subset_loss_one(a, {3, 0, 1}, all), renorm_sq(sig(-1), sig(2)), 1e-6));   // experts 3, 0
  EXPECT(near(subset_loss_one(a, {3, 0, 1}, no3), renorm_sq(sig(2), sig(1)), 1e-6));    // experts 0, 1
  EXPECT(near(subset_loss_one(a, {3, 0, 1}, no0), renorm_sq(sig(-1), sig(1)), 1e-6));   // experts 3, 1
  // Without renormalize: the scores themselves, times 2.
  a.renormalize = false;
  EXPECT(near(subset_loss_one(a, {3, 0, 1}, all), 4.0 * (sig(-1) * sig(-1) + sig(2) * sig(2)), 1e-6));
  // The logit order is not the biased order: rejected.
  EXPECT(subset_loss_one(a, {0, 1, 2}, all) == -1.0);
  // softmax_topk (no bias, scaling 1): ids by logit (0, 1, 2); softmax of the chosen two logits.
  moe_fast::SubsetLossArgs t;
  t.scoring = moe_fast::Scoring::SoftmaxTopK;
  t.renormalize = false;
  const double p = 1.0 / (1.0 + std::exp(-1.0));  // softmax of (l, l - 1)
  EXPECT(near(subset_loss_one(t, {0, 1, 2}, all), p * p + (1 - p) * (1 - p), 1e-6));
  EXPECT(near(subset_loss_one(t, {0, 1, 2}, no0), p * p + (1 - p) * (1 - p), 1e-6));  // experts 1, 2
  // Softmax with scaling 3, renormalized: the same weights times 3.
  moe_fast::SubsetLossArgs m;
  m.scaling = 3.0;
  EXPECT(near(subset_loss_one(m, {0, 1, 2}, all), 9.0 * (p * p + (1 - p) * (1 - p)), 1e-6));
  // Limits: a bias needs sigmoid; scaling finite and > 0; a finite bias.
  t.selection_bias = bias;
  EXPECT(moe_fast::validate_subset_loss(t, 1, 1) != nullptr);
  m.scaling = 0.0;
  EXPECT(moe_fast::validate_subset_loss(m, 1, 1) != nullptr);
  const float inf_bias[4] = {0.0f, 0.0f, 0.0f, std::numeric_limits<float>::infinity()};
  a.selection_bias = inf_bias;
  EXPECT(subset_loss_one(a, {3, 0, 1}, all) == -1.0);
}

int main() {
  test_route_levels_agree();
  test_route_slot_weights();
  test_candidate_rules();
  test_expert_gram_target_with_zero_hidden();
  test_route_checks_its_limits();
  test_skip_gaps_from_beta();
  test_ranked_rows();
  test_subset_loss_checks_its_limits();
  test_gram_index_packing();
  test_route_top2_with_skip();
  test_route_ties_mask_and_degenerate_rows();
  test_bf16_and_fp16_conversion();
  test_subset_loss_against_brute_force();
  test_route_keys_and_group_rules();
  test_route_spec_checks_its_limits();
  test_route_spec_groups_and_bias();
  test_route_spec_masked_group_and_skip();
  test_route_spec_fills_from_ineligible_groups_by_index();
  test_route_spec_softmax_topk_and_scaling();
  test_subset_loss_descriptors();
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("all C++ kernel tests passed\n");
  return EXIT_SUCCESS;
}
