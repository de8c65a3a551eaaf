// The CUDA kernels: one thread block per token column (b, n), threads across D in chunks of 8 elements. The grid,
// block and shared memory of each launch come from crepa_cuda_plan.h, which the tests check without a GPU; the
// ATen side (checks, allocation, device guard, stream) is crepa_cuda.cpp, and this file includes no torch header.
//
// Forward: per frame, each stats entry (|p_f|^2, |y_f|^2, the band's dots) is a block-wide sum: per-thread partials
// over its chunks, a warp butterfly, then the warps summed in order by one thread, so the result is bitwise
// reproducible. The per-token similarity goes to a [B, N, F] buffer that a second kernel sums over N in a fixed
// tree (no float atomics). Backward: per column, the gradient coefficients come from the saved stats (crepa_math.h),
// then each output chunk is a short linear combination of the column's rows.
//
// Each row of the column is read from DRAM once per pass; the band's repeated reads of a neighbour row hit L1/L2
// (a bf16 column of F=13, D=768 is 20 KB). Chunks use 16-byte loads and stores when every row is 16-byte aligned and
// D % 8 == 0 (checked at run time), element loads with strides and bounds otherwise. Offsets are int64.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

#include "crepa_cuda_launch.h"  // and through it crepa_cuda_portability.h: the CUDA or the HIP CPU names
#include "crepa_cuda_plan.h"

