// Compressed optimizer state, shared by the CPU and CUDA kernels of mixprec::adam_step_compressed_
// and the block-wise quantize/dequantize ops:
// - the remainder master weight: a bf16 weight plus the 16 low bits bf16 drops, together exactly
//   the fp32 master (split / join);
// - moments stored in bf16 (stochastically rounded) or in 8 bits with one fp32 absmax per block
//   of kQuantBlock elements (block-wise dynamic quantization, as bitsandbytes and torchao do; the
//   256-entry maps come from mixprec/quant.py, sorted ascending).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "mixprec/host_device.h"
#include "mixprec/inverse_divisor.h"
#include "mixprec/rounding.h"

namespace mixprec {

// Elements per quantization block (one absmax each): bitsandbytes' and torchao's 256. A block
// never straddles two tensors, or two shards of one (each shard is its own tensor here).
constexpr int64_t kQuantBlock = 256;

// How the optimizer's moments are stored (the op schema's `moments`, by name).
enum class MomentStorage : int { kFp32, kBf16, kInt8, kFp8 };
// How the weight is stored (the op schema's `weights`, by name): the param alone (fp32, or
// fp16/bf16 rounded to nearest), with an fp32 master, as bf16 + remainder, or fp16/bf16 alone
// rounded stochastically.
enum class WeightStorage : int { kPlain, kMaster, kRemainder, kStochastic };

MIXPREC_HOST_DEVICE inline float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return host_bit_cast<float>(bits);
#endif
}

// Splits an fp32 master into a bf16 weight and a signed 16-bit remainder so that join() gives
// the master back bit for bit. The weight is the master rounded to nearest with ties away from
// zero (adding half a bf16 ulp to the sign-magnitude pattern): round-to-nearest-even cannot be
// used, because an even bf16 value has 65,537 fp32 neighbours that round to it, one more than 16
// bits can tell apart. So the weight differs from master_weights=True's (nearest even) only when
// the master's low 16 bits are exactly 0x8000. NaN becomes the canonical bf16 NaN, remainder 0.
struct SplitMaster {
  uint16_t weight_bits;
  int16_t remainder;
};

MIXPREC_HOST_DEVICE inline SplitMaster split_master(float master) {
  const uint32_t bits = float_bits(master);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>(0x7FC0u), 0};
  const uint16_t hi = static_cast<uint16_t>((bits + 0x8000u) >> 16);
  return {hi, static_cast<int16_t>(static_cast<int32_t>(bits - (static_cast<uint32_t>(hi) << 16)))};
}

MIXPREC_HOST_DEVICE inline float join_master(uint16_t weight_bits, int16_t remainder) {
  return float_from_bits((static_cast<uint32_t>(weight_bits) << 16) +
                         static_cast<uint32_t>(static_cast<int32_t>(remainder)));
}

// Nearest-code search. The code of y is the map entry nearest to y (the fp32 differences
// compared, ties to the lower code). As y grows that code never falls, so it is the number of
// thresholds T[k] <= y, where T[k] (k < 255) is the least fp32 y whose code exceeds k: found once
// per map by a binary search over the floats between entries k and k + 1 (quantize_thresholds),
// with the very comparison the rule makes, so the codes are the rule's bit for bit. T[255] is
// NaN, which no comparison passes: a walk up the thresholds stops there.
// A walk from code 0 would take up to 255 steps, so an index of buckets by y's bit pattern (sign,
// exponent, top kQuantIndexBits mantissa bits) gives, for each bucket, the code of a value <=
// every y in it; from there at most two thresholds lie below y for the maps of mixprec/quant.py
// (whose nonzero entries lie in [3.25e-7, 1]; with 6 mantissa bits a bucket holds at most 2),
// and a loop after two unrolled steps keeps any other sorted map correct.
constexpr int kQuantIndexBits = 6;
constexpr uint32_t kQuantKeyLow = (127u - 22u) << kQuantIndexBits;  // |y| < 2^-22 share a bucket
constexpr uint32_t kQuantKeyHigh = 127u << kQuantIndexBits;         // |y| >= 1 (inf too) share one
constexpr int kQuantBucketsPerSign = static_cast<int>(kQuantKeyHigh - kQuantKeyLow) + 1;
constexpr int kQuantIndexSize = 2 * kQuantBucketsPerSign;  // bytes of one map's index

