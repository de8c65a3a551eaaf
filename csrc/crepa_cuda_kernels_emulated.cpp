// The CUDA kernels as C++ for the HIP CPU Runtime (the "cuda_emulated" backend): the same source, built by the host
// compiler with -DCREPA_HIP_CPU, where crepa_cuda_portability.h maps it onto the runtime.
#include "crepa_cuda_kernels.cu"
