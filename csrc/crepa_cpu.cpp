// The fused CPU kernel: parallel over token columns (b, n).
//
// A token's [F, D] column of proj and of target is converted once into an fp32 (fp64) scratch that stays in cache;
// every norm, dot and gradient row of that token is then computed from the scratch, so each pass reads its inputs
// from memory once. Rows are padded with zeros to a multiple of kLanes so that the inner loops carry kLanes
// independent accumulators with no tail: the compiler vectorises them without reassociating floating-point sums.
//
// Determinism: the loss is summed per fixed block of kTokensPerBlock tokens into a [B, blocks, F] buffer, then
// over blocks in order, so the result does not depend on how at::parallel_for splits the work.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "crepa_ops.h"

namespace crepa {
namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kMaxRows = 4;  // rows per fused pass: 4 x 8 accumulators fit the vector registers
constexpr int64_t kTokensPerBlock = 16;
constexpr int64_t kBackwardGrain = 8;  // columns per task; a column is F * D elements of work

int64_t padded(int64_t d) { return (d + kLanes - 1) / kLanes * kLanes; }

// Dot products of `a` with up to kMaxRows rows in one pass; n is a multiple of kLanes (rows are zero-padded).
// Each product keeps kLanes independent accumulators, summed in a fixed tree.
template <int M, typename T>
void dots_with(const T* __restrict a, const T* const* rows, T* out, int64_t n) {
  T lanes[M][kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int m = 0; m < M; ++m) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[m][l] += a[i + l] * rows[m][i + l];
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {
      for (int64_t l = 0; l < width; ++l) lanes[m][l] += lanes[m][l + width];
    }
    out[m] = lanes[m][0];
  }
}

// out (+)= sum_m coefficients[m] rows[m], up to kMaxRows rows in one pass.
template <int M, typename T>
void combine_rows(const T* const* rows, const T* coefficients, bool accumulate, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      T sum = accumulate ? out[i + l] : T(0);
      for (int m = 0; m < M; ++m) sum += coefficients[m] * rows[m][i + l];
      out[i + l] = sum;
    }
  }
}

// Any number of rows, kMaxRows at a time (the order of the sums is fixed by `count`).
template <typename T>
void dots(const T* a, const T* const* rows, int64_t count, T* out, int64_t n) {
  for (int64_t first = 0; first < count; first += kMaxRows) {
    switch (std::min<int64_t>(count - first, kMaxRows)) {
      case 1: dots_with<1>(a, rows + first, out + first, n); break;
      case 2: dots_with<2>(a, rows + first, out + first, n); break;
      case 3: dots_with<3>(a, rows + first, out + first, n); break;
      default: dots_with<4>(a, rows + first, out + first, n); break;
    }
  }
}

template <typename T>
void combine(const T* const* rows, const T* coefficients, int64_t count, T* out, int64_t n) {
  for (int64_t first = 0; first < count; first += kMaxRows) {
    const bool accumulate = first > 0;
    switch (std::min<int64_t>(count - first, kMaxRows)) {
      case 1: combine_rows<1>(rows + first, coefficients + first, accumulate, out, n); break;
      case 2: combine_rows<2>(rows + first, coefficients + first, accumulate, out, n); break;
      case 3: combine_rows<3>(rows + first, coefficients + first, accumulate, out, n); break;
      default: combine_rows<4>(rows + first, coefficients + first, accumulate, out, n); break;
    }
  }
}

// The [B, F, N, D] geometry of one input, by raw pointer and element strides.
struct Strided {
  const void* data;
  int64_t stride[4];
};

Strided strided(const at::Tensor& x) {
  return Strided{x.data_ptr(), {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}};
}

template <typename acc_t>
using ColumnLoader = void (*)(const Strided& x, int64_t b, int64_t n, int64_t frames, int64_t d, int64_t dp,
                              acc_t* dst);