// y's bucket, numbered in the order of y (negative buckets from -inf up to -0, then positive ones
// from +0 up), so that bucket starts never decrease and the index is built by one walk.
MIXPREC_HOST_DEVICE inline int quant_bucket(float y) {
  const uint32_t bits = float_bits(y);
  uint32_t key = (bits & 0x7FFFFFFFu) >> (23 - kQuantIndexBits);
  key = key < kQuantKeyLow ? kQuantKeyLow : (key > kQuantKeyHigh ? kQuantKeyHigh : key);
  const int k = static_cast<int>(key - kQuantKeyLow);
  return (bits >> 31) ? kQuantBucketsPerSign - 1 - k : kQuantBucketsPerSign + k;
}

// A value <= every y of bucket j: its smallest member for a positive bucket; for a negative one
// the magnitude that starts the next bucket up (negated), or -inf for the one that holds -inf.
MIXPREC_HOST_DEVICE inline float quant_bucket_floor(int j) {
  constexpr int kShift = 23 - kQuantIndexBits;
  if (j >= kQuantBucketsPerSign) {
    const int k = j - kQuantBucketsPerSign;
    return k == 0 ? 0.0f : float_from_bits((kQuantKeyLow + k) << kShift);
  }
  const int k = kQuantBucketsPerSign - 1 - j;
  return k == kQuantBucketsPerSign - 1 ? float_from_bits(0xFF800000u)
                                       : -float_from_bits((kQuantKeyLow + k + 1) << kShift);
}

// fp32 bit patterns as unsigned keys in the order of the values (-0 just below +0), and back.
MIXPREC_HOST_DEVICE inline uint32_t ordered_key(float y) {
  const uint32_t bits = float_bits(y);
  return (bits >> 31) ? ~bits : bits | 0x80000000u;
}
MIXPREC_HOST_DEVICE inline float from_ordered_key(uint32_t key) {
  return float_from_bits((key >> 31) ? key & 0x7FFFFFFFu : ~key);
}

// T[k] for k in [first, first + count) (clipped to 256); `map` is sorted ascending. For y in
// [map[k], map[k + 1]) the rule picks k or k + 1, k + 1 once map[k + 1] is strictly nearer, and
// at y = map[k + 1] it picks k + 1: so T[k] is in (map[k], map[k + 1]]. 32 steps at most.
MIXPREC_HOST_DEVICE inline void quantize_thresholds(const float* map, float* thresholds, int first, int count) {
  const int end = first + count < 256 ? first + count : 256;
  for (int k = first; k < end; ++k) {
    if (k == 255) {
      thresholds[k] = float_from_bits(0x7FC00000u);  // NaN: the walk's end
      continue;
    }
    uint32_t lo = ordered_key(map[k]), hi = ordered_key(map[k + 1]);  // nearer to map[k] at lo; done at hi
    while (hi > lo && hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      const float y = from_ordered_key(mid);
      if ((map[k + 1] - y) < (y - map[k])) {
        hi = mid;
      } else {
        lo = mid;
      }
    }
    thresholds[k] = from_ordered_key(hi);
  }
}

// Entries [first, first + count) of a map's index (clipped to kQuantIndexSize), from its
// thresholds: the code of each bucket's floor. One binary search for the first bucket, then
// walks, as floors increase with j. The CPU builds the whole index once per call; on CUDA each
// thread of a block builds a run of it in shared memory.
MIXPREC_HOST_DEVICE inline void quantize_index(const float* thresholds, uint8_t* index, int first, int count) {
  const int end = first + count < kQuantIndexSize ? first + count : kQuantIndexSize;
  if (first >= end) return;
  const float y = quant_bucket_floor(first);
  int code = 0;  // the number of thresholds <= y: T is increasing, T[255] NaN
  for (int step = 128; step > 0; step >>= 1) {
    if (thresholds[code + step - 1] <= y) code += step;
  }
  for (int j = first; j < end; ++j) {
    const float floor = quant_bucket_floor(j);
    while (thresholds[code] <= floor) ++code;
    index[j] = static_cast<uint8_t>(code);
  }
}

// A map's search tables (3.8 KB): built once per call on the CPU, per block in shared memory on
// CUDA (each thread a part: quantize_thresholds, then quantize_index).
struct QuantCodebook {
  float thresholds[256];
  uint8_t index[kQuantIndexSize];
  bool within_two_steps;  // every bucket: quant_bucket_within_two_steps (true for quant.py's maps)
};

