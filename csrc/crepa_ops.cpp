// Op schemas, shared argument checks, and the Python module (build information and the test-only switches). The
// kernels register their implementations beside them: crepa_cpu.cpp (CPU), crepa_cuda.cpp (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "crepa_cuda_plan.h"
#include "crepa_ops.h"

namespace crepa {

namespace {
std::atomic<bool> poison_buffers{false};
std::atomic<int64_t> grid_limit{kCudaMaxGridX};
std::atomic<bool> launches_reversed{false};
}  // namespace

void set_poison_buffers(bool enabled) { poison_buffers.store(enabled); }

int64_t cuda_grid_limit() { return grid_limit.load(); }

bool cuda_launches_reversed() { return launches_reversed.load(); }

void set_cuda_launches_reversed(bool reversed) { launches_reversed.store(reversed); }

void set_cuda_grid_limit(int64_t blocks) {
  TORCH_CHECK_VALUE(blocks >= 0 && blocks <= kCudaMaxGridX, "blocks: expected 0 (no cap) to ", kCudaMaxGridX,
                    ", got ", blocks);
  grid_limit.store(blocks == 0 ? kCudaMaxGridX : blocks);
}

namespace {

// A fresh gradient is tens of MB that the allocator maps anew on every call, so writing it first takes one page
// fault per 4 KB page: measured on a 2-core VM, 54 MB cost 20-40 ms that way against 4-6 ms with transparent huge
// pages (one fault per 2 MB), more than the rest of the fp32 backward. The advice only affects the 2 MB-aligned
// interior of the buffer; it is ignored where THP is disabled; CREPA_KERNELS_HUGE_PAGES=0 turns it off.
void advise_huge_pages(const at::Tensor& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* setting = std::getenv("CREPA_KERNELS_HUGE_PAGES");
    return setting == nullptr || std::string(setting) != "0";
  }();
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (!enabled || !buffer.device().is_cpu()) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(buffer.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + buffer.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: may fail
#else
  (void)buffer;
#endif
}

}  // namespace

at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor buffer = at::empty(sizes, options);
  advise_huge_pages(buffer);
  if (poison_buffers.load()) buffer.fill_(std::numeric_limits<double>::quiet_NaN());
  return buffer;
}

std::tuple<at::Tensor, at::Tensor> new_gradients(const at::Tensor& proj, const at::Tensor& target,
                                                 bool needs_proj_grad, bool needs_target_grad) {
  // contiguous whatever the inputs' strides: the kernels write gradient rows in [B, F, N, D] order
  const auto gradient = [](const at::Tensor& x, bool needed) {
    return needed ? new_buffer(x.sizes(), x.options()) : at::empty({0}, x.options());
  };
  return {gradient(proj, needs_proj_grad), gradient(target, needs_target_grad)};
}

at::ScalarType accumulate_type(const at::Tensor& proj, const at::Tensor& target) {
  const bool wide = proj.scalar_type() == at::kDouble || target.scalar_type() == at::kDouble;
  return wide ? at::kDouble : at::kFloat;
}

static void check_floating(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, name,
              ": expected float32, float64, bfloat16 or float16, got ", t);
}

void check_inputs(const at::Tensor& proj, const at::Tensor& target, int64_t neighbors, double eps) {
  TORCH_CHECK(proj.dim() == 4, "proj: expected [B, F, N, D], got ", proj.sizes());
  TORCH_CHECK(proj.sizes() == target.sizes(), "proj and target: expected the same shape, got ", proj.sizes(),
              " and ", target.sizes());
  TORCH_CHECK(proj.device() == target.device(), "proj and target: expected the same device");
  TORCH_CHECK(proj.numel() > 0, "proj: expected no empty dimension, got ", proj.sizes());
  check_floating(proj, "proj");
  check_floating(target, "target");
  TORCH_CHECK(neighbors >= 0, "neighbors: expected >= 0, got ", neighbors);
  TORCH_CHECK(eps > 0, "eps: expected > 0, got ", eps);
}

void check_coefficients(const at::Tensor& coefficients, const at::Tensor& proj, const Band& band, at::ScalarType acc) {
  const int64_t F = band.frames, W = band.width();
  TORCH_CHECK_VALUE(coefficients.dim() == 2 && coefficients.size(0) == F && coefficients.size(1) == W,
                    "coefficients: expected the [F, W] = [", F, ", ", W, "] table of this call's band, got ",
                    coefficients.sizes());
  TORCH_CHECK_VALUE(coefficients.scalar_type() == acc, "coefficients: expected ", acc,
                    " (the accumulation dtype of these inputs), got ", coefficients.scalar_type());
  TORCH_CHECK_VALUE(coefficients.device() == proj.device(), "coefficients: expected the inputs' device ",
                    proj.device(), ", got ", coefficients.device());
  TORCH_CHECK_VALUE(coefficients.is_contiguous(), "coefficients: expected a contiguous tensor, got strides ",
                    coefficients.strides());
}

