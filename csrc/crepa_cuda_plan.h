// The CUDA kernels' launch configuration, computed on the host from the sizes alone.
//
// crepa_cuda_kernels.cu launches with it, and the Python module exposes it (crepa_kernels.ops.native.cuda_launch_plan,
// also in CPU-only builds), so the grid and shared-memory limits are tested for any shape without a GPU.
//
//   forward   one block per token column (b, n); past the grid's x limit, several launches of at most `grid`
//             blocks each; dynamic shared memory: the band's [F][W] coefficient table and [warps][S] warp sums
//   reduce    one launch, each block grid-strides over the B * F items (b, f); static shared memory only
//   backward  like the forward; dynamic shared memory: the [F][W] table, the [F] self coefficients of proj and of
//             target, and two alternating stages of one frame's [W] direct coefficients
#pragma once

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

#include "crepa_math.h"

namespace crepa {

constexpr int64_t kCudaChunk = 8;  // elements per thread step: one 16-byte load of bf16 / fp16
constexpr int64_t kCudaWarp = 32;
constexpr int64_t kCudaMaxThreads = 256;
constexpr int64_t kCudaReduceThreads = 256;
constexpr int64_t kCudaMaxGridX = 2147483647;  // gridDim.x; the kernels use no y or z axis
// Dynamic shared memory a kernel may use without cudaFuncSetAttribute(MaxDynamicSharedMemorySize).
constexpr int64_t kCudaDefaultSharedBytes = 48 * 1024;

struct CudaKernelLaunch {
  int64_t grid;  // blocks per launch (gridDim.x)
  int64_t launches;
  int64_t threads;
  int64_t shared_bytes;  // dynamic
};

struct CudaLaunchPlan {
  CudaKernelLaunch forward;
  CudaKernelLaunch reduce;
  CudaKernelLaunch backward;

  int64_t max_shared_bytes() const {
    return forward.shared_bytes > backward.shared_bytes ? forward.shared_bytes : backward.shared_bytes;
  }
};

// a * b for non-negative a, b, saturating instead of overflowing (F * W for absurd F)
inline int64_t saturating_product(int64_t a, int64_t b) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) return std::numeric_limits<int64_t>::max();
  return a * b;
}

inline int64_t saturating_sum(int64_t a, int64_t b) {
  return a > std::numeric_limits<int64_t>::max() - b ? std::numeric_limits<int64_t>::max() : a + b;
}

// ceil(D / 8) threads rounded up to a warp, at most 256: each thread takes chunks of 8 elements.
inline int64_t cuda_threads_for(int64_t D) {
  const int64_t chunks = (D + kCudaChunk - 1) / kCudaChunk;
  const int64_t threads = (chunks + kCudaWarp - 1) / kCudaWarp * kCudaWarp;
  return threads < kCudaMaxThreads ? threads : kCudaMaxThreads;
}

// The most blocks a plan puts on grid.x: kCudaMaxGridX, or fewer under the test switch (crepa_ops.cpp), so that
// small inputs take the several-launch path that only B * N > 2^31 - 1 takes otherwise.
int64_t cuda_grid_limit();
void set_cuda_grid_limit(int64_t blocks);  // 0 restores kCudaMaxGridX
// Test switch: the launches of a several-launch plan go last to first, so that (with one block per launch) the
// columns run in reverse order; the results must not change by a bit.
bool cuda_launches_reversed();
void set_cuda_launches_reversed(bool reversed);

inline int64_t cuda_grid_for(int64_t work_items) {
  const int64_t limit = cuda_grid_limit();
  return work_items < limit ? work_items : limit;
}

// acc_bytes: sizeof the accumulation type, 4 (fp32) or 8 (fp64).
inline CudaLaunchPlan plan_cuda_launch(int64_t B, int64_t F, int64_t N, int64_t D, const Band& band,
                                       int64_t acc_bytes) {
  const int64_t threads = cuda_threads_for(D);
  const int64_t W = band.width(), S = band.stats_per_frame();
  const int64_t table = saturating_product(F, W);
  const int64_t forward_elements = saturating_sum(table, (threads / kCudaWarp) * S);
  const int64_t backward_elements = saturating_sum(table, saturating_product(2, saturating_sum(F, W)));
  const int64_t columns = saturating_product(B, N);
  const int64_t grid = cuda_grid_for(columns);
  const int64_t launches = (columns - 1) / grid + 1;
  return CudaLaunchPlan{
      {grid, launches, threads, saturating_product(forward_elements, acc_bytes)},
      {cuda_grid_for(saturating_product(B, F)), 1, kCudaReduceThreads, 0},
      {grid, launches, threads, saturating_product(backward_elements, acc_bytes)},
  };
}

// Why the kernels cannot run these sizes on a device that allows `shared_limit` bytes of shared memory per block
// (cudaDevAttrMaxSharedMemoryPerBlockOptin), or "" when they can. Grid sizes never refuse (see above).
inline std::string cuda_unsupported_reason(int64_t B, int64_t F, int64_t N, int64_t D, const Band& band,
                                           int64_t acc_bytes, int64_t shared_limit) {
  const CudaLaunchPlan plan = plan_cuda_launch(B, F, N, D, band, acc_bytes);
  if (plan.max_shared_bytes() <= shared_limit) return "";
  std::ostringstream reason;
  reason << "cuda backend: F=" << F << " frames with " << (band.cumulative ? "cumulative" : "adjacent")
         << " neighbours up to " << band.reach << " frames away (a band of " << band.width() << " slots) and D=" << D
         << " in fp" << 8 * acc_bytes << " needs " << plan.max_shared_bytes()
         << " bytes of shared memory per block (the [F][band] coefficient table), more than the " << shared_limit
         << " bytes this device allows per block; use fewer neighbours, fp32 inputs, or the reference backend";
  return reason.str();
}

}  // namespace crepa