namespace crepa {
namespace {

constexpr int kChunk = static_cast<int>(kCudaChunk);
constexpr int kWarp = static_cast<int>(kCudaWarp);
constexpr int kReduceThreads = static_cast<int>(kCudaReduceThreads);

template <typename acc_t>
__device__ __forceinline__ acc_t load_element(const void* data, Dtype dtype, int64_t index) {
  switch (dtype) {
    case Dtype::kFloat: return static_cast<acc_t>(static_cast<const float*>(data)[index]);
    case Dtype::kDouble: return static_cast<acc_t>(static_cast<const double*>(data)[index]);
    case Dtype::kBFloat16: return static_cast<acc_t>(__bfloat162float(static_cast<const __nv_bfloat16*>(data)[index]));
    default: return static_cast<acc_t>(__half2float(static_cast<const __half*>(data)[index]));
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_element(void* data, Dtype dtype, int64_t index, acc_t value) {
  switch (dtype) {
    case Dtype::kFloat: static_cast<float*>(data)[index] = static_cast<float>(value); break;
    case Dtype::kDouble: static_cast<double*>(data)[index] = static_cast<double>(value); break;
    case Dtype::kBFloat16:
      static_cast<__nv_bfloat16*>(data)[index] = __float2bfloat16_rn(static_cast<float>(value));
      break;
    default: static_cast<__half*>(data)[index] = __float2half_rn(static_cast<float>(value)); break;
  }
}

// kChunk elements from a 16-byte aligned address, in 16-byte transactions (crepa_load16 / crepa_store16).
template <typename element_t, typename acc_t, typename Convert>
__device__ __forceinline__ void load_elements(const void* data, int64_t index, acc_t (&out)[kChunk], Convert convert) {
  constexpr int kPerLoad = 16 / sizeof(element_t);
  const element_t* first = static_cast<const element_t*>(data) + index;
#pragma unroll
  for (int part = 0; part < kChunk / kPerLoad; ++part) {
    const crepa_bytes16 raw = crepa_load16(first + part * kPerLoad);
    element_t e[kPerLoad];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int j = 0; j < kPerLoad; ++j) out[part * kPerLoad + j] = static_cast<acc_t>(convert(e[j]));
  }
}

template <typename element_t, typename acc_t, typename Convert>
__device__ __forceinline__ void store_elements(void* data, int64_t index, const acc_t (&in)[kChunk], Convert convert) {
  constexpr int kPerStore = 16 / sizeof(element_t);
  element_t* first = static_cast<element_t*>(data) + index;
#pragma unroll
  for (int part = 0; part < kChunk / kPerStore; ++part) {
    element_t e[kPerStore];
#pragma unroll
    for (int j = 0; j < kPerStore; ++j) e[j] = convert(in[part * kPerStore + j]);
    crepa_bytes16 raw;
    memcpy(&raw, e, sizeof(raw));
    crepa_store16(first + part * kPerStore, raw);
  }
}

template <typename acc_t>
__device__ __forceinline__ void load_vector(const void* data, Dtype dtype, int64_t index, acc_t (&out)[kChunk]) {
  switch (dtype) {
    case Dtype::kFloat: load_elements<float>(data, index, out, [](float x) { return x; }); break;
    case Dtype::kDouble: load_elements<double>(data, index, out, [](double x) { return x; }); break;
    case Dtype::kBFloat16:
      load_elements<__nv_bfloat16>(data, index, out, [](__nv_bfloat16 x) { return __bfloat162float(x); });
      break;
    default: load_elements<__half>(data, index, out, [](__half x) { return __half2float(x); });
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_vector(void* data, Dtype dtype, int64_t index, const acc_t (&in)[kChunk]) {
  switch (dtype) {
    case Dtype::kFloat: store_elements<float>(data, index, in, [](acc_t x) { return static_cast<float>(x); }); break;
    case Dtype::kDouble: store_elements<double>(data, index, in, [](acc_t x) { return static_cast<double>(x); }); break;
    case Dtype::kBFloat16:
      store_elements<__nv_bfloat16>(data, index, in,
                                    [](acc_t x) { return __float2bfloat16_rn(static_cast<float>(x)); });
      break;
    default: store_elements<__half>(data, index, in, [](acc_t x) { return __float2half_rn(static_cast<float>(x)); });
  }
}

// Elements [i, i + kChunk) of the row starting at element offset `row`; zero past D.
template <typename acc_t, bool kVector>
__device__ __forceinline__ void load_chunk(const Strided& x, int64_t row, int64_t i, int64_t D, acc_t (&out)[kChunk]) {
  if (kVector) {
    load_vector(x.data, x.dtype, row + i, out);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      out[j] = i + j < D ? load_element<acc_t>(x.data, x.dtype, row + (i + j) * x.stride[3]) : acc_t(0);
    }
  }
}

// Gradients are contiguous: the row starts at `row`, D elements.
template <typename acc_t, bool kVector>
__device__ __forceinline__ void store_chunk(const Strided& x, int64_t row, int64_t i, int64_t D,
                                            const acc_t (&in)[kChunk]) {
  if (kVector) {
    store_vector(x.data, x.dtype, row + i, in);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (i + j < D) store_element(x.data, x.dtype, row + i + j, in[j]);
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += crepa_shuffle_xor(value, offset);
  return value;
}

// This thread's share of the dot product of two rows: its chunks i = threadIdx.x * kChunk + k * blockDim.x * kChunk.
template <typename acc_t, bool kVector>
__device__ __forceinline__ acc_t thread_dot(const Strided& x, int64_t x_row, const Strided& y, int64_t y_row,
                                            int64_t D) {
  acc_t partial = acc_t(0);
  for (int64_t i = int64_t(threadIdx.x) * kChunk; i < D; i += int64_t(blockDim.x) * kChunk) {
    acc_t a[kChunk], c[kChunk];
    load_chunk<acc_t, kVector>(x, x_row, i, D, a);
    load_chunk<acc_t, kVector>(y, y_row, i, D, c);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) partial += a[j] * c[j];
  }
  return partial;
}

// The call's [F][W] coefficient table from global memory into the block's shared copy, strided over the threads; the
// caller's next barrier makes it visible. Every coefficient is read many times per block, so it is read from global
// memory once.
template <typename acc_t>
__device__ __forceinline__ void copy_coefficients(acc_t* shared, const acc_t* __restrict__ table, const Band& band) {
  const int64_t count = band.frames * band.width();
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) shared[e] = table[e];
}

// Block i takes token column first_column + i (B * N beyond the grid limit takes several launches: a grid-stride
// loop instead doubled the scalar kernel's registers). The column's stats are written to `stats` and read back
// from there after the barriers (they stay in L1/L2), so shared memory holds only the block's copy of the coefficient
// table and the warps' partial sums.
template <typename acc_t, bool kVector>
__global__ void forward_kernel(Strided proj, Strided target, int64_t first_column, int64_t N, int64_t D, Band band,
                               const acc_t* __restrict__ table, acc_t eps, acc_t* __restrict__ stats,
                               acc_t* __restrict__ token_similarity) {
  CREPA_DYNAMIC_SHARED(unsigned char, shared_bytes);
  const int64_t F = band.frames, W = band.width(), S = band.stats_per_frame();
  acc_t* coefficients = reinterpret_cast<acc_t*>(shared_bytes);  // [F][W]
  acc_t* warp_sums = coefficients + F * W;                          // [warps][S]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const int64_t column = first_column + blockIdx.x;
  const int64_t b = column / N, n = column % N;
  const int64_t p_column = b * proj.stride[0] + n * proj.stride[2];
  const int64_t y_column = b * target.stride[0] + n * target.stride[2];
  acc_t* token = stats + column * F * S;  // [F][S]
  copy_coefficients(coefficients, table, band);  // first read after the frames' barriers

  for (int64_t f = 0; f < F; ++f) {
    const int64_t p_row = p_column + f * proj.stride[1];
    const int64_t y_row = y_column + f * target.stride[1];
    for (int64_t s = 0; s < S; ++s) {
      const int64_t slot = s - kFirstDot;
      acc_t partial = acc_t(0);
      if (s == kProjNorm) {
        partial = thread_dot<acc_t, kVector>(proj, p_row, proj, p_row, D);
      } else if (s == kTargetNorm) {
        partial = thread_dot<acc_t, kVector>(target, y_row, target, y_row, D);
      } else if (band.lands(f, slot)) {
        const int64_t neighbour_row = y_column + (f + band.offset(slot)) * target.stride[1];
        partial = thread_dot<acc_t, kVector>(proj, p_row, target, neighbour_row, D);
      }
      partial = warp_sum(partial);
      if (lane == 0) warp_sums[warp * S + s] = partial;
    }
    __syncthreads();
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      acc_t total = acc_t(0);
      for (int w = 0; w < warps; ++w) total += warp_sums[w * S + s];
      if (s < kFirstDot) total = sqrt_of(total);
      token[f * S + s] = total;
    }
    __syncthreads();  // warp_sums is reused by the next frame; the frame's stats are visible to the whole block
  }
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    token_similarity[column * F + f] = frame_similarity<acc_t>(token, coefficients, band, f, eps);
  }
}

// loss[b, f] = scale * sum_n token_similarity[b, n, f], one block per (b, f), in a fixed tree.
template <typename acc_t>
__global__ void reduce_tokens_kernel(const acc_t* __restrict__ token_similarity, int64_t B, int64_t N, int64_t F,
                                     double scale, acc_t* __restrict__ loss) {
  __shared__ double partial[kReduceThreads];  // double: N can be large, and this pass is tiny
  for (int64_t item = blockIdx.x; item < B * F; item += gridDim.x) {
    const int64_t b = item / F, f = item % F;
    double sum = 0.0;
    for (int64_t n = threadIdx.x; n < N; n += kReduceThreads) sum += token_similarity[(b * N + n) * F + f];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int width = kReduceThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
      __syncthreads();
    }
    // No barrier before the next item: only thread 0 reads partial[0] here and only it writes partial[0] next, and
    // every other slot was last read before the tree's final barrier.
    if (threadIdx.x == 0) loss[item] = static_cast<acc_t>(scale * partial[0]);
  }
}

