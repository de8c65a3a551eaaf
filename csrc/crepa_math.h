// The per-token maths of the CREPA loss, written once for the CPU and the CUDA kernels.
//
// Both kernels reduce a token column (b, n) to "stats": per frame f, the raw norms |p_f|, |y_f| and the dots
// p_f . y_{f+o} for each slot of the frame's band (slot 0 is o = 0, then spec.LossOptions.offsets in increasing
// order). Everything below is scalar maths on those stats, so the CPU tests cover the CUDA kernel's formulas.
//
//   cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps))          (F.normalize; the clamped norm is a constant)
//   C[f][slot] = the coefficient table the caller passes in (crepa_kernels.spec.coefficient_table, [F][W] in the
//                accumulation dtype): 1/Z_f for slot 0, w(|o_slot|)/Z_f for a neighbour, 0 where f + o_slot is
//                outside [0, F). The kernels only read it: no weight, exponential or Z_f is computed here.
//   L[b, f]   = -(1/N) sum_n sum_slot C[f][slot] cos(p_f, y_{f+o_slot})
//   alpha     = -grad_L[b, f] C[f][slot] / N
//   grad p_f  = sum_slot alpha y_k / (np_f ny_k) - [|p_f| > eps] (sum_slot alpha cos_fk) p_f / np_f^2
//   grad y_k  = sum_{(f, slot): f + o = k} alpha p_f / (np_f ny_k) - [|y_k| > eps] (same sum of alpha cos) y_k / ny_k^2
// The indicator uses >, as autograd of clamp_min does (torch passes no gradient at |x| = eps exactly).
//
// Tiny eps (spec.check_eps_for_dtype keeps eps >= the smallest normal): a product of two clamped norms is at least
// eps^2, which underflows below sqrt(smallest normal) (fp32: eps < 1.1e-19, fp64: eps < 1.5e-154) and reaches 0
// near eps = 3.7e-23 (fp32). divide_by_norms then divides by the norms in turn, so a zero vector's cosine is
// 0 / eps / eps = 0 as in the reference, and a pair of two vectors inside the clamp gets no gradient coefficient
// (pair_gradient_coefficient): alpha / eps^2 would overflow, and inf times a zero vector is NaN. Vectors inside the
// clamp then have squared norms below the smallest normal, under what the kernels resolve (they accumulate raw norms
// and dots; the reference normalises first), as are live vectors whose squared norm is not normal: the radial
// term's |p|^2 is that square. For normal eps nothing changes, bit for bit. The Triton kernels reach the same
// results their own way (ops/triton_loss.py).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CREPA_HD __host__ __device__ __forceinline__
#else
#define CREPA_HD inline
#endif

namespace crepa {

// Layout of a frame's stats row: [|p_f|, |y_f|, dot slot 0, dot slot 1, ...].
constexpr int64_t kProjNorm = 0;
constexpr int64_t kTargetNorm = 1;
constexpr int64_t kFirstDot = 2;

CREPA_HD float sqrt_of(float x) { return sqrtf(x); }
CREPA_HD double sqrt_of(double x) { return sqrt(x); }
CREPA_HD float smallest_normal(float) { return FLT_MIN; }
CREPA_HD double smallest_normal(double) { return DBL_MIN; }

// Which frame offsets k - f a frame looks at. `reach` is the largest |offset| that can land inside [0, frames).
struct Band {
  int64_t frames;
  int64_t reach;
  bool cumulative;

  CREPA_HD static Band make(int64_t frames, int64_t neighbors, bool cumulative) {
    int64_t reach = 0;
    if (cumulative) {
      reach = neighbors < frames - 1 ? neighbors : frames - 1;
    } else if (neighbors > 0 && neighbors < frames) {
      reach = neighbors;
    }
    return Band{frames, reach, cumulative};
  }

  // Slots per frame: the frame itself plus its neighbour offsets.
  CREPA_HD int64_t width() const {
    if (reach == 0) return 1;
    return cumulative ? 1 + 2 * reach : 3;
  }

  CREPA_HD int64_t stats_per_frame() const { return kFirstDot + width(); }

  // Offset of a slot: 0, then -reach..-1, 1..reach (cumulative) or -reach, +reach (adjacent).
  CREPA_HD int64_t offset(int64_t slot) const {
    if (slot == 0) return 0;
    if (!cumulative) return slot == 1 ? -reach : reach;
    return slot <= reach ? slot - reach - 1 : slot - reach;
  }