void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& proj, const at::Tensor& target,
                           const at::Tensor& stats, const Band& band) {
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2);
  const auto acc = accumulate_type(proj, target);
  TORCH_CHECK(grad_loss.sizes() == at::IntArrayRef({B, F}), "grad_loss: expected [B, F] = [", B, ", ", F, "], got ",
              grad_loss.sizes());
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({B, N, F, band.stats_per_frame()}),
              "stats: expected the [B, N, F, S] tensor align_forward returned, got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous(), "stats: expected a contiguous ", acc,
              " tensor, got ", stats.scalar_type());
  TORCH_CHECK(grad_loss.device() == proj.device() && stats.device() == proj.device(),
              "grad_loss and stats: expected the inputs' device");
}

void check_plan_arguments(int64_t B, int64_t F, int64_t N, int64_t D, int64_t neighbors, int64_t acc_bytes) {
  TORCH_CHECK_VALUE(B > 0 && F > 0 && N > 0 && D > 0, "B, F, N, D: expected positive sizes, got ", B, ", ", F, ", ",
                    N, ", ", D);
  TORCH_CHECK_VALUE(neighbors >= 0, "neighbors: expected >= 0, got ", neighbors);
  TORCH_CHECK_VALUE(acc_bytes == 4 || acc_bytes == 8, "acc_bytes: expected 4 (fp32) or 8 (fp64), got ", acc_bytes);
}

}  // namespace crepa

// The emulated CUDA extension (crepa_cuda.cpp and crepa_cuda_emulated.cpp built with -DCREPA_HIP_CPU) shares the
// helpers above and registers its own ops and module.
#if !defined(CREPA_HIP_CPU)
TORCH_LIBRARY(crepa_kernels, m) {
  m.def(crepa::kAlignForwardSchema);
  m.def(crepa::kAlignBackwardSchema);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
#ifdef CREPA_WITH_CUDA
        info["cuda"] = true;
#else
        info["cuda"] = false;
#endif
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["torch"] = TORCH_VERSION;
        info["cpu_isa"] = crepa::cpu_kernel_isa();
        return info;
      },
      "How this extension was compiled: {'cuda': bool, 'openmp': bool, 'torch': version, 'cpu_isa': the build of "
      "the CPU kernels that runs here, 'avx2' or 'baseline'}.");
  m.def(
      "cuda_launch_plan",
      [](int64_t B, int64_t F, int64_t N, int64_t D, int64_t neighbors, bool cumulative, int64_t acc_bytes) {
        crepa::check_plan_arguments(B, F, N, D, neighbors, acc_bytes);
        const auto plan = crepa::plan_cuda_launch(B, F, N, D, crepa::Band::make(F, neighbors, cumulative), acc_bytes);
        const auto launch = [](const crepa::CudaKernelLaunch& l) {
          pybind11::dict d;
          d["grid"] = l.grid;
          d["launches"] = l.launches;
          d["threads"] = l.threads;
          d["shared_bytes"] = l.shared_bytes;
          return d;
        };
        pybind11::dict info;
        info["forward"] = launch(plan.forward);
        info["reduce"] = launch(plan.reduce);
        info["backward"] = launch(plan.backward);
        return info;
      },
      "The CUDA kernels' launches for [B, F, N, D] inputs (acc_bytes 4 for fp32 accumulation, 8 for fp64): "
      "{'forward' | 'reduce' | 'backward': {'grid' (blocks per launch), 'launches', 'threads', 'shared_bytes' "
      "(dynamic)}}. Needs no GPU.");
  m.def(
      "cuda_unsupported_reason",
      [](int64_t B, int64_t F, int64_t N, int64_t D, int64_t neighbors, bool cumulative, int64_t acc_bytes,
         int64_t shared_limit) -> std::optional<std::string> {
        crepa::check_plan_arguments(B, F, N, D, neighbors, acc_bytes);
        const std::string reason = crepa::cuda_unsupported_reason(
            B, F, N, D, crepa::Band::make(F, neighbors, cumulative), acc_bytes, shared_limit);
        if (reason.empty()) return std::nullopt;
        return reason;
      },
      "Why the CUDA kernels cannot run these sizes where a block may use shared_limit bytes of shared memory, or "
      "None: the check the CUDA forward makes before any work. Needs no GPU.");
  m.def(
      "new_buffer_for_test", [](std::vector<int64_t> sizes) { return crepa::new_buffer(sizes, at::kFloat); },
      "An fp32 buffer as the kernels allocate theirs (all NaN while poisoning is on).");
  m.def("set_cpu_baseline_forced", &crepa::set_cpu_baseline_forced,
        "Test switch: run the CPU kernels' baseline-ISA build even where the AVX2 + FMA build could run.");
  m.def("set_cuda_grid_limit", &crepa::set_cuda_grid_limit,
        "Test switch: the CUDA launch plans put at most this many blocks on grid.x (0: CUDA's limit), so small "
        "inputs take the several-launch path.");
  m.def("set_cuda_launches_reversed", &crepa::set_cuda_launches_reversed,
        "Test switch: a several-launch CUDA plan launches last to first.");
  m.def("set_poison_buffers", &crepa::set_poison_buffers,
        "Test switch: fill every buffer the kernels allocate with NaN before they write it.");
}
#endif  // !CREPA_HIP_CPU
