// The CUDA backend's ATen side: argument checks, the shared-memory check before any work, output allocation, the
// device guard and the current stream, then the launches of crepa_cuda_kernels.cu (through crepa_cuda_launch.h).
// Compiled by the host compiler, once; nvcc compiles only the kernels, once per architecture.
//
// With -DCREPA_HIP_CPU the same glue serves the "cuda_emulated" backend: the kernels built by g++ against the HIP
// CPU Runtime (crepa_cuda_portability.h) run on CPU tensors, on the emulated device that
// crepa::emulated::current_device() names; its ops are crepa_kernels_emulated::align_forward / align_backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "crepa_cuda_launch.h"
#include "crepa_cuda_plan.h"
#include "crepa_ops.h"

#if defined(CREPA_HIP_CPU)
#define CREPA_CHECK_RUNTIME(expression)                                                  \
  do {                                                                                   \
    const cudaError_t crepa_error = (expression);                                        \
    TORCH_CHECK(crepa_error == cudaSuccess, "emulated CUDA error: ", cudaGetErrorString(crepa_error)); \
  } while (0)

namespace crepa {
namespace {
constexpr const char* kKernelDevice = "the CPU (the emulated GPU runs there)";
bool on_kernel_device(const at::Tensor& x) { return x.is_cpu(); }
int kernel_device(const at::Tensor&) { return emulated::current_device(); }
cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
}  // namespace
}  // namespace crepa
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define CREPA_CHECK_RUNTIME(expression) C10_CUDA_CHECK(expression)

namespace crepa {
namespace {
constexpr const char* kKernelDevice = "a CUDA device";
bool on_kernel_device(const at::Tensor& x) { return x.is_cuda(); }
int kernel_device(const at::Tensor& x) { return x.get_device(); }
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
}  // namespace
}  // namespace crepa
#endif

namespace crepa {
namespace {

Dtype dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kHalf;
    default: TORCH_CHECK(false, "crepa_kernels: unsupported dtype ", type);
  }
}

Strided strided(const at::Tensor& x) {
  return Strided{const_cast<void*>(x.data_ptr()), {x.stride(0), x.stride(1), x.stride(2), x.stride(3)},
                 dtype_of(x.scalar_type())};
}

// 16-byte chunk access is valid when every row starts 16-byte aligned and D is a whole number of chunks.
bool rows_are_16_byte_aligned(const at::Tensor& x) {
  if (x.size(3) % kCudaChunk != 0 || x.stride(3) != 1) return false;
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim < 3; ++dim) {
    if (x.size(dim) > 1 && (x.stride(dim) * x.element_size()) % 16 != 0) return false;
  }
  return true;
}

// Raises, before anything is allocated or launched, when the forward or the backward of these sizes would need more
// shared memory per block than the current device allows.
void check_supported(const at::Tensor& proj, const Band& band, at::ScalarType acc) {
  int64_t limit = 0;
  CREPA_CHECK_RUNTIME(dynamic_shared_limit_of(kernel_device(proj), at::elementSize(acc), &limit));
  const std::string reason = cuda_unsupported_reason(proj.size(0), proj.size(1), proj.size(2), proj.size(3), band,
                                                     at::elementSize(acc), limit);
  TORCH_CHECK_NOT_IMPLEMENTED(reason.empty(), reason);
}

template <typename acc_t>
void launch_forward_on(const at::Tensor& proj, const at::Tensor& target, const at::Tensor& coefficients,
                       const Band& band, double eps, at::Tensor& loss, at::Tensor& stats) {
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2), D = proj.size(3);
  at::Tensor token_similarity = new_buffer({B, N, F}, loss.options());
  const ForwardLaunch<acc_t> launch{
      .proj = strided(proj), .target = strided(target), .B = B, .N = N, .D = D, .band = band,
      .coefficients = coefficients.data_ptr<acc_t>(), .eps = static_cast<acc_t>(eps),
      .vector = rows_are_16_byte_aligned(proj) && rows_are_16_byte_aligned(target), .stats = stats.data_ptr<acc_t>(),
      .token_similarity = token_similarity.data_ptr<acc_t>(), .loss = loss.data_ptr<acc_t>()};
  CREPA_CHECK_RUNTIME(launch_forward(launch, kernel_device(proj), current_stream()));
}

