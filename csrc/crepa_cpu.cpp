// The fused CPU kernel: parallel over token columns (b, n).
//
// A token column is the F rows p[b, :, n] and y[b, :, n] (2 F D values, 80 KB at F=13, D=768 in fp32): it stays
// in L2 while every norm, dot and gradient row of the token is computed from it, so each pass reads its inputs
// from memory once. Rows already in the accumulation dtype with a unit feature stride are used in place; other
// rows (bf16, fp16, mixed or strided inputs) are converted once into a per-thread scratch. The next column's 2 F
// rows (2 F separate memory streams) are prefetched while the current one is computed.
//
// Inner loops keep kLanes independent accumulators per product (no reassociation needed to vectorise them, so the
// order of every sum is fixed) and handle any D with a short tail. They are compiled twice: for the baseline ISA
// (SSE2 on x86-64, so a built wheel runs anywhere) and for AVX2 + FMA, chosen at run time from the CPU's features.
//
// Determinism: the loss is summed per fixed block of kTokensPerBlock tokens into a [B, blocks, F] buffer, then
// over blocks in order; gradients are per column. Nothing depends on which thread computes which chunk.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "crepa_ops.h"

#if defined(__GNUC__) || defined(__clang__)
#define CREPA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CREPA_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CREPA_AVX2_PATH 1
#define CREPA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define CREPA_AVX2_PATH 0
#endif

namespace crepa {
namespace {

constexpr int64_t kLanes = 8;
constexpr int kMaxRows = 4;  // rows per fused pass: their accumulators and coefficients stay in registers
constexpr int64_t kTokensPerBlock = 16;
constexpr int64_t kForwardChunk = 1;   // token blocks per chunk of work handed out
constexpr int64_t kBackwardChunk = 8;  // token columns per chunk; a column is 2 F D elements of work
constexpr int64_t kCacheLine = 64;

// ---------------------------------------------------------------------------------------------------- elements

template <typename acc_t, typename scalar_t>
CREPA_ALWAYS_INLINE acc_t widen(scalar_t x) {
  return static_cast<acc_t>(x);
}

// Same rounding as c10's float -> bfloat16 (nearest even); a double goes through float first, as in c10.
template <typename scalar_t, typename acc_t>
CREPA_ALWAYS_INLINE scalar_t narrow(acc_t x) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
    return scalar_t(static_cast<float>(x));
  } else {
    return static_cast<scalar_t>(x);
  }
}

template <typename acc_t>
constexpr at::ScalarType scalar_type_of() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------------- row maths

// kLanes values of T as one vector (GCC/clang vector extension): two SSE registers in the baseline build, one AVX
// register in the AVX2 build for fp32.
template <typename T>
struct LaneVector {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};

// out[m] = a . rows[m] for M rows in one pass over a: kLanes independent accumulators per product (whole vectors,
// then a tail of fewer than kLanes elements), summed in a fixed tree at the end. With kSquare, also
// *square = rows[1] . rows[1] from the same loads, in the same lane order as a pass of its own would use.
template <int M, bool kSquare, typename T>
CREPA_ALWAYS_INLINE void dots_with(const T* __restrict a, const T* const* rows, T* out, T* square, int64_t n) {
  static_assert(!kSquare || M >= 2, "the square is of rows[1]");
  constexpr int kSums = M + (kSquare ? 1 : 0);  // the square's accumulator is the last
  using Vector = typename LaneVector<T>::type;
  const T* __restrict r[M];
  for (int m = 0; m < M; ++m) r[m] = rows[m];
  Vector sums[kSums] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    Vector x, y;
    std::memcpy(&x, a + i, sizeof(x));  // unaligned vector loads
    for (int m = 0; m < M; ++m) {
      std::memcpy(&y, r[m] + i, sizeof(y));
      sums[m] += x * y;
      if (kSquare && m == 1) sums[M] += y * y;
    }
  }
  T lanes[kSums][kLanes];
  std::memcpy(lanes, sums, sizeof(lanes));
  for (int64_t l = 0; l < n - body; ++l) {
    for (int m = 0; m < M; ++m) lanes[m][l] += a[body + l] * r[m][body + l];
    if (kSquare) lanes[M][l] += r[1][body + l] * r[1][body + l];
  }
  for (int m = 0; m < kSums; ++m) {
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {
      for (int64_t l = 0; l < width; ++l) lanes[m][l] += lanes[m][l + width];
    }
    if (m < M) out[m] = lanes[m][0];
  }
  if (kSquare) *square = lanes[M][0];
}