// Block i takes token column first_column + i, as the forward does: the self coefficients of every frame at once,
// then frame by frame the frame's direct coefficients (one per band slot) and the frame's gradient rows. Staging
// one frame's direct coefficients at a time keeps shared memory at [F][W] + 2F + 2W values, not 3 [F][W] tables;
// two alternating stages need one barrier per frame: a stage is rewritten two frames later, after every thread has
// passed the barrier of the frame in between, so after its last read.
template <typename acc_t, bool kVector>
__global__ void backward_kernel(const acc_t* __restrict__ grad_loss, Strided proj, Strided target,
                                const acc_t* __restrict__ stats, int64_t first_column, int64_t N, int64_t D, Band band,
                                const acc_t* __restrict__ table, acc_t eps, acc_t scale, Strided grad_proj,
                                Strided grad_target, bool needs_proj_grad, bool needs_target_grad) {
  CREPA_DYNAMIC_SHARED(unsigned char, shared_bytes);
  const int64_t F = band.frames, W = band.width(), S = band.stats_per_frame();
  acc_t* coefficients = reinterpret_cast<acc_t*>(shared_bytes);  // [F][W]
  acc_t* proj_self = coefficients + F * W;                          // [F]
  acc_t* target_self = proj_self + F;                               // [F]
  acc_t* direct_stages = target_self + F;                           // [2][W]: one frame's, alternating
  const int64_t column = first_column + blockIdx.x;
  const int64_t b = column / N, n = column % N;
  const acc_t* grad_row = grad_loss + b * F;
  const acc_t* token = stats + column * F * S;  // [F][S], read through L1
  copy_coefficients(coefficients, table, band);
  __syncthreads();
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    proj_self[f] = proj_self_coefficient(token, coefficients, grad_row, band, f, scale, eps);
    target_self[f] = target_self_coefficient(token, coefficients, grad_row, band, f, scale, eps);
  }

  const int64_t p_column = b * proj.stride[0] + n * proj.stride[2];
  const int64_t y_column = b * target.stride[0] + n * target.stride[2];
  // grad p_f = sum_slot direct[slot] y_{f+o} - proj_self p_f; grad y_k = sum_slot direct[slot] p_{k-o} - target_self y_k
  int64_t stage = 0;  // counts the frames of both loops, so consecutive frames alternate stages
  for (int64_t f = 0; needs_proj_grad && f < F; ++f) {
    acc_t* direct = direct_stages + (stage++ % 2) * W;
    for (int64_t slot = threadIdx.x; slot < W; slot += blockDim.x) {
      direct[slot] = proj_direct_coefficient(token, coefficients, grad_row, band, f, slot, scale, eps);
    }
    __syncthreads();  // this frame's direct coefficients (and, first, the self coefficients) are written
    const int64_t out_row = ((b * F + f) * N + n) * D;
    for (int64_t i = int64_t(threadIdx.x) * kChunk; i < D; i += int64_t(blockDim.x) * kChunk) {
      acc_t out[kChunk], row[kChunk];
      load_chunk<acc_t, kVector>(proj, p_column + f * proj.stride[1], i, D, row);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = -proj_self[f] * row[j];
      for (int64_t slot = 0; slot < W; ++slot) {
        if (!band.lands(f, slot)) continue;
        const acc_t coefficient = direct[slot];
        load_chunk<acc_t, kVector>(target, y_column + (f + band.offset(slot)) * target.stride[1], i, D, row);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) out[j] += coefficient * row[j];
      }
      store_chunk<acc_t, kVector>(grad_proj, out_row, i, D, out);
    }
  }
  for (int64_t k = 0; needs_target_grad && k < F; ++k) {
    acc_t* direct = direct_stages + (stage++ % 2) * W;
    for (int64_t slot = threadIdx.x; slot < W; slot += blockDim.x) {
      direct[slot] = target_direct_coefficient(token, coefficients, grad_row, band, k, slot, scale, eps);
    }
    __syncthreads();
    const int64_t out_row = ((b * F + k) * N + n) * D;
    for (int64_t i = int64_t(threadIdx.x) * kChunk; i < D; i += int64_t(blockDim.x) * kChunk) {
      acc_t out[kChunk], row[kChunk];
      load_chunk<acc_t, kVector>(target, y_column + k * target.stride[1], i, D, row);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = -target_self[k] * row[j];
      for (int64_t slot = 0; slot < W; ++slot) {
        if (!target_slot_lands(band, k, slot)) continue;
        const acc_t coefficient = direct[slot];
        load_chunk<acc_t, kVector>(proj, p_column + (k - band.offset(slot)) * proj.stride[1], i, D, row);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) out[j] += coefficient * row[j];
      }
      store_chunk<acc_t, kVector>(grad_target, out_row, i, D, out);
    }
  }
}

