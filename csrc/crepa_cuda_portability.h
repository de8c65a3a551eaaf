// Everything in which the CUDA kernels' two builds differ, so that crepa_cuda_kernels.cu has one text for both:
//
//   nvcc                      the CUDA runtime and headers, for the GPU (the extension's "cuda" backend)
//   g++ -DCREPA_HIP_CPU       ROCm's HIP CPU Runtime (header-only; blocks and threads run as fibers on the CPU,
//                             __syncthreads() is a barrier between them), for the "cuda_emulated" backend and the
//                             sanitizer harness
//
// What this header supplies in the HIP CPU build: dynamic shared memory (CREPA_DYNAMIC_SHARED), 32-lane shuffles
// (the runtime's warpSize is 64), a bf16 type with the CUDA names that rounds to nearest even, 16-byte loads and
// stores (crepa_load16 / crepa_store16), the launch (CREPA_LAUNCH) and the few runtime calls the launch code makes
// (function attributes, the shared-memory opt-in, errors). Those runtime calls go to emulated devices, each with the
// shared-memory limits of one architecture (crepa::emulated::add_device). A device keeps, per kernel pointer, what
// the opt-in allowed, and refuses a launch the way a GPU would: more than 48 KB of dynamic shared memory without
// that kernel's opt-in, or more than the opt-in, fails with cudaErrorInvalidValue. Launches run to completion before
// CREPA_LAUNCH returns, in the calling thread, blocks in grid order (the runtime's own stream thread, which spins
// while idle, is never started). Where a GPU leaves behaviour undefined the emulation makes it show: dynamic shared
// memory starts as NaN bytes in every block, and a 16-byte access to an unaligned address is a launch error.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(CREPA_HIP_CPU)

#include <cuda_runtime_api.h>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CREPA_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define CREPA_LAUNCH(kernel, blocks, threads, shared_bytes, stream, ...) \
  kernel<<<(blocks), (threads), (shared_bytes), (stream)>>>(__VA_ARGS__)

template <typename T>
__device__ __forceinline__ T crepa_shuffle_xor(T value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}

// 16 bytes from / to a 16-byte aligned address, as one transaction
using crepa_bytes16 = uint4;
__device__ __forceinline__ uint4 crepa_load16(const void* address) { return *static_cast<const uint4*>(address); }
__device__ __forceinline__ void crepa_store16(void* address, uint4 value) { *static_cast<uint4*>(address) = value; }
#endif  // __CUDACC__

#else  // CREPA_HIP_CPU

#include <hip/hip_runtime.h>

#include <cmath>
#include <map>
#include <mutex>
#include <set>
#include <utility>
#include <vector>

// ---- the runtime names the launch code uses --------------------------------------------------------------------
using cudaError_t = hipError_t;
using cudaStream_t = hipStream_t;
constexpr cudaError_t cudaSuccess = hipSuccess;
constexpr cudaError_t cudaErrorInvalidValue = hipErrorInvalidValue;
constexpr cudaError_t cudaErrorInvalidConfiguration = hipErrorInvalidConfiguration;
constexpr cudaError_t cudaErrorMisalignedAddress = hipErrorIllegalAddress;  // the runtime has no code of its own
inline const char* cudaGetErrorString(cudaError_t error) { return hipGetErrorString(error); }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;  // static shared memory, as the emulated architecture's cubins report it
};

namespace crepa {
namespace emulated {

// The emulated GPUs, one per architecture the caller adds (add_device), each with its shared-memory limits and what
// each kernel opted in to there; the current one is what cudaSetDevice would have chosen. Counts are for the tests.
struct Device {
  int64_t shared_optin_bytes;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int64_t static_shared_bytes;  // every kernel's sharedSizeBytes (the driver's reservation, from sm_90 on)
  std::map<const void*, int64_t> opted_in;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize
};

struct Runtime {
  std::vector<Device> devices;
  int current = 0;
  int64_t opt_in_calls = 0, launches = 0, refused_launches = 0;
  std::set<const void*> kernels_launched;  // which kernels (the vector or the element variant) ever ran
  cudaError_t last_error = cudaSuccess;
};

inline std::mutex& runtime_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline Runtime& runtime() {  // one per loaded library
  static Runtime state;
  return state;
}

// A new emulated GPU; returns its device number.
inline int add_device(int64_t shared_optin_bytes, int64_t static_shared_bytes) {
  const std::lock_guard<std::mutex> lock(runtime_mutex());
  runtime().devices.push_back(Device{shared_optin_bytes, static_shared_bytes, {}});
  return static_cast<int>(runtime().devices.size()) - 1;
}

inline bool set_current_device(int device) {
  const std::lock_guard<std::mutex> lock(runtime_mutex());
  if (device < 0 || device >= static_cast<int>(runtime().devices.size())) return false;
  runtime().current = device;
  return true;
}

inline int current_device() {
  const std::lock_guard<std::mutex> lock(runtime_mutex());
  return runtime().current;
}

// Called with runtime_mutex held.
inline Device* device_or_null(int device) {
  auto& devices = runtime().devices;
  return device >= 0 && device < static_cast<int>(devices.size()) ? &devices[device] : nullptr;
}

inline cudaError_t fail(cudaError_t error) {  // with runtime_mutex held
  runtime().last_error = error;
  return error;
}

// The checks a GPU makes at launch, then the blocks, one after the other, to completion, in the calling thread.
template <typename... Parameters, typename... Arguments>
void launch(void (*kernel)(Parameters...), int64_t blocks, int64_t threads, int64_t shared_bytes,
            Arguments&&... arguments) {
  {
    const std::lock_guard<std::mutex> lock(runtime_mutex());
    Runtime& state = runtime();
    ++state.launches;
    const Device* gpu = device_or_null(state.current);
    if (gpu == nullptr || blocks < 1 || blocks > 2147483647 || threads < 1 || threads > 1024) {
      ++state.refused_launches;
      fail(cudaErrorInvalidConfiguration);
      return;
    }
    const auto opt_in = gpu->opted_in.find(reinterpret_cast<const void*>(kernel));
    const int64_t allowed = opt_in == gpu->opted_in.end() ? 48 * 1024 : opt_in->second;
    if (shared_bytes > allowed || shared_bytes + gpu->static_shared_bytes > gpu->shared_optin_bytes) {
      ++state.refused_launches;
      fail(cudaErrorInvalidValue);
      return;
    }
    state.kernels_launched.insert(reinterpret_cast<const void*>(kernel));
  }
  const auto body = [kernel](auto&&... values) noexcept { kernel(std::forward<decltype(values)>(values)...); };
  const auto values = std::make_tuple(static_cast<Parameters>(arguments)...);
  struct {
    const decltype(body)* body_;
    const decltype(values)* values_;
    void operator()() const noexcept { std::apply(*body_, *values_); }
  } call{&body, &values};
  const hip::detail::Tiled_domain domain{dim3(static_cast<uint32_t>(threads)), dim3(static_cast<uint32_t>(blocks)),
                                         static_cast<uint32_t>(shared_bytes), std::move(call)};
  for_each_tile(domain, body, values);
}

}  // namespace emulated
}  // namespace crepa

