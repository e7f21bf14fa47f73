// The one CPU span walker: many tensors (or flat spans) seen as one concatenated range, so a
// single at::parallel_for covers them all and hundreds of small tensors don't each pay for a
// parallel region. Bodies see (span index, begin, end) ranges local to one span, never crossing
// a span boundary.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mixprec::cpu {

class Concatenation {
 public:
  explicit Concatenation(const std::vector<int64_t>& numels) : starts_(numels.size() + 1, 0) {
    for (size_t s = 0; s < numels.size(); ++s) starts_[s + 1] = starts_[s] + numels[s];
  }

  int64_t total() const { return starts_.back(); }

  // Calls body(span, local_begin, local_end) for the pieces of [begin, end), in order.
  template <typename Body>
  void walk(int64_t begin, int64_t end, const Body& body) const {
    if (begin >= end) return;
    size_t s = std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin() - 1;
    for (int64_t pos = begin; pos < end; ++s) {
      const int64_t stop = std::min(end, starts_[s + 1]);
      if (stop > pos) body(s, pos - starts_[s], stop - starts_[s]);  // skips empty spans
      pos = std::max(pos, stop);
    }
  }

  // walk() over the whole range, split across threads by at::parallel_for.
  template <typename Body>
  void parallel_walk(int64_t grain_size, const Body& body) const {
    if (total() == 0) return;
    at::parallel_for(0, total(), grain_size,
                     [&](int64_t begin, int64_t end) { walk(begin, end, body); });
  }

 private:
  std::vector<int64_t> starts_;  // starts_[s]: offset of span s in the concatenation
};

}  // namespace mixprec::cpu