template <typename acc_t>
void launch_backward_on(const at::Tensor& grad_loss, const at::Tensor& proj, const at::Tensor& target,
                        const at::Tensor& stats, const at::Tensor& coefficients, const Band& band, double eps,
                        at::Tensor& grad_proj, at::Tensor& grad_target, bool needs_proj_grad,
                        bool needs_target_grad) {
  const bool vector = rows_are_16_byte_aligned(proj) && rows_are_16_byte_aligned(target) &&
                      (!needs_proj_grad || rows_are_16_byte_aligned(grad_proj)) &&
                      (!needs_target_grad || rows_are_16_byte_aligned(grad_target));
  // a gradient that is not asked for is an empty [0] tensor, never written: any view of a real one stands in
  const BackwardLaunch<acc_t> launch{
      .grad_loss = grad_loss.data_ptr<acc_t>(), .proj = strided(proj), .target = strided(target),
      .stats = stats.data_ptr<acc_t>(), .B = proj.size(0), .N = proj.size(2), .D = proj.size(3), .band = band,
      .coefficients = coefficients.data_ptr<acc_t>(), .eps = static_cast<acc_t>(eps), .vector = vector, .grad_proj = needs_proj_grad ? strided(grad_proj) : strided(grad_target),
      .grad_target = needs_target_grad ? strided(grad_target) : strided(grad_proj),
      .needs_proj_grad = needs_proj_grad, .needs_target_grad = needs_target_grad};
  CREPA_CHECK_RUNTIME(launch_backward(launch, kernel_device(proj), current_stream()));
}

std::tuple<at::Tensor, at::Tensor> align_forward_cuda(const at::Tensor& proj, const at::Tensor& target,
                                                      const at::Tensor& coefficients, int64_t neighbors,
                                                      bool cumulative, double eps) {
  check_inputs(proj, target, neighbors, eps);
  TORCH_CHECK(on_kernel_device(proj), "align_forward_cuda: expected tensors on ", kKernelDevice, ", got ",
              proj.device());
  const DeviceGuard device_guard(proj.device());
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2);
  const Band band = Band::make(F, neighbors, cumulative);
  const auto acc = accumulate_type(proj, target);
  check_coefficients(coefficients, proj, band, acc);
  check_supported(proj, band, acc);  // the plan covers the backward too: refused here, before any work
  const auto options = proj.options().dtype(acc);
  at::Tensor loss = new_buffer({B, F}, options);
  at::Tensor stats = new_buffer({B, N, F, band.stats_per_frame()}, options);
  if (acc == at::kDouble) {
    launch_forward_on<double>(proj, target, coefficients, band, eps, loss, stats);
  } else {
    launch_forward_on<float>(proj, target, coefficients, band, eps, loss, stats);
  }
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> align_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& proj,
                                                       const at::Tensor& target, const at::Tensor& stats,
                                                       const at::Tensor& coefficients, int64_t neighbors,
                                                       bool cumulative, double eps, bool needs_proj_grad,
                                                       bool needs_target_grad) {
  check_inputs(proj, target, neighbors, eps);
  TORCH_CHECK(on_kernel_device(proj), "align_backward_cuda: expected tensors on ", kKernelDevice, ", got ",
              proj.device());
  const DeviceGuard device_guard(proj.device());
  const Band band = Band::make(proj.size(1), neighbors, cumulative);
  check_backward_inputs(grad_loss, proj, target, stats, band);
  const auto acc = accumulate_type(proj, target);
  check_coefficients(coefficients, proj, band, acc);
  check_supported(proj, band, acc);  // passes whenever the forward did
  const at::Tensor grad = grad_loss.to(acc).contiguous();  // [B, F]; expanded (stride 0) after a mean
  auto [grad_proj, grad_target] = new_gradients(proj, target, needs_proj_grad, needs_target_grad);
  if (!needs_proj_grad && !needs_target_grad) return {grad_proj, grad_target};
  if (acc == at::kDouble) {
    launch_backward_on<double>(grad, proj, target, stats, coefficients, band, eps, grad_proj, grad_target,
                               needs_proj_grad, needs_target_grad);
  } else {
    launch_backward_on<float>(grad, proj, target, stats, coefficients, band, eps, grad_proj, grad_target,
                              needs_proj_grad, needs_target_grad);
  }
  return {grad_proj, grad_target};
}

}  // namespace
}  // namespace crepa

#if defined(CREPA_HIP_CPU)
TORCH_LIBRARY(crepa_kernels_emulated, m) {
  m.def(crepa::kAlignForwardSchema);
  m.def(crepa::kAlignBackwardSchema);
}

TORCH_LIBRARY_IMPL(crepa_kernels_emulated, CPU, m) {
#else
TORCH_LIBRARY_IMPL(crepa_kernels, CUDA, m) {
#endif
  m.impl("align_forward", &crepa::align_forward_cuda);
  m.impl("align_backward", &crepa::align_backward_cuda);
}