// Any number of rows, kMaxRows at a time (the grouping, and so every sum, is fixed by `count`).
template <typename T>
CREPA_ALWAYS_INLINE void dots(const T* a, const T* const* rows, int64_t count, T* out, int64_t n) {
  for (int64_t first = 0; first < count; first += kMaxRows) {
    switch (std::min<int64_t>(count - first, kMaxRows)) {
      case 1: dots_with<1, false>(a, rows + first, out + first, static_cast<T*>(nullptr), n); break;
      case 2: dots_with<2, false>(a, rows + first, out + first, static_cast<T*>(nullptr), n); break;
      case 3: dots_with<3, false>(a, rows + first, out + first, static_cast<T*>(nullptr), n); break;
      default: dots_with<4, false>(a, rows + first, out + first, static_cast<T*>(nullptr), n); break;
    }
  }
}

// dots(), plus *square = rows[1] . rows[1] computed in the first group's pass (count >= 2): the forward's |y_f|^2
// without a pass of its own over y_f. Same groups and sums as dots() followed by dots(rows[1], &rows[1], 1).
template <typename T>
CREPA_ALWAYS_INLINE void dots_and_square(const T* a, const T* const* rows, int64_t count, T* out, T* square,
                                         int64_t n) {
  switch (std::min<int64_t>(count, kMaxRows)) {
    case 2: dots_with<2, true>(a, rows, out, square, n); break;
    case 3: dots_with<3, true>(a, rows, out, square, n); break;
    default: dots_with<4, true>(a, rows, out, square, n); break;
  }
  if (count > kMaxRows) dots(a, rows + kMaxRows, count - kMaxRows, out + kMaxRows, n);
}

// out = [partial +] sum_m coefficients[m] rows[m], narrowed to out_t on the way out.
template <int M, typename T, typename out_t>
CREPA_ALWAYS_INLINE void combine_rows(const T* const* rows, const T* coefficients, const T* __restrict partial,
                                      out_t* __restrict out, int64_t n) {
  const T* __restrict r[M];
  T c[M];
  for (int m = 0; m < M; ++m) r[m] = rows[m], c[m] = coefficients[m];
  for (int64_t i = 0; i < n; ++i) {
    T sum = partial ? partial[i] : T(0);
    for (int m = 0; m < M; ++m) sum += c[m] * r[m][i];
    out[i] = narrow<out_t>(sum);
  }
}

template <typename T, typename out_t>
CREPA_ALWAYS_INLINE void combine_group(const T* const* rows, const T* coefficients, int64_t count, const T* partial,
                                       out_t* out, int64_t n) {
  switch (count) {
    case 1: combine_rows<1>(rows, coefficients, partial, out, n); break;
    case 2: combine_rows<2>(rows, coefficients, partial, out, n); break;
    case 3: combine_rows<3>(rows, coefficients, partial, out, n); break;
    default: combine_rows<4>(rows, coefficients, partial, out, n); break;
  }
}