MIXPREC_HOST_DEVICE inline bool quant_bucket_within_two_steps(const QuantCodebook& book, int j);

inline void build_codebook(const float* map, QuantCodebook& book) {
  quantize_thresholds(map, book.thresholds, 0, 256);
  quantize_index(book.thresholds, book.index, 0, kQuantIndexSize);
  book.within_two_steps = true;
  for (int j = 0; j < kQuantIndexSize; ++j) book.within_two_steps &= quant_bucket_within_two_steps(book, j);
}

// The code of the map entry nearest to x / absmax (ties to the lower code); absmax 0 (an all-zero
// block) gives the code of 0, NaN code 0.
MIXPREC_HOST_DEVICE inline uint8_t quantize_value(float x, float absmax, const QuantCodebook& book) {
  const float y = absmax > 0.0f ? x / absmax : 0.0f;
  if (!(y == y)) return 0;  // NaN is below no entry
  int code = book.index[quant_bucket(y)];
  code += book.thresholds[code] <= y;
  code += book.thresholds[code] <= y;
  while (book.thresholds[code] <= y) ++code;
  return static_cast<uint8_t>(code);
}

// Whether two steps from bucket j's index reach the code of every y in it, so the walk of
// quantize_value needs no loop there: the threshold two above the index lies beyond the bucket
// (every y of bucket j is <= the floor of bucket j + 1), or the walk ends at T[255] (NaN) first.
MIXPREC_HOST_DEVICE inline bool quant_bucket_within_two_steps(const QuantCodebook& book, int j) {
  const int code = book.index[j];
  if (code + 2 >= 255) return true;
  return j + 1 < kQuantIndexSize && book.thresholds[code + 2] > quant_bucket_floor(j + 1);
}

// quantize_value for a book whose every bucket is within two steps and a block with absmax > 0:
// the same code, with no loop and no branch (NaN still gives code 0). `index` is the book's
// index or a copy of it in wider integers (the CPU's vector loops gather 32-bit entries).
template <typename Index>
MIXPREC_HOST_DEVICE inline uint8_t quantize_ratio_within_two_steps(float y, const float* thresholds,
                                                                   const Index* index) {
  int code = static_cast<int>(index[quant_bucket(y)]);
  code += thresholds[code] <= y;
  code += thresholds[code] <= y;
  return static_cast<uint8_t>(y == y ? code : 0);
}

template <typename Index>
MIXPREC_HOST_DEVICE inline uint8_t quantize_within_two_steps(float x, float absmax, const float* thresholds,
                                                             const Index* index) {
  return quantize_ratio_within_two_steps(x / absmax, thresholds, index);
}

// y = x / absmax for the values of one block by the block's reciprocal (InverseDivisor): the
// division's bits for absmax in [2^-50, 2^100] and every |x| <= absmax (3.8e9 quotients of 560
// divisors checked in C, 2026-12-07); outside that range the residual can underflow.
MIXPREC_HOST_DEVICE inline bool quant_ratio_by_inverse(float absmax) {
  return absmax >= 0x1p-50f && absmax <= 0x1p100f;
}

MIXPREC_HOST_DEVICE inline uint8_t quantize_within_two_steps(float x, float absmax, const QuantCodebook& book) {
  return quantize_within_two_steps(x, absmax, book.thresholds, book.index);
}

// The codes of a block's `count` values, `absmax` their largest magnitude: quantize_value's
// codes, through the loop-free walk where the book and the block allow it.
inline void quantize_run(const float* x, int64_t count, float absmax, const QuantCodebook& book, uint8_t* codes) {
  if (book.within_two_steps && absmax > 0.0f) {
    for (int64_t i = 0; i < count; ++i) codes[i] = quantize_within_two_steps(x[i], absmax, book);
  } else {
    for (int64_t i = 0; i < count; ++i) codes[i] = quantize_value(x[i], absmax, book);
  }
}

MIXPREC_HOST_DEVICE inline float dequantize_value(uint8_t code, float absmax, const float* map) {
  return map[code] * absmax;
}

