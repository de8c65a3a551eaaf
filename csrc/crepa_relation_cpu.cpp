// The token relation distillation (TRD) loss on CPU: blocks of rows i against every j, no [T, T] buffer.
//
//   relation_cpu(proj, target, key_weight, frame_weight, pairs, margin, eps, want_loss, grad_proj, grad_target)
//       -> (per_frame_loss [B, F] or [0], grad_proj or [0], grad_target or [0])
//
// proj, target: [B, F, N, D], any strides, floating dtypes; T = F N tokens per sample, frame-major.
// key_weight [T]: a[j], how often token j counts as a j (1 without anchors). frame_weight [B, F]: w per frame of
// the gradient, which is that of sum_{b,f} w[b,f] L[b,f]. Both in the accumulation dtype (fp64 if an input is,
// else fp32), as are the loss and the arithmetic (the loss sums run in fp64); gradients come back in their
// input's dtype.
//
// With p^, y^ the unit rows, delta_ij = p^_i.p^_j - y^_i.y^_j and g_ij = sign(delta_ij) [|delta_ij| > margin]:
//   L[b, f] = sum_{i in f} sum_{j counted} a_j relu(|delta_ij| - margin)
//   dL/dp^_k = sum_{j: pair rule} g_kj (w_k a_j + w_j a_k) p^_j       (dL/dy^_k: the same with -y^_j)
// The second weight term is the k-as-column half of the sum; with a = 1 everywhere the two halves fold into one
// pass over j. Then the chain through the normalisation, as the CREPA kernels do: J(x)^T u = (u - x^ (x^.u)) / |x|,
// or u / eps where the norm is clamped.
//
// One task per (sample, block of rows) owns its output rows and loops over j in a fixed order: no atomics, the
// result does not depend on the thread count. Per task it holds three [BI, BJ] tiles and two [BI, D] gradient
// accumulators; the tile products are BLAS (ATen's mm, single-threaded inside the parallel region).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "crepa_ops.h"