// out = sum_m coefficients[m] rows[m] over any number of rows: groups of kMaxRows summed in order into two acc_t
// scratch rows used in turn (so no pass reads and writes the same row), the last group written to the output.
template <typename T, typename out_t>
CREPA_ALWAYS_INLINE void combine(const T* const* rows, const T* coefficients, int64_t count, T* const partials[2],
                                 out_t* out, int64_t n) {
  int64_t first = 0;
  const T* carried = nullptr;
  for (int group = 0; count - first > kMaxRows; first += kMaxRows, ++group) {
    combine_group(rows + first, coefficients + first, kMaxRows, carried, partials[group % 2], n);
    carried = partials[group % 2];
  }
  combine_group(rows + first, coefficients + first, count - first, carried, out, n);
}

// ---------------------------------------------------------------------------------------------------- columns

// The [B, F, N, D] geometry of one tensor, by raw pointer and element strides.
struct Strided {
  void* data;
  at::ScalarType dtype;
  int64_t element_size;
  int64_t stride[4];
};

Strided strided(const at::Tensor& x) {
  return Strided{x.data_ptr(), x.scalar_type(), static_cast<int64_t>(x.element_size()),
                 {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}};
}

int64_t element_offset(const Strided& x, int64_t b, int64_t f, int64_t n) {
  return b * x.stride[0] + f * x.stride[1] + n * x.stride[2];
}

template <typename scalar_t, typename acc_t>
CREPA_ALWAYS_INLINE void convert_rows(const Strided& x, int64_t b, int64_t n, int64_t frames, int64_t d,
                                      acc_t* scratch, int64_t pitch, const acc_t** rows) {
  const int64_t d_stride = x.stride[3];
  for (int64_t f = 0; f < frames; ++f) {
    const scalar_t* __restrict source = static_cast<const scalar_t*>(x.data) + element_offset(x, b, f, n);
    acc_t* __restrict row = scratch + f * pitch;
    if (d_stride == 1) {
      for (int64_t i = 0; i < d; ++i) row[i] = widen<acc_t>(source[i]);
    } else {
      for (int64_t i = 0; i < d; ++i) row[i] = widen<acc_t>(source[i * d_stride]);
    }
    rows[f] = row;
  }
}

// rows[f] -> row f of column (b, n) as acc_t: in place when the input already is acc_t with unit feature stride,
// else converted into scratch [frames][pitch].
template <typename acc_t>
CREPA_ALWAYS_INLINE void column_rows(const Strided& x, int64_t b, int64_t n, int64_t frames, int64_t d,
                                     acc_t* scratch, int64_t pitch, const acc_t** rows) {
  if (x.dtype == scalar_type_of<acc_t>() && x.stride[3] == 1) {
    const acc_t* data = static_cast<const acc_t*>(x.data);
    for (int64_t f = 0; f < frames; ++f) rows[f] = data + element_offset(x, b, f, n);
    return;
  }
  switch (x.dtype) {
    case at::kFloat: return convert_rows<float>(x, b, n, frames, d, scratch, pitch, rows);
    case at::kDouble: return convert_rows<double>(x, b, n, frames, d, scratch, pitch, rows);
    case at::kBFloat16: return convert_rows<at::BFloat16>(x, b, n, frames, d, scratch, pitch, rows);
    default: return convert_rows<at::Half>(x, b, n, frames, d, scratch, pitch, rows);
  }
}

// Starts loading row f of column (b, n) into the caches (rows with a unit feature stride only).
CREPA_ALWAYS_INLINE void prefetch_row(const Strided& x, int64_t b, int64_t f, int64_t n, int64_t d) {
  if (x.stride[3] != 1) return;
  const char* row = static_cast<const char*>(x.data) + element_offset(x, b, f, n) * x.element_size;
  for (int64_t byte = 0; byte < d * x.element_size; byte += kCacheLine) __builtin_prefetch(row + byte, 0, 3);
}

// Row pitch of the conversion scratch: whole cache lines, so no two rows share one.
template <typename acc_t>
int64_t scratch_pitch(int64_t d) {
  const int64_t per_line = kCacheLine / int64_t(sizeof(acc_t));
  return (d + per_line - 1) / per_line * per_line;
}

// ---------------------------------------------------------------------------------------------------- work

