// Rounding an fp32 result into an fp16/bf16 weight, shared by the CPU and CUDA kernels: the
// Rounding modes, the counter-based random words that drive stochastic rounding (RandomStream:
// the word of element i of a tensor is the same on every device, so CPU and CUDA round the same
// values to the same bits), round_stochastic, and WeightIO, which reads and
// writes a weight under every storage scheme (fp32; fp16/bf16 + fp32 master; fp16/bf16 alone
// rounded to nearest, stochastically, or with a Kahan compensation).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mixprec/host_device.h"

namespace mixprec {

// How an fp32 result becomes an fp16/bf16 weight. The op schemas take the mode by name
// (`str rounding="nearest"`): rounding_names.h is the one table of names, parsed once per call.
enum class Rounding : int {
  kNearest,     // plain round-to-nearest: updates below half an ulp are lost
  kStochastic,  // round up with probability (x - down) / (up - down): unbiased
  kKahan,       // nearest, and keep the rounding error in a compensation buffer
};

// Philox4x32-10 (Salmon et al., SC'11), a counter-based generator: here it makes each stream's
// key (below), once per tensor and step.
MIXPREC_HOST_DEVICE inline void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * ctr[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * ctr[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr[0] = hi1 ^ ctr[1] ^ k0;
    ctr[1] = lo1;
    ctr[2] = hi0 ^ ctr[3] ^ k1;
    ctr[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The random words of one tensor at one step: word(i) is a pure function of (seed, step, tensor,
// element i), so draws are reproducible, parallel and CUDA-graph safe (no generator state to
// advance), and CPU and CUDA round the same values to the same bits. Philox keys the stream; each
// element's word is then a keyed bijection of its index (a multiply-add by key words) through a
// 32-bit finalizer (Wellons' lowbias32: two multiplies, three xor-shifts). Stochastic rounding
// needs 16 to 24 well-mixed bits per element, not a cryptographic generator: a Philox call per
// element (or per 4) made the CPU step compute-bound at half its memory speed.
struct RandomStream {
  uint32_t mul, add, high;  // the key: mul odd, so i -> i * mul + add permutes the low 32 bits

  MIXPREC_HOST_DEVICE static RandomStream of(uint64_t seed, uint32_t step, uint32_t tensor) {
    uint32_t key[4] = {0u, 0u, step, tensor};
    philox4x32_10(key, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    return RandomStream{key[0] | 1u, key[1], key[2]};
  }

  MIXPREC_HOST_DEVICE static uint32_t finalize(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
  }

  MIXPREC_HOST_DEVICE uint32_t word(int64_t i) const {
    const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
    return finalize((static_cast<uint32_t>(i) * mul + add) ^ (hi * high));
  }

  // The words of elements [4 * block_index, 4 * block_index + 4).
  MIXPREC_HOST_DEVICE void block(int64_t block_index, uint32_t out[4]) const {
    for (int k = 0; k < 4; ++k) out[k] = word(4 * block_index + k);
  }
};

// The neighbour of a finite fp16/bf16 value one ulp further from zero (both formats are
// sign-magnitude, so that is the next bit pattern).
template <typename T>
MIXPREC_HOST_DEVICE inline T away_from_zero(T v) {
  return T(static_cast<uint16_t>(v.x + 1), T::from_bits());
}

template <typename T>
MIXPREC_HOST_DEVICE inline T toward_zero(T v) {
  return T(static_cast<uint16_t>(v.x - 1), T::from_bits());
}

MIXPREC_HOST_DEVICE inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return host_bit_cast<uint32_t>(x);
#endif
}

// Unbiased stochastic rounding of x to T: E[result] = x for every x within T's range; a finite x
// never rounds to inf. `random` is a uniform 32-bit word.
template <typename T>
MIXPREC_HOST_DEVICE inline T round_stochastic(float x, uint32_t random) {
  const float ax = fabsf(x);
  if (!(ax == ax) || ax == INFINITY) return static_cast<T>(x);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 is the top half of fp32's bit pattern, and between two neighbouring bf16 values (in
    // any binade, subnormals too) the fp32 values are evenly spaced, 2^16 of them to a gap. So
    // adding 16 uniform bits to the low half and truncating carries into the next bf16 value with
    // probability exactly (x - down) / (up - down): a few integer ops instead of a division.
    uint16_t out = static_cast<uint16_t>((float_bits(x) + (random >> 16)) >> 16);
    if ((out & 0x7FFFu) == 0x7F80u) --out;  // carried from the largest finite value into inf
    return T(out, T::from_bits());
  } else {
    T down = static_cast<T>(ax);  // nearest; step back if it went up
    if (static_cast<float>(down) > ax) down = toward_zero(down);
    const float lo = static_cast<float>(down);
    T result = down;
    if (lo != ax) {
      const T up = away_from_zero(down);
      const float p = (ax - lo) / (static_cast<float>(up) - lo);  // up == inf gives p = 0
      const float u = static_cast<float>(random >> 8) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
      if (u < p) result = up;
    }
    return x < 0 ? T(static_cast<uint16_t>(result.x | 0x8000u), T::from_bits()) : result;
  }
}

// Reads the weight the update starts from and writes the new one, for every storage scheme:
// fp32 params; fp16/bf16 params with an fp32 master copy; or fp16/bf16 alone, rounded to
// nearest, stochastically, or with a Kahan compensation (weight = param + compensation).
template <typename T>
struct WeightIO {
  Rounding rounding;

  MIXPREC_HOST_DEVICE float load(const T& param, const float* master, const T* comp) const {
    if (master) return *master;
    if (comp) return static_cast<float>(param) + static_cast<float>(*comp);
    return static_cast<float>(param);
  }

  MIXPREC_HOST_DEVICE void store(float p, T& param, float* master, T* comp, uint32_t random) const {
    if constexpr (!std::is_same_v<T, c10::Half> && !std::is_same_v<T, c10::BFloat16>) {
      param = static_cast<T>(p);  // fp32 params (the kernels' dispatch also instantiates fp64)
    } else {
      if (master) {
        *master = p;
        param = static_cast<T>(p);
      } else if (comp) {
        const T rounded = static_cast<T>(p);
        param = rounded;
        *comp = static_cast<T>(p - static_cast<float>(rounded));
      } else if (rounding == Rounding::kStochastic) {
        param = round_stochastic<T>(p, random);
      } else {
        param = static_cast<T>(p);
      }
    }
  }
};

}  // namespace mixprec