namespace crepa {
namespace {

constexpr int64_t kRowBlock = 128;
constexpr int64_t kKeyBlock = 512;

enum class Pairs { kAll, kSpatial, kTemporal };

Pairs parse_pairs(c10::string_view pairs) {
  if (pairs == "all") return Pairs::kAll;
  if (pairs == "spatial") return Pairs::kSpatial;
  if (pairs == "temporal") return Pairs::kTemporal;
  TORCH_CHECK_VALUE(false, "pairs: expected 'all', 'spatial' or 'temporal', got '", std::string(pairs), "'");
}

inline bool pair_counts(Pairs pairs, int64_t frame_i, int64_t frame_j) {
  if (pairs == Pairs::kAll) return true;
  return (frame_i == frame_j) == (pairs == Pairs::kSpatial);
}

// sign(delta) [|delta| > margin], NaN for a NaN delta (so a NaN input is not hidden by the comparisons)
template <typename scalar_t>
inline scalar_t gradient_sign(scalar_t delta, scalar_t margin) {
  if (std::isnan(delta)) return delta;
  if (delta > margin) return scalar_t(1);
  if (delta < -margin) return scalar_t(-1);
  return scalar_t(0);
}

// out[b, i0 + ii] = J(x)^T u[ii] = (u - x^ (x^ . u)) / |x|, or u / eps where the norm is clamped
template <typename scalar_t>
void chain_rows(const at::Tensor& u_rows, const at::Tensor& unit, const at::Tensor& norm, at::Tensor& out,
                int64_t b, int64_t i0, int64_t bi, scalar_t eps) {
  const int64_t T = unit.size(1), D = unit.size(2);
  const scalar_t* u_all = u_rows.data_ptr<scalar_t>();
  const scalar_t* x_all = unit.data_ptr<scalar_t>() + (b * T + i0) * D;
  const scalar_t* n_all = norm.data_ptr<scalar_t>() + b * T + i0;
  scalar_t* o_all = out.data_ptr<scalar_t>() + (b * T + i0) * D;
  for (int64_t ii = 0; ii < bi; ++ii) {
    const scalar_t* u = u_all + ii * D;
    const scalar_t* x = x_all + ii * D;
    scalar_t* o = o_all + ii * D;
    const scalar_t n = n_all[ii];
    if (n > eps) {
      scalar_t along = 0;
      for (int64_t d = 0; d < D; ++d) along += x[d] * u[d];
      for (int64_t d = 0; d < D; ++d) o[d] = (u[d] - x[d] * along) / n;
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = u[d] / eps;
    }
  }
}

template <typename scalar_t>
void run(const at::Tensor& p_hat, const at::Tensor& y_hat, const at::Tensor& p_norm, const at::Tensor& y_norm,
         const at::Tensor& key_weight, const at::Tensor& frame_weight, Pairs pairs, double margin_d, double eps_d,
         int64_t F, int64_t N, at::Tensor* row_loss, at::Tensor* grad_p, at::Tensor* grad_y) {
  const int64_t B = p_hat.size(0), T = p_hat.size(1), D = p_hat.size(2);
  const bool any_grad = grad_p != nullptr || grad_y != nullptr;
  const scalar_t margin = static_cast<scalar_t>(margin_d), eps = static_cast<scalar_t>(eps_d);
  const scalar_t* a = key_weight.data_ptr<scalar_t>();
  const scalar_t* w = any_grad ? frame_weight.data_ptr<scalar_t>() : nullptr;
  const int64_t blocks = (T + kRowBlock - 1) / kRowBlock;

  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks;
      const int64_t i0 = (task % blocks) * kRowBlock, bi = std::min(kRowBlock, T - i0);
      const at::Tensor p_rows = p_hat[b].narrow(0, i0, bi), y_rows = y_hat[b].narrow(0, i0, bi);
      at::Tensor acc_p = grad_p ? at::zeros({bi, D}, p_hat.options()) : at::Tensor();
      at::Tensor acc_y = grad_y ? at::zeros({bi, D}, p_hat.options()) : at::Tensor();
      std::vector<double> loss(bi, 0.0);  // fp64 sums: a row has up to F N terms
      // "spatial" only meets the frames of its own rows
      const int64_t j_begin = pairs == Pairs::kSpatial ? (i0 / N) * N : 0;
      const int64_t j_end = pairs == Pairs::kSpatial ? ((i0 + bi - 1) / N + 1) * N : T;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kKeyBlock) {
        const int64_t bj = std::min(kKeyBlock, j_end - j0);
        const at::Tensor p_keys = p_hat[b].narrow(0, j0, bj), y_keys = y_hat[b].narrow(0, j0, bj);
        const at::Tensor sim_p = at::mm(p_rows, p_keys.t()), sim_y = at::mm(y_rows, y_keys.t());
        const scalar_t* sp = sim_p.data_ptr<scalar_t>();
        const scalar_t* sy = sim_y.data_ptr<scalar_t>();
        at::Tensor coefficient = any_grad ? at::empty({bi, bj}, p_hat.options()) : at::Tensor();
        scalar_t* c = any_grad ? coefficient.data_ptr<scalar_t>() : nullptr;
        for (int64_t ii = 0; ii < bi; ++ii) {
          const int64_t i = i0 + ii, frame_i = i / N;
          const scalar_t a_i = a[i], w_i = any_grad ? w[b * F + frame_i] : scalar_t(0);
          double row = 0;
          for (int64_t jj = 0; jj < bj; ++jj) {
            const int64_t j = j0 + jj, frame_j = j / N;
            const bool rule = pair_counts(pairs, frame_i, frame_j);
            const scalar_t delta = sp[ii * bj + jj] - sy[ii * bj + jj];
            if (rule && a[j] > 0) row += a[j] * std::max(std::abs(delta) - margin, scalar_t(0));
            if (any_grad) {
              const scalar_t weight = w_i * a[j] + w[b * F + frame_j] * a_i;
              c[ii * bj + jj] = (rule && weight != 0) ? weight * gradient_sign(delta, margin) : scalar_t(0);
            }
          }
          loss[ii] += row;
        }
        if (grad_p) acc_p.addmm_(coefficient, p_keys);
        if (grad_y) acc_y.addmm_(coefficient, y_keys, /*beta=*/1, /*alpha=*/-1);
      }
      if (row_loss) {
        scalar_t* out = row_loss->data_ptr<scalar_t>() + b * T + i0;
        for (int64_t ii = 0; ii < bi; ++ii) out[ii] = static_cast<scalar_t>(loss[ii]);
      }
      // chain through x^ = x / max(|x|, eps), row by row
      if (grad_p) chain_rows<scalar_t>(acc_p, p_hat, p_norm, *grad_p, b, i0, bi, eps);
      if (grad_y) chain_rows<scalar_t>(acc_y, y_hat, y_norm, *grad_y, b, i0, bi, eps);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relation_cpu(const at::Tensor& proj, const at::Tensor& target,
                                                            const at::Tensor& key_weight,
                                                            const at::Tensor& frame_weight, c10::string_view pairs,
                                                            double margin, double eps, bool want_loss,
                                                            bool grad_proj, bool grad_target) {
  TORCH_CHECK_VALUE(proj.dim() == 4 && proj.sizes() == target.sizes(),
                    "proj and target: expected the same [B, F, N, D] shape, got ", proj.sizes(), " and ",
                    target.sizes());
  TORCH_CHECK_VALUE(proj.is_floating_point() && target.is_floating_point(),
                    "proj and target: expected floating dtypes, got ", proj.scalar_type(), " and ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(proj.numel() > 0, "proj: expected no empty dimension, got ", proj.sizes());
  TORCH_CHECK_VALUE(margin >= 0 && std::isfinite(margin), "margin: expected a non-negative finite number, got ",
                    margin);
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), "eps: expected a positive finite number, got ", eps);
  const Pairs rule = parse_pairs(pairs);
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2), D = proj.size(3), T = F * N;
  const auto acc = accumulate_type(proj, target);
  TORCH_CHECK_VALUE(key_weight.sizes() == at::IntArrayRef({T}) && key_weight.scalar_type() == acc,
                    "key_weight: expected a [T] = [", T, "] ", acc, " tensor, got ", key_weight.sizes(), " ",
                    key_weight.scalar_type());
  const bool any_grad = grad_proj || grad_target;
  if (any_grad) {
    TORCH_CHECK_VALUE(frame_weight.sizes() == at::IntArrayRef({B, F}) && frame_weight.scalar_type() == acc,
                      "frame_weight: expected a [B, F] = [", B, ", ", F, "] ", acc, " tensor, got ",
                      frame_weight.sizes(), " ", frame_weight.scalar_type());
  }