// Column (b, n) of x -> dst [frames][dp], converted to acc_t, zero beyond d.
template <typename scalar_t, typename acc_t>
void load_column(const Strided& x, int64_t b, int64_t n, int64_t frames, int64_t d, int64_t dp, acc_t* dst) {
  const scalar_t* column = static_cast<const scalar_t*>(x.data) + b * x.stride[0] + n * x.stride[2];
  const int64_t d_stride = x.stride[3];
  for (int64_t f = 0; f < frames; ++f) {
    const scalar_t* __restrict row = column + f * x.stride[1];
    acc_t* __restrict out = dst + f * dp;
    if (d_stride == 1) {
      for (int64_t i = 0; i < d; ++i) out[i] = static_cast<acc_t>(row[i]);
    } else {
      for (int64_t i = 0; i < d; ++i) out[i] = static_cast<acc_t>(row[i * d_stride]);
    }
    for (int64_t i = d; i < dp; ++i) out[i] = acc_t(0);
  }
}

template <typename acc_t>
ColumnLoader<acc_t> column_loader(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &load_column<float, acc_t>;
    case at::kDouble: return &load_column<double, acc_t>;
    case at::kBFloat16: return &load_column<at::BFloat16, acc_t>;
    case at::kHalf: return &load_column<at::Half, acc_t>;
    default: TORCH_CHECK(false, "crepa_kernels: unsupported dtype ", dtype);
  }
}

template <typename acc_t>
using RowStorer = void (*)(const acc_t* src, void* data, int64_t offset, int64_t d);

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* __restrict src, void* data, int64_t offset, int64_t d) {
  scalar_t* __restrict out = static_cast<scalar_t*>(data) + offset;
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<scalar_t>(src[i]);
}

template <typename acc_t>
RowStorer<acc_t> row_storer(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &store_row<float, acc_t>;
    case at::kDouble: return &store_row<double, acc_t>;
    case at::kBFloat16: return &store_row<at::BFloat16, acc_t>;
    case at::kHalf: return &store_row<at::Half, acc_t>;
    default: TORCH_CHECK(false, "crepa_kernels: unsupported dtype ", dtype);
  }
}

template <typename acc_t>
std::vector<acc_t> coefficient_table(const Band& band, double tau, bool normalize_weights) {
  std::vector<acc_t> table(band.frames * band.width());
  for (int64_t f = 0; f < band.frames; ++f) {
    for (int64_t slot = 0; slot < band.width(); ++slot) {
      table[f * band.width() + slot] = frame_coefficient<acc_t>(band, f, slot, static_cast<acc_t>(tau), normalize_weights);
    }
  }
  return table;
}

