// The CUDA kernel: one thread block per token column (b, n), threads across D in chunks of 8 elements.
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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "crepa_ops.h"

namespace crepa {
namespace {

constexpr int kChunk = 8;  // elements per thread step: one 16-byte load of bf16 / fp16
constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

enum class Dtype : int { kFloat, kDouble, kBFloat16, kHalf };

Dtype dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kHalf;
    default: TORCH_CHECK(false, "crepa_kernels: unsupported dtype ", type);
  }
}

// A [B, F, N, D] tensor by raw pointer, element strides and dtype (passed by value to the kernels).
struct Strided {
  void* data;
  int64_t stride[4];
  Dtype dtype;
};

Strided strided(const at::Tensor& x) {
  return Strided{const_cast<void*>(x.data_ptr()), {x.stride(0), x.stride(1), x.stride(2), x.stride(3)},
                 dtype_of(x.scalar_type())};
}

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

// kChunk elements from a 16-byte aligned address, in 16-byte transactions.
template <typename acc_t>
__device__ __forceinline__ void load_vector(const void* data, Dtype dtype, int64_t index, acc_t (&out)[kChunk]) {
  switch (dtype) {
    case Dtype::kFloat: {
      const float4* v = reinterpret_cast<const float4*>(static_cast<const float*>(data) + index);
      const float4 lo = v[0], hi = v[1];
      const float e[kChunk] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = static_cast<acc_t>(e[j]);
      break;
    }
    case Dtype::kDouble: {
      const double2* v = reinterpret_cast<const double2*>(static_cast<const double*>(data) + index);
#pragma unroll
      for (int j = 0; j < kChunk / 2; ++j) {
        const double2 pair = v[j];
        out[2 * j] = static_cast<acc_t>(pair.x);
        out[2 * j + 1] = static_cast<acc_t>(pair.y);
      }
      break;
    }
    case Dtype::kBFloat16: {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(data) + index);
      __nv_bfloat16 e[kChunk];
      memcpy(e, &raw, sizeof(raw));
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = static_cast<acc_t>(__bfloat162float(e[j]));
      break;
    }
    default: {
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __half*>(data) + index);
      __half e[kChunk];
      memcpy(e, &raw, sizeof(raw));
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = static_cast<acc_t>(__half2float(e[j]));
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_vector(void* data, Dtype dtype, int64_t index, const acc_t (&in)[kChunk]) {
  switch (dtype) {
    case Dtype::kFloat: {
      float4* v = reinterpret_cast<float4*>(static_cast<float*>(data) + index);
      v[0] = make_float4(in[0], in[1], in[2], in[3]);
      v[1] = make_float4(in[4], in[5], in[6], in[7]);
      break;
    }
    case Dtype::kDouble: {
      double2* v = reinterpret_cast<double2*>(static_cast<double*>(data) + index);
#pragma unroll
      for (int j = 0; j < kChunk / 2; ++j) v[j] = make_double2(in[2 * j], in[2 * j + 1]);
      break;
    }
    case Dtype::kBFloat16: {
      __nv_bfloat16 e[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) e[j] = __float2bfloat16_rn(static_cast<float>(in[j]));
      uint4 raw;
      memcpy(&raw, e, sizeof(raw));
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(data) + index) = raw;
      break;
    }
    default: {
      __half e[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) e[j] = __float2half_rn(static_cast<float>(in[j]));
      uint4 raw;
      memcpy(&raw, e, sizeof(raw));
      *reinterpret_cast<uint4*>(static_cast<__half*>(data) + index) = raw;
    }
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
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
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

template <typename acc_t>
__device__ void fill_coefficients(acc_t* coefficients, const Band& band, acc_t tau, bool normalize_weights) {
  const int64_t width = band.width();
  for (int64_t e = threadIdx.x; e < band.frames * width; e += blockDim.x) {
    coefficients[e] = frame_coefficient<acc_t>(band, e / width, e % width, tau, normalize_weights);
  }
}

template <typename acc_t, bool kVector>
__global__ void forward_kernel(Strided proj, Strided target, int64_t N, int64_t D, Band band, acc_t tau,
                               bool normalize_weights, acc_t eps, acc_t* __restrict__ stats,
                               acc_t* __restrict__ token_similarity) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t F = band.frames, W = band.width(), S = band.stats_per_frame();
  acc_t* coefficients = reinterpret_cast<acc_t*>(shared_bytes);  // [F][W]
  acc_t* token = coefficients + F * W;                              // [F][S], this column's stats
  acc_t* warp_sums = token + F * S;                                 // [warps][S]
  const int64_t column = blockIdx.x;
  const int64_t b = column / N, n = column % N;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  const int64_t p_column = b * proj.stride[0] + n * proj.stride[2];
  const int64_t y_column = b * target.stride[0] + n * target.stride[2];
  fill_coefficients(coefficients, band, tau, normalize_weights);

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
      stats[(column * F + f) * S + s] = total;
    }
    __syncthreads();  // warp_sums is reused by the next frame
  }
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    token_similarity[column * F + f] = frame_similarity(token, coefficients, band, f, eps);
  }
}