// Hands out [begin, end) chunks of [0, total) to whichever thread asks next. Splitting the range evenly up front
// (at::parallel_for) made a call as slow as its slowest thread: on a shared machine, one thread descheduled for a
// time slice held up half the work while the other thread waited. Each chunk writes only its own outputs, so the
// results do not depend on which thread takes which chunk.
class WorkQueue {
 public:
  WorkQueue(int64_t total, int64_t chunk) : total_(total), chunk_(chunk) {}

  bool take(int64_t& begin, int64_t& end) {
    begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (begin >= total_) return false;
    end = std::min(total_, begin + chunk_);
    return true;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t total_, chunk_;
};

// Runs `work` once on each of at::parallel_for's threads (once, inline, when called from inside a parallel region).
template <typename Work>
void run_on_every_thread(const Work& work) {
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { work(); });
}

// ---------------------------------------------------------------------------------------------------- forward

template <typename acc_t>
struct ForwardArgs {
  Strided proj, target;
  Band band;
  int64_t tokens, dim, blocks;
  acc_t eps;
  const acc_t* coefficients;
  acc_t* stats;     // [B, N, F, S]
  acc_t* partials;  // [B, blocks, F]
};

// Token blocks of the flattened (b, block) range, a chunk at a time from the queue: stats of each token, and each
// block's sum of the tokens' frame similarities.
template <typename acc_t>
CREPA_ALWAYS_INLINE void forward_blocks(const ForwardArgs<acc_t>& a, WorkQueue& queue) {
  const Band& band = a.band;
  const int64_t F = band.frames, D = a.dim, W = band.width(), S = band.stats_per_frame();
  const int64_t pitch = scratch_pitch<acc_t>(D);
  std::vector<acc_t> scratch(2 * F * pitch);
  std::vector<const acc_t*> p_rows(F), y_rows(F), partners(W + 1);  // partners: p_f, then the landing y rows
  std::vector<int64_t> landing(W);
  std::vector<acc_t> results(W + 1);
  for (int64_t begin, end; queue.take(begin, end);) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t b = block / a.blocks;
      const int64_t first = (block % a.blocks) * kTokensPerBlock;
      const int64_t last = std::min(a.tokens, first + kTokensPerBlock);
      acc_t* block_sum = a.partials + block * F;
      for (int64_t f = 0; f < F; ++f) block_sum[f] = acc_t(0);
      for (int64_t n = first; n < last; ++n) {
        column_rows(a.proj, b, n, F, D, scratch.data(), pitch, p_rows.data());
        column_rows(a.target, b, n, F, D, scratch.data() + F * pitch, pitch, y_rows.data());
        // the next token of this range (the next block's first one at the end of a block)
        const int64_t next_b = n + 1 < a.tokens ? b : b + 1, next_n = n + 1 < a.tokens ? n + 1 : 0;
        const bool prefetch = next_b * a.blocks + (next_n / kTokensPerBlock) < end;
        acc_t* token = a.stats + (b * a.tokens + n) * F * S;
        for (int64_t f = 0; f < F; ++f) {
          if (prefetch) {
            prefetch_row(a.proj, next_b, f, next_n, D);
            prefetch_row(a.target, next_b, f, next_n, D);
          }
          // one pass for |p_f|^2, every dot of p_f and |y_f|^2: slot 0 (offset 0) always lands, so partner 1 is y_f
          acc_t* row = token + f * S;
          int64_t count = 0;
          partners[count++] = p_rows[f];
          for (int64_t slot = 0; slot < W; ++slot) {
            row[kFirstDot + slot] = acc_t(0);
            if (band.lands(f, slot)) {
              landing[count - 1] = slot;
              partners[count++] = y_rows[f + band.offset(slot)];
            }
          }
          acc_t y_squared;
          dots_and_square(p_rows[f], partners.data(), count, results.data(), &y_squared, D);
          row[kProjNorm] = sqrt_of(results[0]);
          for (int64_t c = 1; c < count; ++c) row[kFirstDot + landing[c - 1]] = results[c];
          row[kTargetNorm] = sqrt_of(y_squared);
        }
        for (int64_t f = 0; f < F; ++f) block_sum[f] += frame_similarity(token, a.coefficients, band, f, a.eps);
      }
    }
  }
}