template <typename acc_t>
void forward_kernel(const at::Tensor& proj, const at::Tensor& target, const Band& band, double tau,
                    bool normalize_weights, double eps_double, at::Tensor& loss, at::Tensor& stats_tensor) {
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2), D = proj.size(3);
  const int64_t dp = padded(D), W = band.width(), S = band.stats_per_frame();
  const int64_t blocks = (N + kTokensPerBlock - 1) / kTokensPerBlock;
  const acc_t eps = static_cast<acc_t>(eps_double);
  const std::vector<acc_t> coefficients = coefficient_table<acc_t>(band, tau, normalize_weights);
  const Strided p_view = strided(proj), y_view = strided(target);
  const ColumnLoader<acc_t> load_p = column_loader<acc_t>(proj.scalar_type());
  const ColumnLoader<acc_t> load_y = column_loader<acc_t>(target.scalar_type());
  acc_t* stats = stats_tensor.data_ptr<acc_t>();
  at::Tensor partial_tensor = new_buffer({B, blocks, F}, stats_tensor.options());
  acc_t* partials = partial_tensor.data_ptr<acc_t>();

  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * F * dp);
    acc_t* P = scratch.data();
    acc_t* Y = P + F * dp;
    std::vector<const acc_t*> partners(W + 1);  // p_f, then the y rows of the landing slots
    std::vector<int64_t> landing(W);
    std::vector<acc_t> results(W + 1);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t b = block / blocks;
      const int64_t first = (block % blocks) * kTokensPerBlock;
      const int64_t last = std::min(N, first + kTokensPerBlock);
      acc_t* block_sum = partials + block * F;
      for (int64_t f = 0; f < F; ++f) block_sum[f] = acc_t(0);
      for (int64_t n = first; n < last; ++n) {
        load_p(p_view, b, n, F, D, dp, P);
        load_y(y_view, b, n, F, D, dp, Y);
        acc_t* token = stats + (b * N + n) * F * S;
        for (int64_t f = 0; f < F; ++f) {
          // one pass for |p_f|^2 and every dot of p_f; then |y_f|^2
          acc_t* row = token + f * S;
          const acc_t* p_f = P + f * dp;
          int64_t count = 0;
          partners[count++] = p_f;
          for (int64_t slot = 0; slot < W; ++slot) {
            row[kFirstDot + slot] = acc_t(0);
            if (band.lands(f, slot)) {
              landing[count - 1] = slot;
              partners[count++] = Y + (f + band.offset(slot)) * dp;
            }
          }
          dots(p_f, partners.data(), count, results.data(), dp);
          row[kProjNorm] = sqrt_of(results[0]);
          for (int64_t c = 1; c < count; ++c) row[kFirstDot + landing[c - 1]] = results[c];
          const acc_t* y_f = Y + f * dp;
          acc_t y_squared;
          dots(y_f, &y_f, 1, &y_squared, dp);
          row[kTargetNorm] = sqrt_of(y_squared);
        }
        for (int64_t f = 0; f < F; ++f) block_sum[f] += frame_similarity(token, coefficients.data(), band, f, eps);
      }
    }
  });

  // Second stage, in a fixed order and in double (N / kTokensPerBlock terms): L[b, f] = -(1/N) sum over blocks.
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
void backward_kernel(const at::Tensor& grad_loss_tensor, const at::Tensor& proj, const at::Tensor& target,
                     const at::Tensor& stats_tensor, const Band& band, double tau, bool normalize_weights,
                     double eps_double, at::Tensor& grad_proj, at::Tensor* grad_target) {
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2), D = proj.size(3);
  const int64_t dp = padded(D), W = band.width(), S = band.stats_per_frame();
  const acc_t eps = static_cast<acc_t>(eps_double);
  const acc_t scale = acc_t(-1) / static_cast<acc_t>(N);
  const std::vector<acc_t> coefficients = coefficient_table<acc_t>(band, tau, normalize_weights);
  const Strided p_view = strided(proj), y_view = strided(target);
  const ColumnLoader<acc_t> load_p = column_loader<acc_t>(proj.scalar_type());
  const ColumnLoader<acc_t> load_y = column_loader<acc_t>(target.scalar_type());
  const RowStorer<acc_t> store_p = row_storer<acc_t>(grad_proj.scalar_type());
  const RowStorer<acc_t> store_y = grad_target ? row_storer<acc_t>(grad_target->scalar_type()) : nullptr;
  void* grad_p_data = grad_proj.data_ptr();
  void* grad_y_data = grad_target ? grad_target->data_ptr() : nullptr;
  const acc_t* stats = stats_tensor.data_ptr<acc_t>();
  const acc_t* grad_loss = grad_loss_tensor.data_ptr<acc_t>();

  at::parallel_for(0, B * N, kBackwardGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * F * dp + dp);
    acc_t* P = scratch.data();
    acc_t* Y = P + F * dp;
    acc_t* out = Y + F * dp;
    std::vector<const acc_t*> rows(W + 1);  // the row itself, then the landing partner rows
    std::vector<acc_t> weights(W + 1);
    for (int64_t column = begin; column < end; ++column) {
      const int64_t b = column / N, n = column % N;
      load_p(p_view, b, n, F, D, dp, P);
      load_y(y_view, b, n, F, D, dp, Y);
      const acc_t* token = stats + column * F * S;
      const acc_t* grad_row = grad_loss + b * F;
      for (int64_t f = 0; f < F; ++f) {
        int64_t count = 0;
        rows[count] = P + f * dp;
        weights[count++] = -proj_self_coefficient(token, coefficients.data(), grad_row, band, f, scale, eps);
        for (int64_t slot = 0; slot < W; ++slot) {
          if (!band.lands(f, slot)) continue;
          rows[count] = Y + (f + band.offset(slot)) * dp;
          weights[count++] = proj_direct_coefficient(token, coefficients.data(), grad_row, band, f, slot, scale, eps);
        }
        combine(rows.data(), weights.data(), count, out, dp);
        store_p(out, grad_p_data, ((b * F + f) * N + n) * D, D);
      }
      if (!grad_target) continue;
      for (int64_t k = 0; k < F; ++k) {
        int64_t count = 0;
        rows[count] = Y + k * dp;
        weights[count++] = -target_self_coefficient(token, coefficients.data(), grad_row, band, k, scale, eps);
        for (int64_t slot = 0; slot < W; ++slot) {
          if (!target_slot_lands(band, k, slot)) continue;
          rows[count] = P + (k - band.offset(slot)) * dp;
          weights[count++] =
              target_direct_coefficient(token, coefficients.data(), grad_row, band, k, slot, scale, eps);
        }
        combine(rows.data(), weights.data(), count, out, dp);
        store_y(out, grad_y_data, ((b * F + k) * N + n) * D, D);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> align_forward_cpu(const at::Tensor& proj, const at::Tensor& target,
                                                     int64_t neighbors, bool cumulative, double tau,
                                                     bool normalize_weights, double eps) {
  check_inputs(proj, target, neighbors, tau, eps);
  TORCH_CHECK(proj.device().is_cpu(), "align_forward_cpu: expected CPU tensors");
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2);
  const Band band = Band::make(F, neighbors, cumulative);
  const auto options = proj.options().dtype(accumulate_type(proj, target));
  at::Tensor loss = new_buffer({B, F}, options);
  at::Tensor stats = new_buffer({B, N, F, band.stats_per_frame()}, options);
  if (options.dtype() == at::kDouble) {
    forward_kernel<double>(proj, target, band, tau, normalize_weights, eps, loss, stats);
  } else {
    forward_kernel<float>(proj, target, band, tau, normalize_weights, eps, loss, stats);
  }
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> align_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& proj,
                                                      const at::Tensor& target, const at::Tensor& stats,
                                                      int64_t neighbors, bool cumulative, double tau,
                                                      bool normalize_weights, double eps, bool needs_target_grad) {
  check_inputs(proj, target, neighbors, tau, eps);
  TORCH_CHECK(proj.device().is_cpu(), "align_backward_cpu: expected CPU tensors");
  const Band band = Band::make(proj.size(1), neighbors, cumulative);
  check_backward_inputs(grad_loss, proj, target, stats, band);
  const auto acc = accumulate_type(proj, target);
  // [B, F] is tiny; the mean reduction hands it over expanded (stride 0).
  const at::Tensor grad = grad_loss.to(acc).contiguous();
  at::Tensor grad_proj = new_buffer(proj.sizes(), proj.options());
  at::Tensor grad_target = needs_target_grad
                               ? new_buffer(target.sizes(), target.options())
                               : at::empty({0}, target.options());
  at::Tensor* grad_target_ptr = needs_target_grad ? &grad_target : nullptr;
  if (acc == at::kDouble) {
    backward_kernel<double>(grad, proj, target, stats, band, tau, normalize_weights, eps, grad_proj, grad_target_ptr);
  } else {
    backward_kernel<float>(grad, proj, target, stats, band, tau, normalize_weights, eps, grad_proj, grad_target_ptr);
  }
  return {grad_proj, grad_target};
}

}  // namespace crepa
