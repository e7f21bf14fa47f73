// MIXPREC_HOST_DEVICE marks the maths shared by the CPU and CUDA kernels: __host__ __device__
// under nvcc, nothing under the host compiler. Every shared-maths header includes this one.
#pragma once

#if defined(__CUDACC__)
#define MIXPREC_HOST_DEVICE __host__ __device__
#else
#define MIXPREC_HOST_DEVICE
#endif
