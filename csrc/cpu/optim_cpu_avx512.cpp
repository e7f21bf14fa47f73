// The AVX-512 build of the CPU Adam/AdamW and SGD loops (optim_vector_loops.h), chosen at run time
// (cpu_isa.h): the lane operations of optim_cpu_avx2.cpp for sixteen elements at a time, with
// mask registers where AVX2 blends by vector masks. The same bits as the AVX2 build and the
// per-element reference (tests/test_cpu_kernels.py). torch's own fused CPU step runs its AVX-512
// build on such processors; ours followed at half the width, which cost the modes whose arithmetic
// is heavy for their bytes (bf16 without master weights) 10-20 % of torch's bandwidth.
#if defined(__x86_64__) && defined(__GNUC__)
#include "avx512_target.h"  // first: the rest of this file compiles for AVX-512
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "optim_span.h"

namespace mixprec::cpu {
namespace {

using fVec = at::vec::Vectorized<float>;
static_assert(fVec::size() == 16, "this file is the AVX-512 build: 16 floats a vector");
constexpr int64_t kLanes = 16;
using IntVec = __m512i;   // 16 int32 lanes
constexpr int kRandomAhead = 2;  // vectors whose random words are made first (stochastic rounding)
using HalfVec = __m256i;  // 16 16-bit lanes

// -- fp16/bf16 bit patterns, 16 lanes -------------------------------------------------------------

__m512i bits(fVec x) { return _mm512_castps_si512(x); }
__m512i lanes(int32_t v) { return _mm512_set1_epi32(v); }

// 16 int32 lanes holding 16-bit patterns -> 16 uint16 (their low halves).
__m256i narrow(__m512i x) { return _mm512_cvtepi32_epi16(x); }

__mmask16 nan_mask(fVec x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }

template <typename T>
fVec widen(__m256i h) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(h);
  }
}

template <typename T>
void store_half(T* at, HalfVec h) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), h);
}

template <typename T>
fVec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    return widen<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// bf16 round to nearest even as c10 does it (bias 0x7FFF + lsb, NaN -> 0x7FC0), in int32 lanes.
__m512i bf16_nearest32(fVec x) {
  const __m512i b = bits(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), lanes(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, lanes(0x7FFF))), 16);
  return _mm512_mask_blend_epi32(nan_mask(x), r, lanes(0x7FC0));
}

// The bf16 values of bf16_nearest32's patterns, as fp32.
fVec bf16_value(__m512i rounded) { return fVec(_mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16))); }

// fp16 round to nearest even (IEEE's, as c10's portable conversion); a NaN becomes c10's
// sign | 0x7E00.
__m256i fp16_nearest(fVec x) {
  __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = nan_mask(x);
  if (nan != 0) {
    const __m512i canonical =
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(bits(x), 16), lanes(0x8000)), lanes(0x7E00));
    h = _mm256_mask_blend_epi16(nan, h, narrow(canonical));
  }
  return h;
}

template <typename T>
__m256i round_nearest(fVec x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return narrow(bf16_nearest32(x));
  } else {
    return fp16_nearest(x);
  }
}

// optim_math.h's round_stochastic, 16 lanes, as optim_cpu_avx2.cpp's.
template <typename T>
__m256i round_stochastic(fVec x, __m512i random) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i b = bits(x);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_srli_epi32(random, 16)), 16);
    const __m512i magnitude = _mm512_and_si512(b, lanes(0x7FFFFFFF));
    if (_mm512_cmpgt_epi32_mask(magnitude, lanes(0x7F7EFFFF)) == 0) return narrow(r);
    // carried from the largest finite value into inf: step back
    const __mmask16 carried = _mm512_cmpeq_epi32_mask(_mm512_and_si512(r, lanes(0x7FFF)), lanes(0x7F80));
    const __m512i stepped = _mm512_mask_sub_epi32(r, carried, r, lanes(1));
    const __mmask16 finite = _mm512_cmpgt_epi32_mask(lanes(0x7F800000), magnitude);
    return narrow(_mm512_mask_blend_epi32(finite, bf16_nearest32(x), stepped));
  } else {
    const fVec ax = x.abs();
    __m256i down = _mm512_cvtps_ph(ax, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Nearest went up: step back toward zero.
    const __mmask16 went_up = _mm512_cmp_ps_mask(widen<T>(down), ax, _CMP_GT_OQ);
    down = _mm256_mask_sub_epi16(down, went_up, down, _mm256_set1_epi16(1));
    const __m256i up = _mm256_add_epi16(down, _mm256_set1_epi16(1));
    const fVec lo = widen<T>(down);
    // lo == ax gives p = 0 and u < p never holds: the reference's `if (lo != ax)` skips the same.
    const fVec p = (ax - lo) / (widen<T>(up) - lo);
    const fVec u = fVec(_mm512_cvtepi32_ps(_mm512_srli_epi32(random, 8))) * fVec(1.0f / 16777216.0f);
    __m256i r = _mm256_mask_blend_epi16(_mm512_cmp_ps_mask(u, p, _CMP_LT_OQ), down, up);
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    r = _mm256_mask_blend_epi16(negative, r, _mm256_or_si256(r, _mm256_set1_epi16(static_cast<int16_t>(0x8000))));
    const __mmask16 finite = _mm512_cmp_ps_mask(ax, fVec(INFINITY), _CMP_LT_OQ);
    return _mm256_mask_blend_epi16(finite, fp16_nearest(x), r);
  }
}

// -- Random words, 16 lanes -----------------------------------------------------------------------

// RandomStream::word for elements i .. i + 15 (i a multiple of 16, so they share the index's high
// word): the keyed multiply-add and the finalizer, lane by lane. (i + k) * mul + add is formed as
// (i * mul + add) + k * mul (the same bits modulo 2^32): the lane products do not depend on i, so
// the compiler keeps them out of the loop, and each vector costs two vector multiplies, not three.
__m512i random_words(const RandomStream& stream, int64_t i) {
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
  const __m512i lane_products = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), lanes(static_cast<int32_t>(stream.mul)));
  const uint32_t first = static_cast<uint32_t>(i) * stream.mul + stream.add;
  __m512i x = _mm512_add_epi32(lanes(static_cast<int32_t>(first)), lane_products);
  x = _mm512_xor_si512(x, lanes(static_cast<int32_t>(hi * stream.high)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, lanes(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, lanes(static_cast<int32_t>(0x846CA68Bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

#include "optim_vector_loops.h"

}  // namespace

void adam_slice_avx512(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end) {
  dispatch<AdamLoop>(rule, a.w, a, begin, end);
}

void sgd_slice_avx512(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a,
                      int64_t begin, int64_t end) {
  dispatch<SgdLoop>(rule, a.w, s, a, begin, end);
}

}  // namespace mixprec::cpu
#endif