// Moments in fp8 (e4m3fn, as torchao's AdamWFp8 keeps them) with one fp32 absmax per block of
// kQuantBlock: a value x is stored as fp8(x * (256 / absmax)) and read as fp8 * (absmax / 256).
// The scale is the absmax itself, not its power of two: a block whose moments all decay (beta1,
// beta2 with zero grads) keeps its codes while its absmax decays, so every value decays; with a
// power-of-two scale the codes of a decaying value round back to themselves and it stalls. The
// block's largest value maps to 256, so nothing reaches fp8's largest (448) and nothing saturates
// (the 0.8 binade above 256 is given up). 256 / absmax is one correctly rounded division a
// block, absmax / 256 exact (but in fp32's subnormals), so both devices get the same bits. A
// block with absmax <= 2^-119 (zero included), whose 256 / absmax would reach 2^127 or inf, is
// encoded times 2^127 and decoded times 2^-127, the exact inverse: decoding by absmax / 256 there
// shrank such a block at every step (to 0.014 of its values at absmax 1e-38).
MIXPREC_HOST_DEVICE inline float fp8_moment_ratio(float absmax) {  // x * this is encoded
  const float ratio = 256.0f / absmax;
  return ratio < 0x1p127f ? ratio : 0x1p127f;
}
MIXPREC_HOST_DEVICE inline float fp8_moment_scale(float absmax) {  // a code's value times this
  const float scale = absmax * 0x1p-8f;
  return scale > 0x1p-127f ? scale : 0x1p-127f;
}
// fp8 e4m3fn bits of y = x * ratio to nearest even; NaN to 0x7F, beyond 448 (inf) to +-448: what
// Hopper's cvt.rn.satfinite.e4m3x2.f32 gives, which the CUDA kernel uses, and torch's conversion
// (c10's) within +-448. Written without branches so that the CPU loops vectorize (c10's
// conversion branches and did not: the step took twice the 8-bit one's time).
MIXPREC_HOST_DEVICE inline uint8_t fp8_moment_code(float y) {
  const uint32_t bits = float_bits(y);
  uint32_t a = bits & 0x7FFFFFFFu;
  a = a > 0x43E00000u ? 0x43E00000u : a;  // 448 (NaN is set apart below)
  // |y| >= 2^-6, a normal fp8: the mantissa rounded to 3 bits, nearest even; exponent bias 127 -> 7.
  const uint32_t normal = (a + 0x7FFFFu + ((a >> 20) & 1u) - (120u << 23)) >> 20;
  // |y| < 2^-6, a subnormal fp8 (a multiple of 2^-9): 2^14 + |y| rounds |y| to that, nearest even.
  const uint32_t subnormal = float_bits(float_from_bits(a) + 16384.0f) - 0x46800000u;
  const uint32_t code = (a < (121u << 23) ? subnormal : normal) | ((bits >> 24) & 0x80u);
  return static_cast<uint8_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7Fu : code);
}
// The 256 fp8 e4m3fn values as floats (0x7F and 0xFF NaN): the CPU decodes a code as
// fp8_values()[code] * fp8_moment_scale(absmax).
inline const float* fp8_values() {
  struct Table {
    float value[256];
    Table() {
      for (int c = 0; c < 256; ++c) value[c] = c10::detail::fp8e4m3fn_to_fp32_value(static_cast<uint8_t>(c));
    }
  };
  static const Table table;
  return table.value;
}

// Moments in bf16: stochastic rounding keeps them unbiased (rounded to nearest, a second moment
// decaying by beta2 = 0.999 per step moves less than half a bf16 ulp and never decays). One
// random word per element drives both moments: its high 16 bits round m, its low 16 bits v
// (round_stochastic<bf16> reads the high 16 bits of the word it gets).
MIXPREC_HOST_DEVICE inline c10::BFloat16 round_moment_m(float m, uint32_t word) {
  return round_stochastic<c10::BFloat16>(m, word);
}
MIXPREC_HOST_DEVICE inline c10::BFloat16 round_moment_v(float v, uint32_t word) {
  return round_stochastic<c10::BFloat16>(v, word << 16);
}

// The stream of the moments' random words: the weight's stream (seed, step, tensor) with its
// seed changed, so the two never share words.
MIXPREC_HOST_DEVICE inline RandomStream moment_stream(uint64_t seed, uint32_t step, uint32_t tensor) {
  return RandomStream::of(seed ^ 0x6D6F6D656E747321ull, step, tensor);
}

}  // namespace mixprec