  const auto unit = [&](const at::Tensor& x) {
    const at::Tensor rows = x.to(acc).reshape({B, T, D});
    const at::Tensor norm = at::linalg_vector_norm(rows, 2, {-1});
    const at::Tensor clamped = at::where(norm > eps, norm, at::full_like(norm, eps));
    return std::make_pair((rows / clamped.unsqueeze(-1)).contiguous(), clamped.contiguous());
  };
  auto [p_hat, p_norm] = unit(proj);
  auto [y_hat, y_norm] = unit(target);
  const at::Tensor keys = key_weight.contiguous();
  const at::Tensor weights = any_grad ? frame_weight.contiguous() : at::Tensor();

  at::Tensor row_loss = want_loss ? new_buffer({B, T}, p_hat.options()) : at::Tensor();
  at::Tensor gp = grad_proj ? new_buffer({B, T, D}, p_hat.options()) : at::Tensor();
  at::Tensor gy = grad_target ? new_buffer({B, T, D}, p_hat.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "relation_cpu", [&] {
    run<scalar_t>(p_hat, y_hat, p_norm, y_norm, keys, weights, rule, margin, eps, F, N,
                  want_loss ? &row_loss : nullptr, grad_proj ? &gp : nullptr, grad_target ? &gy : nullptr);
  });

  at::Tensor per_frame = proj.new_empty({0}, p_hat.options());
  if (want_loss) {  // token sums in a fixed order
    per_frame = new_buffer({B, F}, p_hat.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "relation_cpu_frames", [&] {
      const scalar_t* rows = row_loss.data_ptr<scalar_t>();
      scalar_t* out = per_frame.data_ptr<scalar_t>();
      for (int64_t bf = 0; bf < B * F; ++bf) {
        double total = 0;  // fp64: up to N row sums of F N terms each
        for (int64_t n = 0; n < N; ++n) total += rows[bf * N + n];
        out[bf] = static_cast<scalar_t>(total);
      }
    });
  }
  const auto gradient = [](const at::Tensor& g, const at::Tensor& x, bool needed) {
    return needed ? g.view(x.sizes()).to(x.scalar_type()) : x.new_empty({0});
  };
  return {per_frame, gradient(gp, proj, grad_proj), gradient(gy, target, grad_target)};
}

}  // namespace
}  // namespace crepa

TORCH_LIBRARY_FRAGMENT(crepa_kernels, m) {
  m.def(
      "relation_cpu(Tensor proj, Tensor target, Tensor key_weight, Tensor frame_weight, str pairs, float margin, "
      "float eps, bool want_loss, bool grad_proj, bool grad_target) "
      "-> (Tensor per_frame_loss, Tensor grad_proj, Tensor grad_target)");
}

TORCH_LIBRARY_IMPL(crepa_kernels, CPU, m) { m.impl("relation_cpu", &crepa::relation_cpu); }
