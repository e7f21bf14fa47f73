// Runs a loop over the concatenation of many tensors with one at::parallel_for, so hundreds of
// small tensors don't each pay for a parallel region; the body sees (tensor index, begin, end)
// ranges that never cross a tensor boundary.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mixprec::cpu {

template <typename Body>
void parallel_over_tensors(const std::vector<int64_t>& numels, int64_t grain_size, const Body& body) {
  std::vector<int64_t> starts(numels.size() + 1, 0);
  for (size_t t = 0; t < numels.size(); ++t) starts[t + 1] = starts[t] + numels[t];
  if (starts.back() == 0) return;
  at::parallel_for(0, starts.back(), grain_size, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      const int64_t stop = std::min(end, starts[t + 1]);
      if (stop > pos) body(t, pos - starts[t], stop - starts[t]);
      pos = std::max(pos, stop);
    }
  });
}

}  // namespace mixprec::cpu