template <typename acc_t>
void forward_blocks_baseline(const ForwardArgs<acc_t>& a, WorkQueue& queue) {
  forward_blocks(a, queue);
}

#if CREPA_AVX2_PATH
template <typename acc_t>
CREPA_TARGET_AVX2 void forward_blocks_avx2(const ForwardArgs<acc_t>& a, WorkQueue& queue) {
  forward_blocks(a, queue);
}
#endif

// ---------------------------------------------------------------------------------------------------- backward

template <typename acc_t>
struct BackwardArgs {
  Strided proj, target, grad_proj, grad_target;
  Band band;
  int64_t tokens, dim;
  bool needs_proj_grad, needs_target_grad;
  acc_t eps, scale;
  const acc_t* coefficients;
  const acc_t* stats;
  const acc_t* grad_loss;  // [B, F]
};

// Row f of a gradient, = sum_m coefficients[m] rows[m], written in the gradient's dtype (gradients are contiguous).
template <typename acc_t>
CREPA_ALWAYS_INLINE void write_gradient_row(const Strided& grad, int64_t b, int64_t f, int64_t n, int64_t d,
                                            const acc_t* const* rows, const acc_t* coefficients, int64_t count,
                                            acc_t* const partials[2]) {
  const int64_t offset = element_offset(grad, b, f, n);
  switch (grad.dtype) {
    case at::kFloat: return combine(rows, coefficients, count, partials, static_cast<float*>(grad.data) + offset, d);
    case at::kDouble: return combine(rows, coefficients, count, partials, static_cast<double*>(grad.data) + offset, d);
    case at::kBFloat16:
      return combine(rows, coefficients, count, partials, static_cast<at::BFloat16*>(grad.data) + offset, d);
    default: return combine(rows, coefficients, count, partials, static_cast<at::Half*>(grad.data) + offset, d);
  }
}

// Token columns of the flattened (b, n) range, a chunk at a time from the queue: their rows of grad_proj and
// grad_target.
template <typename acc_t>
CREPA_ALWAYS_INLINE void backward_columns(const BackwardArgs<acc_t>& a, WorkQueue& queue) {
  const Band& band = a.band;
  const int64_t F = band.frames, D = a.dim, W = band.width(), S = band.stats_per_frame(), N = a.tokens;
  const int64_t pitch = scratch_pitch<acc_t>(D);
  std::vector<acc_t> scratch(2 * F * pitch + 2 * pitch);
  acc_t* const partials[2] = {scratch.data() + 2 * F * pitch, scratch.data() + (2 * F + 1) * pitch};
  std::vector<const acc_t*> p_rows(F), y_rows(F), rows(W + 1);  // rows: the row itself, then its landing partners
  std::vector<acc_t> weights(W + 1);
  for (int64_t begin, end; queue.take(begin, end);) {
    for (int64_t column = begin; column < end; ++column) {
      const int64_t b = column / N, n = column % N;
      column_rows(a.proj, b, n, F, D, scratch.data(), pitch, p_rows.data());
      column_rows(a.target, b, n, F, D, scratch.data() + F * pitch, pitch, y_rows.data());
      const bool prefetch = column + 1 < end;
      const int64_t next_b = (column + 1) / N, next_n = (column + 1) % N;
      const acc_t* token = a.stats + column * F * S;
      const acc_t* grad_row = a.grad_loss + b * F;
      for (int64_t f = 0; f < F; ++f) {
        if (prefetch) {
          prefetch_row(a.proj, next_b, f, next_n, D);
          prefetch_row(a.target, next_b, f, next_n, D);
        }
        if (a.needs_proj_grad) {
          // grad p_f = -self p_f + sum_slot direct y_{f+o}
          int64_t count = 0;
          rows[count] = p_rows[f];
          weights[count++] = -proj_self_coefficient(token, a.coefficients, grad_row, band, f, a.scale, a.eps);
          for (int64_t slot = 0; slot < W; ++slot) {
            if (!band.lands(f, slot)) continue;
            rows[count] = y_rows[f + band.offset(slot)];
            weights[count++] = proj_direct_coefficient(token, a.coefficients, grad_row, band, f, slot, a.scale, a.eps);
          }
          write_gradient_row(a.grad_proj, b, f, n, D, rows.data(), weights.data(), count, partials);
        }
        if (a.needs_target_grad) {
          // grad y_f = -self y_f + sum_slot direct p_{f-o}
          int64_t count = 0;
          rows[count] = y_rows[f];
          weights[count++] = -target_self_coefficient(token, a.coefficients, grad_row, band, f, a.scale, a.eps);
          for (int64_t slot = 0; slot < W; ++slot) {
            if (!target_slot_lands(band, f, slot)) continue;
            rows[count] = p_rows[f - band.offset(slot)];
            weights[count++] =
                target_direct_coefficient(token, a.coefficients, grad_row, band, f, slot, a.scale, a.eps);
          }
          write_gradient_row(a.grad_target, b, f, n, D, rows.data(), weights.data(), count, partials);
        }
      }
    }
  }
}