#define CREPA_RETURN_IF_ERROR(expression)        \
  do {                                            \
    const cudaError_t crepa_error = (expression); \
    if (crepa_error != cudaSuccess) return crepa_error; \
  } while (0)

// The dynamic shared memory `kernel` may use on `device`: the device's per-block limit less the kernel's static
// shared memory (from sm_90 on, the cubins count the driver's 1 KB reservation there). The refusal before any work
// (dynamic_shared_limit_of) and the opt-in use this one number.
template <typename Kernel>
cudaError_t dynamic_shared_limit(Kernel kernel, int device, int64_t* bytes) {
  int64_t limit = 0;
  CREPA_RETURN_IF_ERROR(shared_limit_of(device, &limit));
  cudaFuncAttributes attributes;
  CREPA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, kernel));
  *bytes = limit - static_cast<int64_t>(attributes.sharedSizeBytes);
  return cudaSuccess;
}

// A kernel may use more than 48 KB of dynamic shared memory only after opting in, per kernel and device. It opts in
// to all it may use there, once, which covers every later launch. The record is keyed on the kernel pointer: the
// vector and element variants of a kernel have the same type, and each needs its own opt-in.
template <typename Kernel>
cudaError_t allow_shared_bytes(Kernel kernel, int64_t bytes, int device) {
  if (bytes <= kCudaDefaultSharedBytes) return cudaSuccess;
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> opted_in;  // (kernel, device)
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  if (opted_in.count(key) != 0) return cudaSuccess;
  int64_t dynamic_limit = 0;
  CREPA_RETURN_IF_ERROR(dynamic_shared_limit(kernel, device, &dynamic_limit));
  CREPA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_limit)));
  opted_in.insert(key);
  return cudaSuccess;
}

