// The boundary between the CUDA kernels (crepa_cuda_kernels.cu, compiled by nvcc once per GPU architecture) and
// their ATen glue (crepa_cuda.cpp, compiled once by the host compiler). Plain C++ and the CUDA runtime API only: no
// torch headers on the nvcc side, which keeps each extra architecture a few seconds of nvcc instead of a minute.
#pragma once

#include <cstdint>

#include "crepa_cuda_portability.h"
#include "crepa_math.h"

namespace crepa {

enum class Dtype : int { kFloat, kDouble, kBFloat16, kHalf };

// A [B, F, N, D] tensor by raw pointer, element strides and dtype (passed by value to the kernels).
struct Strided {
  void* data;
  int64_t stride[4];
  Dtype dtype;
};

// acc_t is float or double: the accumulation type. `vector`: every row of every tensor the kernel touches starts
// 16-byte aligned and D % 8 == 0, so chunks of 8 elements move in 16-byte loads and stores.
template <typename acc_t>
struct ForwardLaunch {
  Strided proj, target;
  int64_t B, N, D;
  Band band;
  const acc_t* coefficients;  // [F, W], contiguous, on the device: the table C of crepa_math.h
  acc_t eps;
  bool vector;
  acc_t* stats;             // [B, N, F, 2 + W], written
  acc_t* token_similarity;  // [B, N, F] scratch
  acc_t* loss;              // [B, F], written
};

template <typename acc_t>
struct BackwardLaunch {
  const acc_t* grad_loss;  // [B, F], contiguous
  Strided proj, target;
  const acc_t* stats;  // what the forward wrote
  int64_t B, N, D;
  Band band;
  const acc_t* coefficients;  // [F, W], as the forward's
  acc_t eps;
  bool vector;
  Strided grad_proj, grad_target;  // contiguous; an unused one is any view of the other, never written
  bool needs_proj_grad, needs_target_grad;
};

// The most shared memory one block may use on `device` (cudaDevAttrMaxSharedMemoryPerBlockOptin), read once per
// device: an attribute query, no synchronisation.
cudaError_t shared_limit_of(int device, int64_t* bytes);
// The most dynamic shared memory every forward and backward kernel accumulating in acc_bytes (4 or 8) may use on
// `device`: shared_limit_of less the kernels' static shared memory. The launches opt in to exactly this, so a plan
// within it runs and a larger one must be refused before any work.
cudaError_t dynamic_shared_limit_of(int device, int64_t acc_bytes, int64_t* bytes);

// Launch on `stream` (of `device`, the current device) with crepa_cuda_plan.h's configuration, after opting the
// kernels in to more than 48 KB of dynamic shared memory when the plan needs it. The caller has checked the plan
// against dynamic_shared_limit_of. Returns the first error of the opt-in or the launches.
template <typename acc_t>
cudaError_t launch_forward(const ForwardLaunch<acc_t>& launch, int device, cudaStream_t stream);
template <typename acc_t>
cudaError_t launch_backward(const BackwardLaunch<acc_t>& launch, int device, cudaStream_t stream);

}  // namespace crepa