// loss[b, f] = scale * sum_n token_similarity[b, n, f], one block per (b, f), in a fixed tree.
template <typename acc_t>
__global__ void reduce_tokens_kernel(const acc_t* __restrict__ token_similarity, int64_t N, int64_t F, double scale,
                                     acc_t* __restrict__ loss) {
  __shared__ double partial[kReduceThreads];  // double: N can be large, and this pass is tiny
  const int64_t b = blockIdx.x / F, f = blockIdx.x % F;
  double sum = 0.0;
  for (int64_t n = threadIdx.x; n < N; n += kReduceThreads) sum += token_similarity[(b * N + n) * F + f];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[blockIdx.x] = static_cast<acc_t>(scale * partial[0]);
}

template <typename acc_t, bool kVector>
__global__ void backward_kernel(const acc_t* __restrict__ grad_loss, Strided proj, Strided target,
                                const acc_t* __restrict__ stats, int64_t N, int64_t D, Band band, acc_t tau,
                                bool normalize_weights, acc_t eps, acc_t scale, Strided grad_proj,
                                Strided grad_target, bool needs_proj_grad, bool needs_target_grad) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t F = band.frames, W = band.width(), S = band.stats_per_frame();
  acc_t* coefficients = reinterpret_cast<acc_t*>(shared_bytes);  // [F][W]
  acc_t* token = coefficients + F * W;                              // [F][S]
  acc_t* proj_direct = token + F * S;                               // [F][W]
  acc_t* target_direct = proj_direct + F * W;                       // [F][W]
  acc_t* proj_self = target_direct + F * W;                         // [F]
  acc_t* target_self = proj_self + F;                               // [F]
  const int64_t column = blockIdx.x;
  const int64_t b = column / N, n = column % N;
  const acc_t* grad_row = grad_loss + b * F;
  fill_coefficients(coefficients, band, tau, normalize_weights);
  for (int64_t e = threadIdx.x; e < F * S; e += blockDim.x) token[e] = stats[column * F * S + e];
  __syncthreads();
  for (int64_t e = threadIdx.x; e < F * W; e += blockDim.x) {
    const int64_t f = e / W, slot = e % W;
    proj_direct[e] = proj_direct_coefficient(token, coefficients, grad_row, band, f, slot, scale, eps);
    target_direct[e] = target_direct_coefficient(token, coefficients, grad_row, band, f, slot, scale, eps);
  }
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    proj_self[f] = proj_self_coefficient(token, coefficients, grad_row, band, f, scale, eps);
    target_self[f] = target_self_coefficient(token, coefficients, grad_row, band, f, scale, eps);
  }
  __syncthreads();

  const int64_t p_column = b * proj.stride[0] + n * proj.stride[2];
  const int64_t y_column = b * target.stride[0] + n * target.stride[2];
  // grad p_f = sum_slot proj_direct y_{f+o} - proj_self p_f; grad y_k = sum_slot target_direct p_{k-o} - target_self y_k
  for (int64_t f = 0; needs_proj_grad && f < F; ++f) {
    const int64_t out_row = ((b * F + f) * N + n) * D;
    for (int64_t i = int64_t(threadIdx.x) * kChunk; i < D; i += int64_t(blockDim.x) * kChunk) {
      acc_t out[kChunk], row[kChunk];
      load_chunk<acc_t, kVector>(proj, p_column + f * proj.stride[1], i, D, row);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = -proj_self[f] * row[j];
      for (int64_t slot = 0; slot < W; ++slot) {
        if (!band.lands(f, slot)) continue;
        const acc_t coefficient = proj_direct[f * W + slot];
        load_chunk<acc_t, kVector>(target, y_column + (f + band.offset(slot)) * target.stride[1], i, D, row);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) out[j] += coefficient * row[j];
      }
      store_chunk<acc_t, kVector>(grad_proj, out_row, i, D, out);
    }
  }
  if (!needs_target_grad) return;
  for (int64_t k = 0; k < F; ++k) {
    const int64_t out_row = ((b * F + k) * N + n) * D;
    for (int64_t i = int64_t(threadIdx.x) * kChunk; i < D; i += int64_t(blockDim.x) * kChunk) {
      acc_t out[kChunk], row[kChunk];
      load_chunk<acc_t, kVector>(target, y_column + k * target.stride[1], i, D, row);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = -target_self[k] * row[j];
      for (int64_t slot = 0; slot < W; ++slot) {
        if (!target_slot_lands(band, k, slot)) continue;
        const acc_t coefficient = target_direct[k * W + slot];
        load_chunk<acc_t, kVector>(proj, p_column + (k - band.offset(slot)) * proj.stride[1], i, D, row);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) out[j] += coefficient * row[j];
      }
      store_chunk<acc_t, kVector>(grad_target, out_row, i, D, out);
    }
  }
}

