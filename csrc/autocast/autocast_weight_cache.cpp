// The persistent weight-cast cache (see weight_cache.h).
#include "weight_cache.h"

#include <ATen/autocast_mode.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace mixprec::autocast {
namespace {

struct WeightEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl> weight;
  int64_t version;
  at::Tensor cast;
};
struct PairHash {
  size_t operator()(const std::pair<const c10::TensorImpl*, int>& k) const noexcept {
    return std::hash<const void*>{}(k.first) ^ (static_cast<size_t>(k.second) << 1);
  }
};
std::mutex g_weight_mutex;
std::unordered_map<std::pair<const c10::TensorImpl*, int>, WeightEntry, PairHash> g_weights;
size_t g_sweep_at = 64;

void sweep_expired_locked() {
  for (auto it = g_weights.begin(); it != g_weights.end();) {
    it = it->second.weight.expired() ? g_weights.erase(it) : std::next(it);
  }
  g_sweep_at = std::max<size_t>(64, 2 * g_weights.size());
}

}  // namespace

bool weight_cacheable(const at::Tensor& t, at::ScalarType to, c10::DeviceType dev) {
  // torch's rule for its per-region cache (fp32 leaf parameters cast to the region's dtype),
  // plus grad mode off (see weight_cache.h).
  return !c10::GradMode::is_enabled() && at::autocast::is_eligible(t, dev) &&
      t.scalar_type() == at::kFloat && to == at::autocast::get_autocast_dtype(dev) &&
      t.requires_grad() && t.is_leaf() && !t.is_view() &&
      at::autocast::is_autocast_cache_enabled();
}

at::Tensor weight_cached_cast(const at::Tensor& t, at::ScalarType to) {
  const auto key = std::make_pair(static_cast<const c10::TensorImpl*>(t.unsafeGetTensorImpl()),
                                  static_cast<int>(to));
  const int64_t version = t._version();
  std::lock_guard<std::mutex> lock(g_weight_mutex);
  auto it = g_weights.find(key);
  if (it != g_weights.end() && !it->second.weight.expired() && it->second.version == version) {
    return it->second.cast;
  }
  at::Tensor cast = t.to(to);
  g_weights.insert_or_assign(key, WeightEntry{
      c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()), version, cast});
  if (g_weights.size() >= g_sweep_at) sweep_expired_locked();
  return cast;
}

void weight_cache_clear() {
  std::lock_guard<std::mutex> lock(g_weight_mutex);
  g_weights.clear();
  g_sweep_at = 64;
}

WeightCacheInfo weight_cache_info() {
  std::lock_guard<std::mutex> lock(g_weight_mutex);
  sweep_expired_locked();
  int64_t bytes = 0;
  for (const auto& kv : g_weights) bytes += static_cast<int64_t>(kv.second.cast.nbytes());
  return {g_weights.size(), bytes};
}

}  // namespace mixprec::autocast
