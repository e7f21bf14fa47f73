// The loss-scale state machine (torch._amp_update_scale_ plus hysteresis and bounds), shared
// verbatim by the CPU kernel and the CUDA kernel so the two cannot drift apart. Arithmetic
// matches torch._amp_update_scale_: float * double, rounded to float.
#pragma once
#include <cstdint>

#include "mixprec/host_device.h"

namespace mixprec {

MIXPREC_HOST_DEVICE inline void update_scale_rule(float* scale, int* growth_tracker,
                                                  int* hysteresis_tracker, int64_t* counters,
                                                  float found_inf, double growth_factor,
                                                  double backoff_factor, int64_t growth_interval,
                                                  int64_t hysteresis, double min_scale,
                                                  double max_scale) {
  if (found_inf != 0.0f) {  // NaN counts as found, as in torch (`if (*found_inf)`).
    counters[0] += 1;
    if (static_cast<double>(*scale) <= min_scale) counters[1] += 1;
    *growth_tracker = 0;
    const int left = *hysteresis_tracker > 0 ? *hysteresis_tracker - 1 : 0;
    *hysteresis_tracker = left;
    if (left == 0) {
      float backed_off = static_cast<float>((*scale) * backoff_factor);
      if (static_cast<double>(backed_off) < min_scale) backed_off = static_cast<float>(min_scale);
      *scale = backed_off;
    }
  } else {
    *hysteresis_tracker = static_cast<int>(hysteresis);
    // A successful step: growth_tracker is incremented before comparing to growth_interval.
    const int successful = (*growth_tracker) + 1;
    if (successful == growth_interval) {
      float grown = static_cast<float>((*scale) * growth_factor);
      // Do not grow past fp32's range to inf (torch's rule), nor past max_scale (ours).
      if (grown - grown == 0.0f) {  // isfinite, usable on host and device
        if (static_cast<double>(grown) > max_scale) grown = static_cast<float>(max_scale);
        *scale = grown;
      }
      *growth_tracker = 0;
    } else {
      *growth_tracker = successful;
    }
  }
}

}  // namespace mixprec