template <typename acc_t>
void backward_columns_baseline(const BackwardArgs<acc_t>& a, WorkQueue& queue) {
  backward_columns(a, queue);
}

#if CREPA_AVX2_PATH
template <typename acc_t>
CREPA_TARGET_AVX2 void backward_columns_avx2(const BackwardArgs<acc_t>& a, WorkQueue& queue) {
  backward_columns(a, queue);
}
#endif

// ---------------------------------------------------------------------------------------------------- dispatch

std::atomic<bool> baseline_forced{false};

bool use_avx2() {
#if CREPA_AVX2_PATH
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported && !baseline_forced.load();
#else
  return false;
#endif
}

template <typename acc_t>
void forward_kernel(const at::Tensor& proj, const at::Tensor& target, const at::Tensor& coefficients,
                    const Band& band, double eps, at::Tensor& loss, at::Tensor& stats) {
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2);
  const int64_t blocks = (N + kTokensPerBlock - 1) / kTokensPerBlock;
  at::Tensor partial_tensor = new_buffer({B, blocks, F}, stats.options());
  const ForwardArgs<acc_t> args{strided(proj), strided(target), band, N, proj.size(3), blocks,
                                static_cast<acc_t>(eps), coefficients.data_ptr<acc_t>(), stats.data_ptr<acc_t>(),
                                partial_tensor.data_ptr<acc_t>()};
  auto* blocks_of = &forward_blocks_baseline<acc_t>;
#if CREPA_AVX2_PATH
  if (use_avx2()) blocks_of = &forward_blocks_avx2<acc_t>;
#endif
  WorkQueue queue(B * blocks, kForwardChunk);
  run_on_every_thread([&] { blocks_of(args, queue); });

  // Second stage, in a fixed order and in double (N / kTokensPerBlock terms): L[b, f] = -(1/N) sum over blocks.
  const acc_t* partials = args.partials;
  acc_t* out = loss.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      double sum = 0.0;
      for (int64_t block = 0; block < blocks; ++block) sum += partials[(b * blocks + block) * F + f];
      out[b * F + f] = static_cast<acc_t>(-sum / static_cast<double>(N));
    }
  }
}

