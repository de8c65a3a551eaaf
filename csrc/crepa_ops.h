// The two ops of the extension and what their CPU and CUDA implementations share.
//
//   align_forward(proj, target, ...)  -> (per_frame_loss [B, F], stats [B, N, F, 2 + band width])
//   align_backward(grad_loss, proj, target, stats, ..., needs_target_grad) -> (grad_proj, grad_target or [0])
//
// proj and target are [B, F, N, D] with any strides and any floating dtypes; the loss and the stats are in the
// accumulation dtype (fp64 if either input is fp64, else fp32); gradients are contiguous, in their input's dtype.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "crepa_math.h"

namespace crepa {

std::tuple<at::Tensor, at::Tensor> align_forward_cpu(const at::Tensor& proj, const at::Tensor& target,
                                                     int64_t neighbors, bool cumulative, double tau,
                                                     bool normalize_weights, double eps);
std::tuple<at::Tensor, at::Tensor> align_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& proj,
                                                      const at::Tensor& target, const at::Tensor& stats,
                                                      int64_t neighbors, bool cumulative, double tau,
                                                      bool normalize_weights, double eps, bool needs_target_grad);

// Buffers the kernels must fill completely. With poisoning on (a test switch) they start as NaN, so an element a
// kernel forgot to write shows up in the results instead of passing as leftover zeros.
void set_poison_buffers(bool enabled);
at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

at::ScalarType accumulate_type(const at::Tensor& proj, const at::Tensor& target);
void check_inputs(const at::Tensor& proj, const at::Tensor& target, int64_t neighbors, double tau, double eps);
void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& proj, const at::Tensor& target,
                           const at::Tensor& stats, const Band& band);

}  // namespace crepa
