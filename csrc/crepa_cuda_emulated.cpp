// The Python module of the emulated CUDA extension (the "cuda_emulated" backend): crepa_cuda_kernels.cu built by g++
// against the HIP CPU Runtime, with crepa_cuda.cpp's glue and crepa_ops.cpp's helpers, all with -DCREPA_HIP_CPU.
// The ops are crepa_kernels_emulated::align_forward / align_backward (crepa_cuda.cpp); this module adds the emulated
// devices (one per GPU architecture, with its shared-memory limits) and the test switches.
#include <torch/extension.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "crepa_cuda_launch.h"
#include "crepa_cuda_plan.h"
#include "crepa_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "add_device",
      [](int64_t shared_optin_bytes, int64_t static_shared_bytes) {
        TORCH_CHECK_VALUE(shared_optin_bytes > 0 && static_shared_bytes >= 0,
                          "shared_optin_bytes, static_shared_bytes: expected > 0 and >= 0, got ", shared_optin_bytes,
                          " and ", static_shared_bytes);
        return crepa::emulated::add_device(shared_optin_bytes, static_shared_bytes);
      },
      "A new emulated GPU whose blocks may use shared_optin_bytes of shared memory "
      "(cudaDevAttrMaxSharedMemoryPerBlockOptin) and whose kernels report static_shared_bytes "
      "(cudaFuncAttributes.sharedSizeBytes); returns its device number.");
  m.def(
      "set_current_device",
      [](int device) {
        TORCH_CHECK_VALUE(crepa::emulated::set_current_device(device), "device: expected a number add_device returned, got ",
                          device);
      },
      "The emulated GPU the next calls run on (as cudaSetDevice).");
  m.def("current_device", &crepa::emulated::current_device);
  m.def(
      "dynamic_shared_limit",
      [](int device, int64_t acc_bytes) {
        // as the glue's device guard: function attributes are the current device's
        const int previous = crepa::emulated::current_device();
        TORCH_CHECK_VALUE(crepa::emulated::set_current_device(device), "device: expected a number add_device "
                          "returned, got ", device);
        int64_t bytes = 0;
        const cudaError_t error = crepa::dynamic_shared_limit_of(device, acc_bytes, &bytes);
        crepa::emulated::set_current_device(previous);
        TORCH_CHECK(error == cudaSuccess, "emulated CUDA error: ", cudaGetErrorString(error));
        return bytes;
      },
      "The dynamic shared memory the kernels accumulating in acc_bytes may use on the device: what the forward "
      "refuses beyond, and what the launches opt in to.");
  m.def(
      "runtime_counts",
      [] {
        const std::lock_guard<std::mutex> lock(crepa::emulated::runtime_mutex());
        const auto& state = crepa::emulated::runtime();
        pybind11::dict counts;
        counts["launches"] = state.launches;
        counts["refused_launches"] = state.refused_launches;
        counts["opt_in_calls"] = state.opt_in_calls;
        counts["distinct_kernels"] = static_cast<int64_t>(state.kernels_launched.size());
        return counts;
      },
      "Calls the launch code made into the emulated runtime: {'launches', 'refused_launches', 'opt_in_calls', "
      "'distinct_kernels' (how many of the kernels have run at least once)}.");
  m.def(
      "reset_runtime_counts",
      [] {
        const std::lock_guard<std::mutex> lock(crepa::emulated::runtime_mutex());
        auto& state = crepa::emulated::runtime();
        state.launches = state.refused_launches = state.opt_in_calls = 0;
        state.kernels_launched.clear();
      },
      "Zeroes runtime_counts (the devices keep their opt-ins, as a GPU does).");
  m.def("set_cuda_grid_limit", &crepa::set_cuda_grid_limit,
        "Test switch: at most this many blocks per launch (0: CUDA's limit), so small inputs take several launches.");
  m.def("set_cuda_launches_reversed", &crepa::set_cuda_launches_reversed,
        "Test switch: a several-launch plan launches last to first.");
  m.def("set_poison_buffers", &crepa::set_poison_buffers,
        "Test switch: fill every buffer the kernels allocate with NaN before they write it.");
  m.def(
      "bfloat16_round",
      [](const at::Tensor& values) {
        TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat, "values: expected float32, got ", values.scalar_type());
        const at::Tensor input = values.contiguous().cpu();
        at::Tensor bits = at::empty(input.sizes(), input.options().dtype(at::kShort));
        const float* in = input.data_ptr<float>();
        int16_t* out = bits.data_ptr<int16_t>();
        for (int64_t i = 0; i < input.numel(); ++i) out[i] = static_cast<int16_t>(__float2bfloat16_rn(in[i]).bits);
        return bits;
      },
      "float32 values -> the int16 bit patterns of __float2bfloat16_rn (the portability header's bf16).");
  m.def(
      "bfloat16_widen",
      [](const at::Tensor& bits) {
        TORCH_CHECK_VALUE(bits.scalar_type() == at::kShort, "bits: expected int16, got ", bits.scalar_type());
        const at::Tensor input = bits.contiguous().cpu();
        at::Tensor values = at::empty(input.sizes(), input.options().dtype(at::kFloat));
        const int16_t* in = input.data_ptr<int16_t>();
        float* out = values.data_ptr<float>();
        for (int64_t i = 0; i < input.numel(); ++i) {
          out[i] = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(in[i])});
        }
        return values;
      },
      "int16 bf16 bit patterns -> float32, as the portability header's __bfloat162float reads them.");
}