template <typename acc_t>
void backward_kernel(const at::Tensor& grad_loss, const at::Tensor& proj, const at::Tensor& target,
                     const at::Tensor& stats, const at::Tensor& coefficients, const Band& band, double eps,
                     at::Tensor& grad_proj, at::Tensor& grad_target, bool needs_proj_grad, bool needs_target_grad) {
  const int64_t B = proj.size(0), N = proj.size(2);
  const BackwardArgs<acc_t> args{strided(proj), strided(target),
                                 needs_proj_grad ? strided(grad_proj) : Strided{},
                                 needs_target_grad ? strided(grad_target) : Strided{},
                                 band, N, proj.size(3), needs_proj_grad, needs_target_grad,
                                 static_cast<acc_t>(eps), acc_t(-1) / static_cast<acc_t>(N),
                                 coefficients.data_ptr<acc_t>(),
                                 stats.data_ptr<acc_t>(), grad_loss.data_ptr<acc_t>()};
  auto* columns_of = &backward_columns_baseline<acc_t>;
#if CREPA_AVX2_PATH
  if (use_avx2()) columns_of = &backward_columns_avx2<acc_t>;
#endif
  WorkQueue queue(B * N, kBackwardChunk);
  run_on_every_thread([&] { columns_of(args, queue); });
}

}  // namespace

void set_cpu_baseline_forced(bool forced) { baseline_forced.store(forced); }

std::string cpu_kernel_isa() { return use_avx2() ? "avx2" : "baseline"; }

namespace {

std::tuple<at::Tensor, at::Tensor> align_forward_cpu(const at::Tensor& proj, const at::Tensor& target,
                                                     const at::Tensor& coefficients, int64_t neighbors,
                                                     bool cumulative, double eps) {
  check_inputs(proj, target, neighbors, eps);
  TORCH_CHECK(proj.device().is_cpu(), "align_forward_cpu: expected CPU tensors");
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2);
  const Band band = Band::make(F, neighbors, cumulative);
  const auto acc = accumulate_type(proj, target);
  check_coefficients(coefficients, proj, band, acc);
  const auto options = proj.options().dtype(acc);
  at::Tensor loss = new_buffer({B, F}, options);
  at::Tensor stats = new_buffer({B, N, F, band.stats_per_frame()}, options);
  if (acc == at::kDouble) {
    forward_kernel<double>(proj, target, coefficients, band, eps, loss, stats);
  } else {
    forward_kernel<float>(proj, target, coefficients, band, eps, loss, stats);
  }
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> align_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& proj,
                                                      const at::Tensor& target, const at::Tensor& stats,
                                                      const at::Tensor& coefficients, int64_t neighbors,
                                                      bool cumulative, double eps, bool needs_proj_grad,
                                                      bool needs_target_grad) {
  check_inputs(proj, target, neighbors, eps);
  TORCH_CHECK(proj.device().is_cpu(), "align_backward_cpu: expected CPU tensors");
  const Band band = Band::make(proj.size(1), neighbors, cumulative);
  check_backward_inputs(grad_loss, proj, target, stats, band);
  const auto acc = accumulate_type(proj, target);
  check_coefficients(coefficients, proj, band, acc);
  // [B, F] is tiny; the mean reduction hands it over expanded (stride 0).
  const at::Tensor grad = grad_loss.to(acc).contiguous();
  auto [grad_proj, grad_target] = new_gradients(proj, target, needs_proj_grad, needs_target_grad);
  if (!needs_proj_grad && !needs_target_grad) return {grad_proj, grad_target};
  if (acc == at::kDouble) {
    backward_kernel<double>(grad, proj, target, stats, coefficients, band, eps, grad_proj, grad_target,
                            needs_proj_grad, needs_target_grad);
  } else {
    backward_kernel<float>(grad, proj, target, stats, coefficients, band, eps, grad_proj, grad_target,
                           needs_proj_grad, needs_target_grad);
  }
  return {grad_proj, grad_target};
}

}  // namespace
}  // namespace crepa

TORCH_LIBRARY_IMPL(crepa_kernels, CPU, m) {
  m.impl("align_forward", &crepa::align_forward_cpu);
  m.impl("align_backward", &crepa::align_backward_cpu);
}
