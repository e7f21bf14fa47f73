// The AVX2 build of the CPU Adam/AdamW and SGD loops (optim_vector_loops.h), chosen at run time
// (cpu_isa.h): the lane operations for eight elements at a time. Every build performs the same
// operations in the same order as the per-element reference in optim_cpu.cpp (optim_math.h's CPU
// order): fmadd where it calls fmaf (both are one exact fused multiply-add), separate roundings
// elsewhere, and sqrt and division correctly rounded in both, so every mode gives the same bits.
// Conversions to fp16/bf16 are done on the bit patterns to match c10's exactly, NaNs included
// (c10 writes 0x7FC0 for a bf16 NaN; ATen's vector conversion would write 0xFFFF). Stochastic
// rounding draws the same random words (RandomStream::word), eight at a time.
#if defined(__x86_64__) && defined(__GNUC__)
#include "avx2_target.h"  // first: the rest of this file compiles for AVX2
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "optim_span.h"

namespace mixprec::cpu {
namespace {

using fVec = at::vec::Vectorized<float>;
static_assert(fVec::size() == 8, "this file is the AVX2 build: 8 floats a vector");
constexpr int64_t kLanes = 8;
using IntVec = __m256i;   // 8 int32 lanes
constexpr int kRandomAhead = 1;  // vectors whose random words are made first (stochastic rounding)
using HalfVec = __m128i;  // 8 16-bit lanes

// -- fp16/bf16 bit patterns, 8 lanes --------------------------------------------------------------

__m256i bits(fVec x) { return _mm256_castps_si256(x); }

// 8 int32 lanes holding 16-bit patterns -> 8 uint16.
__m128i narrow(__m256i x) {
  return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

// An 8-lane float compare mask -> 8 16-bit masks.
__m128i narrow_mask(fVec m) {
  const __m256i x = bits(m);
  return _mm_packs_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

template <typename T>
fVec widen(__m128i h) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

template <typename T>
void store_half(T* at, HalfVec h) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(at), h);
}

template <typename T>
fVec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    return widen<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

fVec is_nan(fVec x) { return _mm256_cmp_ps(x, x, _CMP_UNORD_Q); }

// bf16 round to nearest even as c10 does it (bias 0x7FFF + lsb, NaN -> 0x7FC0), in int32 lanes.
__m256i bf16_nearest32(fVec x) {
  const __m256i b = bits(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), bits(is_nan(x)));
}

// The bf16 values of bf16_nearest32's patterns, as fp32.
fVec bf16_value(__m256i rounded) { return fVec(_mm256_castsi256_ps(_mm256_slli_epi32(rounded, 16))); }

// fp16 round to nearest even: F16C is IEEE's rounding, as c10's portable conversion is; c10
// writes a NaN as its sign | 0x7E00, where F16C would keep payload bits.
__m128i fp16_nearest(fVec x) {
  __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const fVec nan = is_nan(x);
  if (_mm256_movemask_ps(nan) != 0) {
    const __m256i canonical = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32(bits(x), 16), _mm256_set1_epi32(0x8000)),
        _mm256_set1_epi32(0x7E00));
    h = _mm_blendv_epi8(h, narrow(canonical), narrow_mask(nan));
  }
  return h;
}

template <typename T>
__m128i round_nearest(fVec x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return narrow(bf16_nearest32(x));
  } else {
    return fp16_nearest(x);
  }
}

// optim_math.h's round_stochastic, 8 lanes; `random` holds each element's random word.
template <typename T>
__m128i round_stochastic(fVec x, __m256i random) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // Add the top 16 random bits to the low half and truncate. Lanes at the top of the range
    // (where a carry could reach inf) or beyond it (inf, NaN) are rare: they take the exact
    // reference below only when present, so the common case costs five instructions.
    const __m256i b = bits(x);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_srli_epi32(random, 16)), 16);
    const __m256i magnitude = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i top = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F7EFFFF));
    if (_mm256_testz_si256(top, top)) return narrow(r);
    // carried from the largest finite value into inf: step back (carried lanes are -1)
    const __m256i carried = _mm256_cmpeq_epi32(_mm256_and_si256(r, _mm256_set1_epi32(0x7FFF)),
                                               _mm256_set1_epi32(0x7F80));
    const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7F800000), magnitude);
    return narrow(_mm256_blendv_epi8(bf16_nearest32(x), _mm256_add_epi32(r, carried), finite));
  } else {
    const fVec ax = x.abs();
    __m128i down = _mm256_cvtps_ph(ax, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Nearest went up: step back toward zero (the mask lanes are -1).
    down = _mm_add_epi16(down, narrow_mask(_mm256_cmp_ps(widen<T>(down), ax, _CMP_GT_OQ)));
    const __m128i up = _mm_add_epi16(down, _mm_set1_epi16(1));
    const fVec lo = widen<T>(down);
    // lo == ax gives p = 0 and u < p never holds: the reference's `if (lo != ax)` skips the same.
    const fVec p = (ax - lo) / (widen<T>(up) - lo);
    const fVec u = fVec(_mm256_cvtepi32_ps(_mm256_srli_epi32(random, 8))) * fVec(1.0f / 16777216.0f);
    __m128i r = _mm_blendv_epi8(down, up, narrow_mask(_mm256_cmp_ps(u, p, _CMP_LT_OQ)));
    const __m128i negative = narrow_mask(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    r = _mm_or_si128(r, _mm_and_si128(negative, _mm_set1_epi16(static_cast<int16_t>(0x8000))));
    const __m128i finite = narrow_mask(_mm256_cmp_ps(ax, fVec(INFINITY), _CMP_LT_OQ));
    return _mm_blendv_epi8(fp16_nearest(x), r, finite);
  }
}

// -- Random words, 8 lanes ------------------------------------------------------------------------

// RandomStream::word for elements i .. i + 7 (i a multiple of 8, so they share the index's high
// word): the keyed multiply-add and the finalizer, lane by lane; (i + k) * mul + add formed as
// (i * mul + add) + k * mul, as in the AVX-512 build.
__m256i random_words(const RandomStream& stream, int64_t i) {
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
  const __m256i lane_products = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                   _mm256_set1_epi32(static_cast<int32_t>(stream.mul)));
  const uint32_t first = static_cast<uint32_t>(i) * stream.mul + stream.add;
  __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first)), lane_products);
  x = _mm256_xor_si256(x, _mm256_set1_epi32(static_cast<int32_t>(hi * stream.high)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0x846CA68Bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

#include "optim_vector_loops.h"

}  // namespace

void adam_slice_avx2(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end) {
  dispatch<AdamLoop>(rule, a.w, a, begin, end);
}

void sgd_slice_avx2(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a,
                    int64_t begin, int64_t end) {
  dispatch<SgdLoop>(rule, a.w, s, a, begin, end);
}

}  // namespace mixprec::cpu
#endif
