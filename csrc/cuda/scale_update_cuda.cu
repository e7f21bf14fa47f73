// CUDA kernel of mixprec::update_scale_: one thread applies the shared rule (scale_rule.h) to the
// device-resident state, so the scale never visits the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mixprec/checks.h"
#include "mixprec/scale_rule.h"

namespace mixprec::cuda {

__global__ void update_scale_kernel(float* scale, int* growth_tracker, int* hysteresis_tracker,
                                    int64_t* counters, const float* found_inf,
                                    double growth_factor, double backoff_factor,
                                    int64_t growth_interval, int64_t hysteresis,
                                    double min_scale, double max_scale) {
  update_scale_rule(scale, growth_tracker, hysteresis_tracker, counters, *found_inf,
                    growth_factor, backoff_factor, growth_interval, hysteresis, min_scale,
                    max_scale);
}

void update_scale_cuda(const at::Tensor& scale, const at::Tensor& growth_tracker,
                       const at::Tensor& hysteresis_tracker, const at::Tensor& counters,
                       const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                       int64_t growth_interval, int64_t hysteresis, double min_scale,
                       double max_scale) {
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, counters, found_inf,
                          growth_factor, backoff_factor, growth_interval, hysteresis, min_scale,
                          max_scale);
  TORCH_CHECK(scale.is_cuda(), "mixprec.update_scale_: the CUDA kernel needs CUDA tensors");
  c10::cuda::CUDAGuard guard(scale.device());
  update_scale_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      scale.data_ptr<float>(), growth_tracker.data_ptr<int>(), hysteresis_tracker.data_ptr<int>(),
      counters.data_ptr<int64_t>(), found_inf.data_ptr<float>(), growth_factor, backoff_factor,
      growth_interval, hysteresis, min_scale, max_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixprec::cuda

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("update_scale_", &mixprec::cuda::update_scale_cuda);
}