// 16-byte chunk access is valid when every row starts 16-byte aligned and D is a whole number of chunks.
bool rows_are_16_byte_aligned(const at::Tensor& x) {
  if (x.size(3) % kChunk != 0 || x.stride(3) != 1) return false;
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim < 3; ++dim) {
    if (x.size(dim) > 1 && (x.stride(dim) * x.element_size()) % 16 != 0) return false;
  }
  return true;
}

int threads_for(int64_t D) {
  const int64_t chunks = (D + kChunk - 1) / kChunk;
  const int64_t threads = (chunks + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(threads < kMaxThreads ? threads : kMaxThreads);
}

int64_t grid_for(int64_t columns) {
  TORCH_CHECK(columns <= int64_t(INT32_MAX), "crepa_kernels CUDA: B * N = ", columns, " exceeds the grid limit");
  return columns;
}

void check_shared_bytes(int64_t bytes, const Band& band) {
  TORCH_CHECK(bytes <= kMaxSharedBytes, "crepa_kernels CUDA: F = ", band.frames, " with a band of ", band.width(),
              " slots needs ", bytes, " bytes of shared memory per block, more than ", kMaxSharedBytes);
}

template <typename acc_t, bool kVector>
void launch_forward(const at::Tensor& proj, const at::Tensor& target, const Band& band, double tau,
                    bool normalize_weights, double eps, at::Tensor& loss, at::Tensor& stats) {
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2), D = proj.size(3);
  const int threads = threads_for(D);
  const int64_t shared = (F * band.width() + F * band.stats_per_frame() + (threads / kWarp) * band.stats_per_frame()) *
                         int64_t(sizeof(acc_t));
  check_shared_bytes(shared, band);
  at::Tensor token_similarity = new_buffer({B, N, F}, loss.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  forward_kernel<acc_t, kVector><<<grid_for(B * N), threads, shared, stream>>>(
      strided(proj), strided(target), N, D, band, static_cast<acc_t>(tau), normalize_weights,
      static_cast<acc_t>(eps), stats.data_ptr<acc_t>(), token_similarity.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_tokens_kernel<acc_t><<<B * F, kReduceThreads, 0, stream>>>(
      token_similarity.data_ptr<acc_t>(), N, F, -1.0 / static_cast<double>(N), loss.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t, bool kVector>
void launch_backward(const at::Tensor& grad_loss, const at::Tensor& proj, const at::Tensor& target,
                     const at::Tensor& stats, const Band& band, double tau, bool normalize_weights, double eps,
                     at::Tensor& grad_proj, at::Tensor& grad_target, bool needs_proj_grad, bool needs_target_grad) {
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2), D = proj.size(3);
  const int threads = threads_for(D);
  const int64_t shared = (3 * F * band.width() + F * band.stats_per_frame() + 2 * F) * int64_t(sizeof(acc_t));
  check_shared_bytes(shared, band);
  // a gradient that is not asked for is an empty [0] tensor, never written: any view of a real one stands in
  const Strided grad_proj_view = needs_proj_grad ? strided(grad_proj) : strided(grad_target);
  const Strided grad_target_view = needs_target_grad ? strided(grad_target) : strided(grad_proj);
  backward_kernel<acc_t, kVector><<<grid_for(B * N), threads, shared, c10::cuda::getCurrentCUDAStream()>>>(
      grad_loss.data_ptr<acc_t>(), strided(proj), strided(target), stats.data_ptr<acc_t>(), N, D, band,
      static_cast<acc_t>(tau), normalize_weights, static_cast<acc_t>(eps), acc_t(-1) / static_cast<acc_t>(N),
      grad_proj_view, grad_target_view, needs_proj_grad, needs_target_grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> align_forward_cuda(const at::Tensor& proj, const at::Tensor& target,
                                                      int64_t neighbors, bool cumulative, double tau,
                                                      bool normalize_weights, double eps) {
  check_inputs(proj, target, neighbors, tau, eps);
  TORCH_CHECK(proj.is_cuda(), "align_forward_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(proj.device());
  const int64_t B = proj.size(0), F = proj.size(1), N = proj.size(2);
  const Band band = Band::make(F, neighbors, cumulative);
  const auto options = proj.options().dtype(accumulate_type(proj, target));
  at::Tensor loss = new_buffer({B, F}, options);
  at::Tensor stats = new_buffer({B, N, F, band.stats_per_frame()}, options);
  const bool vector = rows_are_16_byte_aligned(proj) && rows_are_16_byte_aligned(target);
  const bool wide = options.dtype() == at::kDouble;
  if (wide && vector) launch_forward<double, true>(proj, target, band, tau, normalize_weights, eps, loss, stats);
  if (wide && !vector) launch_forward<double, false>(proj, target, band, tau, normalize_weights, eps, loss, stats);
  if (!wide && vector) launch_forward<float, true>(proj, target, band, tau, normalize_weights, eps, loss, stats);
  if (!wide && !vector) launch_forward<float, false>(proj, target, band, tau, normalize_weights, eps, loss, stats);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> align_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& proj,
                                                       const at::Tensor& target, const at::Tensor& stats,
                                                       int64_t neighbors, bool cumulative, double tau,
                                                       bool normalize_weights, double eps, bool needs_proj_grad,
                                                       bool needs_target_grad) {
  check_inputs(proj, target, neighbors, tau, eps);
  TORCH_CHECK(proj.is_cuda(), "align_backward_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(proj.device());
  const Band band = Band::make(proj.size(1), neighbors, cumulative);
  check_backward_inputs(grad_loss, proj, target, stats, band);
  const auto acc = accumulate_type(proj, target);
  const at::Tensor grad = grad_loss.to(acc).contiguous();  // [B, F]; expanded (stride 0) after a mean
  auto [grad_proj, grad_target] = new_gradients(proj, target, needs_proj_grad, needs_target_grad);
  if (!needs_proj_grad && !needs_target_grad) return {grad_proj, grad_target};
  const bool vector = rows_are_16_byte_aligned(proj) && rows_are_16_byte_aligned(target) &&
                      (!needs_proj_grad || rows_are_16_byte_aligned(grad_proj)) &&
                      (!needs_target_grad || rows_are_16_byte_aligned(grad_target));
  const bool wide = acc == at::kDouble;
#define CREPA_LAUNCH_BACKWARD(ACC, VECTOR)                                                                   \
  launch_backward<ACC, VECTOR>(grad, proj, target, stats, band, tau, normalize_weights, eps, grad_proj, \
                               grad_target, needs_proj_grad, needs_target_grad)
  if (wide && vector) CREPA_LAUNCH_BACKWARD(double, true);
  if (wide && !vector) CREPA_LAUNCH_BACKWARD(double, false);
  if (!wide && vector) CREPA_LAUNCH_BACKWARD(float, true);
  if (!wide && !vector) CREPA_LAUNCH_BACKWARD(float, false);
#undef CREPA_LAUNCH_BACKWARD
  return {grad_proj, grad_target};
}

}  // namespace
}  // namespace crepa

TORCH_LIBRARY_IMPL(crepa_kernels, CUDA, m) {
  m.impl("align_forward", &crepa::align_forward_cuda);
  m.impl("align_backward", &crepa::align_backward_cuda);
}
