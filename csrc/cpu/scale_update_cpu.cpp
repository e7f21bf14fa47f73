// CPU kernel of mixprec::update_scale_: the shared rule in scale_rule.h applied to CPU scalars.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "mixprec/checks.h"
#include "mixprec/scale_rule.h"

namespace mixprec::cpu {

void update_scale_cpu(const at::Tensor& scale, const at::Tensor& growth_tracker,
                      const at::Tensor& hysteresis_tracker, const at::Tensor& counters,
                      const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                      int64_t growth_interval, int64_t hysteresis, double min_scale,
                      double max_scale) {
  check_update_scale_args(scale, growth_tracker, hysteresis_tracker, counters, found_inf,
                          growth_factor, backoff_factor, growth_interval, hysteresis, min_scale,
                          max_scale);
  TORCH_CHECK(scale.is_cpu(), "mixprec.update_scale_: the CPU kernel needs CPU tensors");
  update_scale_rule(scale.data_ptr<float>(), growth_tracker.data_ptr<int>(),
                    hysteresis_tracker.data_ptr<int>(), counters.data_ptr<int64_t>(),
                    *found_inf.data_ptr<float>(), growth_factor, backoff_factor, growth_interval,
                    hysteresis, min_scale, max_scale);
}

}  // namespace mixprec::cpu

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("update_scale_", &mixprec::cpu::update_scale_cpu);
}
