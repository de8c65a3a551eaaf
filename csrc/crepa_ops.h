// The two ops of the extension and what their CPU and CUDA implementations share.
//
//   align_forward(proj, target, coefficients, ...)  -> (per_frame_loss [B, F], stats [B, N, F, 2 + band width])
//   align_backward(grad_loss, proj, target, stats, coefficients, ..., needs_proj_grad, needs_target_grad)
//       -> (grad_proj or [0], grad_target or [0])
//
// proj and target are [B, F, N, D] with any strides and any floating dtypes; the loss and the stats are in the
// accumulation dtype (fp64 if either input is fp64, else fp32); gradients are contiguous, in their input's dtype.
// coefficients is the call's table C [F, Band::width()] (crepa_math.h), contiguous, in the accumulation dtype, on
// the inputs' device: the ops read the neighbour weights from it and compute none.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "crepa_math.h"

namespace crepa {

constexpr const char* kAlignForwardSchema =
    "align_forward(Tensor proj, Tensor target, Tensor coefficients, int neighbors, bool cumulative, float eps) "
    "-> (Tensor per_frame_loss, Tensor stats)";
constexpr const char* kAlignBackwardSchema =
    "align_backward(Tensor grad_loss, Tensor proj, Tensor target, Tensor stats, Tensor coefficients, int neighbors, "
    "bool cumulative, float eps, bool needs_proj_grad, bool needs_target_grad) -> (Tensor grad_proj, Tensor grad_target)";

// Test switch: run the CPU kernels' baseline-ISA build even where the AVX2 + FMA one could run.
void set_cpu_baseline_forced(bool forced);
// "avx2" or "baseline": the build of the CPU kernels that runs now.
std::string cpu_kernel_isa();

// Buffers the kernels must fill completely. With poisoning on (a test switch) they start as NaN, so an element a
// kernel forgot to write shows up in the results instead of passing as leftover zeros.
void set_poison_buffers(bool enabled);
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// The gradients align_backward returns: each contiguous in its input's dtype when asked for, else an empty [0].
std::tuple<at::Tensor, at::Tensor> new_gradients(const at::Tensor& proj, const at::Tensor& target,
                                                 bool needs_proj_grad, bool needs_target_grad);

at::ScalarType accumulate_type(const at::Tensor& proj, const at::Tensor& target);
void check_inputs(const at::Tensor& proj, const at::Tensor& target, int64_t neighbors, double eps);
// ValueError (before any work) unless coefficients is the [F, W] table of this band, contiguous, in the
// accumulation dtype, on the inputs' device.
void check_coefficients(const at::Tensor& coefficients, const at::Tensor& proj, const Band& band, at::ScalarType acc);
void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& proj, const at::Tensor& target,
                           const at::Tensor& stats, const Band& band);
// Arguments of the Python-facing crepa_cuda_plan.h functions: positive sizes, neighbors >= 0, acc_bytes 4 or 8.
void check_plan_arguments(int64_t B, int64_t F, int64_t N, int64_t D, int64_t neighbors, int64_t acc_bytes);

}  // namespace crepa
