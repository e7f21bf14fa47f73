// The persistent weight-cast cache (opt-in, weight_cache=True).
//
// torch.autocast re-casts every fp32 weight on every region entry. This cache keeps a weight's
// low-precision copy across regions, keyed on the weight's TensorImpl and the target dtype; an
// entry is valid while the weight is alive and its version counter is unchanged (an optimizer
// step or any in-place write bumps it). Only casts made with grad mode off are cached: such a copy
// holds no autograd reference to the weight, so dropping the model lets the entry expire.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace mixprec::autocast {

// Whether the cast of `t` to `to` in a region of device type `dev` may be served by the cache.
bool weight_cacheable(const at::Tensor& t, at::ScalarType to, c10::DeviceType dev);

// `t` cast to `to`, from the cache when its entry is still valid.
at::Tensor weight_cached_cast(const at::Tensor& t, at::ScalarType to);

void weight_cache_clear();

struct WeightCacheInfo {
  size_t entries;
  int64_t bytes;
};
WeightCacheInfo weight_cache_info();  // live entries only

}  // namespace mixprec::autocast
