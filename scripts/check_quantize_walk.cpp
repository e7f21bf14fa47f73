// Exhaustive check of the loop-free 8-bit code walk (scripts/check_quantize_walk.py builds and
// runs it): for both maps of mixprec/quant.py (maps.h, written by the script) and every float y
// with |y| <= absmax, and NaN, quantize_within_two_steps and the AVX-512 lanes
// (compressed_block_loops.h) give quantize_value's code. About a minute on one core.
#include "avx512_target.h"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "compressed_slice.h"
#include "maps.h"

namespace mixprec::cpu {
namespace {
#include "compressed_block_loops.h"
}  // namespace

int check() {
  long long bad = 0;
  for (int which = 0; which < 2; ++which) {
    static CpuCodebook c;
    c.build(which ? kUnsignedMap : kSignedMap);
    const float absmax = which ? 0.37f : 1.0f;
    const int64_t n = 1 << 20;
    std::vector<float> x(n);
    std::vector<uint8_t> lanes(n);
    long long scalar_diff = 0, lane_diff = 0, total = 0;
    for (uint64_t bits = 0; bits < (1ull << 32);) {
      int64_t m = 0;
      for (; m < n && bits < (1ull << 32); ++bits) {
        const float y = float_from_bits(static_cast<uint32_t>(bits));
        if (std::fabs(y) <= absmax || y != y) x[m++] = y;
      }
      const int64_t k = __builtin_cpu_supports("avx512f")
                            ? quantize_lanes(x.data(), m, absmax, c.book.thresholds, c.index32, lanes.data()) : 0;
      for (int64_t i = 0; i < m; ++i) {
        const uint8_t want = quantize_value(x[i], absmax, c.book);
        scalar_diff += quantize_within_two_steps(x[i], absmax, c.book) != want;
        if (i < k) lane_diff += lanes[i] != want;
      }
      total += m;
    }
    std::printf("map %d: within_two_steps %d; of %lld codes, %lld scalar and %lld lane codes differ\n", which,
                static_cast<int>(c.book.within_two_steps), total, scalar_diff, lane_diff);
    bad += scalar_diff + lane_diff + !c.book.within_two_steps;
  }
  return bad == 0 ? 0 : 1;
}

}  // namespace mixprec::cpu

int main() { return mixprec::cpu::check(); }