inline cudaError_t cudaGetLastError() {
  const std::lock_guard<std::mutex> lock(crepa::emulated::runtime_mutex());
  return std::exchange(crepa::emulated::runtime().last_error, cudaSuccess);
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  const std::lock_guard<std::mutex> lock(crepa::emulated::runtime_mutex());
  const crepa::emulated::Device* gpu = crepa::emulated::device_or_null(device);
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin || gpu == nullptr) return cudaErrorInvalidValue;
  *value = static_cast<int>(gpu->shared_optin_bytes);
  return cudaSuccess;
}

// Of the current device, as CUDA's.
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*) {
  const std::lock_guard<std::mutex> lock(crepa::emulated::runtime_mutex());
  const crepa::emulated::Device* gpu = crepa::emulated::device_or_null(crepa::emulated::runtime().current);
  if (gpu == nullptr) return cudaErrorInvalidValue;
  attributes->sharedSizeBytes = static_cast<size_t>(gpu->static_shared_bytes);
  return cudaSuccess;
}

// As CUDA: on the current device; a size beyond what the device leaves next to the static shared memory is refused.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  const std::lock_guard<std::mutex> lock(crepa::emulated::runtime_mutex());
  crepa::emulated::Runtime& state = crepa::emulated::runtime();
  ++state.opt_in_calls;
  crepa::emulated::Device* gpu = crepa::emulated::device_or_null(state.current);
  if (gpu == nullptr || attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value + gpu->static_shared_bytes > gpu->shared_optin_bytes) {
    return crepa::emulated::fail(cudaErrorInvalidValue);
  }
  gpu->opted_in[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// ---- the device side ------------------------------------------------------------------------------------------
#define __align__(bytes) alignas(bytes)
// A GPU's shared memory holds anything when a block starts; here it holds all-ones bytes (NaN in every float type),
// written by thread 0, which the runtime runs first in each block: a read before the block's own write shows.
#define CREPA_DYNAMIC_SHARED(type, name) \
  HIP_DYNAMIC_SHARED(type, name)         \
  if (threadIdx.x == 0) std::memset(name, 0xff, scratchpad_size(domain(::hip::detail::Tile::this_tile())))
#define CREPA_LAUNCH(kernel, blocks, threads, shared_bytes, stream, ...) \
  crepa::emulated::launch(kernel, (blocks), (threads), (shared_bytes), __VA_ARGS__)

// The kernels' warps are 32 lanes; the runtime's are 64, so the shuffle names its width.
template <typename T>
inline T crepa_shuffle_xor(T value, int lane_mask) {
  return __shfl_xor(value, lane_mask, 32);
}

struct alignas(16) crepa_bytes16 {  // the runtime's uint4 is not trivially copyable
  uint32_t words[4];
};
namespace crepa {
namespace emulated {
// A GPU faults on a 16-byte access to an address that is not 16-byte aligned (cudaErrorMisalignedAddress); here
// the access goes through, and the fault is what the next cudaGetLastError returns.
inline void check_16_byte_aligned(const void* address) {
  if (reinterpret_cast<uintptr_t>(address) % 16 == 0) return;
  const std::lock_guard<std::mutex> lock(runtime_mutex());
  fail(cudaErrorMisalignedAddress);
}
}  // namespace emulated
}  // namespace crepa

inline crepa_bytes16 crepa_load16(const void* address) {
  crepa::emulated::check_16_byte_aligned(address);
  crepa_bytes16 value;
  std::memcpy(&value, address, sizeof(value));
  return value;
}
inline void crepa_store16(void* address, crepa_bytes16 value) {
  crepa::emulated::check_16_byte_aligned(address);
  std::memcpy(address, &value, sizeof(value));
}

// bf16: the high half of an fp32. Conversion to it rounds to nearest, ties to even, as __float2bfloat16_rn does;
// a NaN stays a NaN (quiet, sign kept).
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 value) {
  const uint32_t bits = uint32_t(value.bits) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}
inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return __nv_bfloat16{static_cast<uint16_t>((bits >> 16) | 0x0040u)};
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);  // half an ulp, plus one when the kept lsb is odd
  return __nv_bfloat16{static_cast<uint16_t>((bits + rounding) >> 16)};
}

#endif  // CREPA_HIP_CPU