// The first column of launch `index` of a several-launch plan (in reverse order under the test switch).
inline int64_t first_column_of(const CudaKernelLaunch& plan, int64_t index) {
  return (cuda_launches_reversed() ? plan.launches - 1 - index : index) * plan.grid;
}

template <typename acc_t, bool kVector>
cudaError_t launch_forward_columns(const ForwardLaunch<acc_t>& a, const CudaKernelLaunch& plan, int device,
                                   cudaStream_t stream) {
  const auto kernel = forward_kernel<acc_t, kVector>;
  CREPA_RETURN_IF_ERROR(allow_shared_bytes(kernel, plan.shared_bytes, device));
  const int64_t columns = a.B * a.N;
  for (int64_t index = 0; index < plan.launches; ++index) {
    const int64_t first = first_column_of(plan, index);
    const unsigned blocks = static_cast<unsigned>(std::min(plan.grid, columns - first));
    CREPA_LAUNCH(kernel, blocks, plan.threads, plan.shared_bytes, stream, a.proj, a.target, first, a.N, a.D, a.band,
                 a.coefficients, a.eps, a.stats, a.token_similarity);
    CREPA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename acc_t, bool kVector>
cudaError_t launch_backward_columns(const BackwardLaunch<acc_t>& a, const CudaKernelLaunch& plan, int device,
                                    cudaStream_t stream) {
  const auto kernel = backward_kernel<acc_t, kVector>;
  CREPA_RETURN_IF_ERROR(allow_shared_bytes(kernel, plan.shared_bytes, device));
  const int64_t columns = a.B * a.N;
  const acc_t scale = acc_t(-1) / static_cast<acc_t>(a.N);
  for (int64_t index = 0; index < plan.launches; ++index) {
    const int64_t first = first_column_of(plan, index);
    const unsigned blocks = static_cast<unsigned>(std::min(plan.grid, columns - first));
    CREPA_LAUNCH(kernel, blocks, plan.threads, plan.shared_bytes, stream, a.grad_loss, a.proj, a.target, a.stats,
                 first, a.N, a.D, a.band, a.coefficients, a.eps, scale, a.grad_proj, a.grad_target,
                 a.needs_proj_grad, a.needs_target_grad);
    CREPA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t shared_limit_of(int device, int64_t* bytes) {
  static std::mutex mutex;
  static std::vector<int64_t> limits;
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(device) >= limits.size()) limits.resize(device + 1, -1);
  if (limits[device] < 0) {
    int value = 0;
    CREPA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    limits[device] = value;
  }
  *bytes = limits[device];
  return cudaSuccess;
}

namespace {
template <typename acc_t>
cudaError_t dynamic_shared_limit_for(int device, int64_t* bytes) {
  int64_t limits[4];
  CREPA_RETURN_IF_ERROR(dynamic_shared_limit(forward_kernel<acc_t, true>, device, &limits[0]));
  CREPA_RETURN_IF_ERROR(dynamic_shared_limit(forward_kernel<acc_t, false>, device, &limits[1]));
  CREPA_RETURN_IF_ERROR(dynamic_shared_limit(backward_kernel<acc_t, true>, device, &limits[2]));
  CREPA_RETURN_IF_ERROR(dynamic_shared_limit(backward_kernel<acc_t, false>, device, &limits[3]));
  *bytes = *std::min_element(limits, limits + 4);
  return cudaSuccess;
}
}  // namespace

cudaError_t dynamic_shared_limit_of(int device, int64_t acc_bytes, int64_t* bytes) {
  return acc_bytes == 8 ? dynamic_shared_limit_for<double>(device, bytes)
                        : dynamic_shared_limit_for<float>(device, bytes);
}

template <typename acc_t>
cudaError_t launch_forward(const ForwardLaunch<acc_t>& a, int device, cudaStream_t stream) {
  const CudaLaunchPlan plan = plan_cuda_launch(a.B, a.band.frames, a.N, a.D, a.band, sizeof(acc_t));
  const cudaError_t error = a.vector ? launch_forward_columns<acc_t, true>(a, plan.forward, device, stream)
                                     : launch_forward_columns<acc_t, false>(a, plan.forward, device, stream);
  if (error != cudaSuccess) return error;
  CREPA_LAUNCH(reduce_tokens_kernel<acc_t>, plan.reduce.grid, plan.reduce.threads, plan.reduce.shared_bytes, stream,
               a.token_similarity, a.B, a.N, a.band.frames, -1.0 / static_cast<double>(a.N), a.loss);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_backward(const BackwardLaunch<acc_t>& a, int device, cudaStream_t stream) {
  const CudaLaunchPlan plan = plan_cuda_launch(a.B, a.band.frames, a.N, a.D, a.band, sizeof(acc_t));
  return a.vector ? launch_backward_columns<acc_t, true>(a, plan.backward, device, stream)
                  : launch_backward_columns<acc_t, false>(a, plan.backward, device, stream);
}

template cudaError_t launch_forward<float>(const ForwardLaunch<float>&, int, cudaStream_t);
template cudaError_t launch_forward<double>(const ForwardLaunch<double>&, int, cudaStream_t);
template cudaError_t launch_backward<float>(const BackwardLaunch<float>&, int, cudaStream_t);
template cudaError_t launch_backward<double>(const BackwardLaunch<double>&, int, cudaStream_t);

}  // namespace crepa