  CREPA_HD bool lands(int64_t frame, int64_t slot) const {
    const int64_t k = frame + offset(slot);
    return k >= 0 && k < frames;
  }
};

template <typename T>
CREPA_HD T clamped_norm(T raw_norm, T eps) {
  return raw_norm > eps ? raw_norm : eps;
}

// d max(|x|, eps) / d|x|: zero where the clamp holds the norm constant, and at |x| = eps (as torch's clamp_min).
template <typename T>
CREPA_HD bool norm_is_live(T raw_norm, T eps) {
  return raw_norm > eps;
}

// x / (a b) for clamped norms a, b: one division while the product is a normal number (every call for eps above
// sqrt(smallest normal)); else one norm at a time, so that an underflowed product cannot turn 0 into 0 / 0.
template <typename T>
CREPA_HD T divide_by_norms(T x, T a, T b) {
  const T product = a * b;
  return product >= smallest_normal(product) ? x / product : x / a / b;
}

// alpha / (max(|p|, eps) max(|y|, eps)): the coefficient of y in grad p and of p in grad y. A pair whose norms are
// both clamped while eps^2 underflows contributes 0 (see the top of this file).
template <typename T>
CREPA_HD T pair_gradient_coefficient(T alpha, T raw_p, T raw_y, T eps) {
  if (!norm_is_live(raw_p, eps) && !norm_is_live(raw_y, eps) && eps * eps < smallest_normal(eps)) return T(0);
  return divide_by_norms(alpha, clamped_norm(raw_p, eps), clamped_norm(raw_y, eps));
}

// Per-token helpers. `stats` is one token's [frames][stats_per_frame] block, `coefficients` the [frames][width]
// table C (see the top of this file), `grad_loss` the [frames] row of grad_L for the token's batch element,
// `scale` = -1/N.

template <typename T>
CREPA_HD T slot_cosine(const T* stats, const Band& band, int64_t frame, int64_t slot, T eps) {
  const int64_t row = band.stats_per_frame();
  const int64_t k = frame + band.offset(slot);
  const T np = clamped_norm(stats[frame * row + kProjNorm], eps);
  const T ny = clamped_norm(stats[k * row + kTargetNorm], eps);
  return divide_by_norms(stats[frame * row + kFirstDot + slot], np, ny);
}

// sum_slot C[f][slot] cos(p_f, y_{f+o}): this token's share of -N L[b, f].
template <typename T>
CREPA_HD T frame_similarity(const T* stats, const T* coefficients, const Band& band, int64_t frame, T eps) {
  T similarity = T(0);
  for (int64_t slot = 0; slot < band.width(); ++slot) {
    if (band.lands(frame, slot)) {
      similarity += coefficients[frame * band.width() + slot] * slot_cosine(stats, band, frame, slot, eps);
    }
  }
  return similarity;
}

template <typename T>
CREPA_HD T slot_alpha(const T* coefficients, const T* grad_loss, const Band& band, int64_t frame, int64_t slot,
                      T scale) {
  return scale * grad_loss[frame] * coefficients[frame * band.width() + slot];
}

// grad p_f = sum_slot proj_direct_coefficient(slot) y_{f+o_slot} - proj_self_coefficient p_f
template <typename T>
CREPA_HD T proj_direct_coefficient(const T* stats, const T* coefficients, const T* grad_loss, const Band& band,
                                   int64_t frame, int64_t slot, T scale, T eps) {
  if (!band.lands(frame, slot)) return T(0);
  const int64_t row = band.stats_per_frame();
  const int64_t k = frame + band.offset(slot);
  return pair_gradient_coefficient(slot_alpha(coefficients, grad_loss, band, frame, slot, scale),
                                   stats[frame * row + kProjNorm], stats[k * row + kTargetNorm], eps);
}

template <typename T>
CREPA_HD T proj_self_coefficient(const T* stats, const T* coefficients, const T* grad_loss, const Band& band,
                                 int64_t frame, T scale, T eps) {
  const T raw = stats[frame * band.stats_per_frame() + kProjNorm];
  if (!norm_is_live(raw, eps)) return T(0);
  T alpha_cos = T(0);
  for (int64_t slot = 0; slot < band.width(); ++slot) {
    if (band.lands(frame, slot)) {
      alpha_cos += slot_alpha(coefficients, grad_loss, band, frame, slot, scale) *
                   slot_cosine(stats, band, frame, slot, eps);
    }
  }
  const T np = clamped_norm(raw, eps);
  return alpha_cos / (np * np);
}

// grad y_k = sum_slot target_direct_coefficient(slot) p_{k-o_slot} - target_self_coefficient y_k: slot `slot` of
// frame f = k - o_slot is the pair that reads y_k.
CREPA_HD bool target_slot_lands(const Band& band, int64_t k, int64_t slot) {
  const int64_t frame = k - band.offset(slot);
  return frame >= 0 && frame < band.frames;
}

template <typename T>
CREPA_HD T target_direct_coefficient(const T* stats, const T* coefficients, const T* grad_loss, const Band& band,
                                     int64_t k, int64_t slot, T scale, T eps) {
  if (!target_slot_lands(band, k, slot)) return T(0);
  const int64_t row = band.stats_per_frame();
  const int64_t frame = k - band.offset(slot);
  return pair_gradient_coefficient(slot_alpha(coefficients, grad_loss, band, frame, slot, scale),
                                   stats[frame * row + kProjNorm], stats[k * row + kTargetNorm], eps);
}

template <typename T>
CREPA_HD T target_self_coefficient(const T* stats, const T* coefficients, const T* grad_loss, const Band& band,
                                   int64_t k, T scale, T eps) {
  const T raw = stats[k * band.stats_per_frame() + kTargetNorm];
  if (!norm_is_live(raw, eps)) return T(0);
  T alpha_cos = T(0);
  for (int64_t slot = 0; slot < band.width(); ++slot) {
    if (target_slot_lands(band, k, slot)) {
      const int64_t frame = k - band.offset(slot);
      alpha_cos += slot_alpha(coefficients, grad_loss, band, frame, slot, scale) *
                   slot_cosine(stats, band, frame, slot, eps);
    }
  }
  const T ny = clamped_norm(raw, eps);
  return alpha_cos / (ny * ny);
}

}  // namespace crepa
