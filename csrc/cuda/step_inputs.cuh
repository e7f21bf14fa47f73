// Host-side helpers every fused-optimizer CUDA op shares: optional tensors as device pointers,
// the numels of a list, the device check, and the step counters, incremented on the device
// unless found_inf is set (one small kernel; the pointers travel as a kernel parameter, so it is
// CUDA-graph safe). In an anonymous namespace: each .cu file gets its own copy of the kernel.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace mixprec::cuda {
namespace {

// steps[t] += 1 unless found_inf: one small block before the update, as torch does. The step
// pointers travel as a kernel parameter (CUDA-graph safe); longer lists take more launches.
constexpr int kStepsPerLaunch = 480;  // 3840 bytes of pointers: inside the 4 KiB parameter limit
struct StepPointers {
  float* steps[kStepsPerLaunch];
  int count;
};

__global__ void increment_steps_kernel(const __grid_constant__ StepPointers list, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int i = threadIdx.x; i < list.count; i += blockDim.x) *list.steps[i] += 1.0f;
}

void* ptr_or_null(at::TensorList list, size_t i) { return list.empty() ? nullptr : list[i].data_ptr(); }

const float* scalar_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void increment_steps(at::TensorList steps, const float* found_inf, cudaStream_t stream) {
  StepPointers list;
  for (size_t first = 0; first < steps.size(); first += kStepsPerLaunch) {
    list.count = static_cast<int>(std::min<size_t>(kStepsPerLaunch, steps.size() - first));
    for (int i = 0; i < list.count; ++i) list.steps[i] = steps[first + i].data_ptr<float>();
    increment_steps_kernel<<<1, kBlockThreads, 0, stream>>>(list, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::vector<int64_t> numels_of(at::TensorList params) {
  std::vector<int64_t> n;
  for (const at::Tensor& p : params) n.push_back(p.numel());
  return n;
}

void check_on_cuda(const char* op, at::TensorList params) {
  TORCH_CHECK(params[0].is_cuda(), op, ": params are on ", params[0].device(),
              "; the CUDA kernel needs CUDA tensors");
}

}  // namespace
}  // namespace mixprec::cuda
