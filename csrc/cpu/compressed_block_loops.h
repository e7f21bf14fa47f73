// The compressed Adam step over quantization blocks, written once for every instruction set:
// included, inside an anonymous namespace, by compressed_cpu.cpp (portable) and by
// compressed_cpu_avx2.cpp / compressed_cpu_avx512.cpp after their target pragmas, each of which
// defines compressed_blocks_<build>. A block is stepped in phases (gradients, decode, Adam,
// encode), each a plain loop over the block's elements with the storage modes fixed at compile
// time, so the compiler turns each into vector code (the one loop it replaces switched on the
// modes for every element and never vectorized: 2-11x slower, README). Each element gets the same
// operations in the same order as in that loop (the maths are optim_math.h's and
// compressed_state.h's functions), and IEEE division and square root are correctly rounded at
// every width, so every build gives the same bits.
// (No #pragma once: each including file compiles it for its own instruction set.)

// fp16/bf16 <-> fp32 as c10 converts (bf16 rounded to nearest even, a NaN to 0x7FC0), on the bit
// patterns for bf16 so that the loops vectorize (c10's conversion goes through memcpy).
template <typename T>
inline float widen(T x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return float_from_bits(static_cast<uint32_t>(x.x) << 16);
  return static_cast<float>(x);
}

template <typename T>
inline T narrow_nearest(float x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = float_bits(x);
    const auto rounded = static_cast<uint16_t>((bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16);
    return T(x != x ? static_cast<uint16_t>(0x7FC0u) : rounded, T::from_bits());
  }
  return static_cast<T>(x);
}

// The largest magnitude of x[0, count), NaN ignored (std::max(m, |x|) in element order ignores
// it too, and the maximum of the rest does not depend on the order): 16 running maxima, then one.
inline float block_absmax(const float* x, int64_t count) {
  constexpr int kParts = 16;
  float part[kParts] = {};
  int64_t k = 0;
  for (; k + kParts <= count; k += kParts) {
    for (int j = 0; j < kParts; ++j) part[j] = std::max(part[j], std::fabs(x[k + j]));
  }
  float mx = 0.0f;
  for (; k < count; ++k) mx = std::max(mx, std::fabs(x[k]));
  for (int j = 0; j < kParts; ++j) mx = std::max(mx, part[j]);
  return mx;
}

#if defined(__AVX512F__)
// quantize_within_two_steps for 16 lanes at a time with hardware gathers (gcc's generic tuning
// emulates gathers with scalar loads: 2.6x slower here); the tail and other builds take the
// scalar form. The same comparisons on the same quotients: T[code] <= y is false for NaN on
// either side, as in C, and NaN quotients give code 0.
inline int64_t quantize_lanes(const float* __restrict x, int64_t count, float absmax,
                              const float* __restrict thresholds, const int32_t* __restrict index,
                              uint8_t* __restrict codes) {
  constexpr int kShift = 23 - kQuantIndexBits;
  const __m512 scale = _mm512_set1_ps(absmax);
  const __m512i one = _mm512_set1_epi32(1);
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    const __m512 y = _mm512_div_ps(_mm512_loadu_ps(x + k), scale);
    const __m512i bits = _mm512_castps_si512(y);
    // quant_bucket(y)
    __m512i key = _mm512_srli_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)), kShift);
    key = _mm512_min_epu32(_mm512_max_epu32(key, _mm512_set1_epi32(static_cast<int>(kQuantKeyLow))),
                           _mm512_set1_epi32(static_cast<int>(kQuantKeyHigh)));
    const __m512i j = _mm512_sub_epi32(key, _mm512_set1_epi32(static_cast<int>(kQuantKeyLow)));
    const __mmask16 negative = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
    const __m512i bucket = _mm512_mask_blend_epi32(
        negative, _mm512_add_epi32(_mm512_set1_epi32(kQuantBucketsPerSign), j),
        _mm512_sub_epi32(_mm512_set1_epi32(kQuantBucketsPerSign - 1), j));
    __m512i code = _mm512_i32gather_epi32(bucket, index, 4);
    __mmask16 below = _mm512_cmp_ps_mask(_mm512_i32gather_ps(code, thresholds, 4), y, _CMP_LE_OQ);
    code = _mm512_mask_add_epi32(code, below, code, one);
    below = _mm512_cmp_ps_mask(_mm512_i32gather_ps(code, thresholds, 4), y, _CMP_LE_OQ);
    code = _mm512_mask_add_epi32(code, below, code, one);
    code = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), code);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(code));
  }
  return k;
}
#endif

// compressed_state.h's quantize_run, compiled for this build, through the widened index.
inline void quantize_codes(const float* __restrict x, int64_t count, float absmax, const CpuCodebook& c,
                           uint8_t* __restrict codes) {
  if (c.book.within_two_steps && absmax > 0.0f) {
    const float* __restrict thresholds = c.book.thresholds;
    const int32_t* __restrict index = c.index32;
    // Into a local array first: a store through uint8_t* may alias the tables, and the vectorizer
    // does not check that at run time beside gathers.
    int64_t k = 0;
#if defined(__AVX512F__)
    k = quantize_lanes(x, count, absmax, thresholds, index, codes);
#endif
    uint8_t out[kQuantBlock];
    for (int64_t i = k; i < count; ++i) out[i] = quantize_within_two_steps(x[i], absmax, thresholds, index);
    std::copy(out + k, out + count, codes + k);
  } else {
    for (int64_t k = 0; k < count; ++k) codes[k] = quantize_value(x[k], absmax, c.book);
  }
}

// Elements [begin, begin + count) of one tensor, one quantization block (count <= kQuantBlock).
template <typename T, MomentStorage M, WeightStorage W>
void step_block(const CompressedRule& r, const CompressedSlice& s, int64_t begin, int64_t count) {
  float g[kQuantBlock], p[kQuantBlock], m[kQuantBlock], v[kQuantBlock];
  T* grad = static_cast<T*>(s.grad) + begin;
  T* param = static_cast<T*>(s.param) + begin;
  const int64_t block = begin / kQuantBlock;
  // Gradients: unscaled and clipped (written back so), negated for maximize.
  const GradTransform transform = r.transform;
  for (int64_t k = 0; k < count; ++k) g[k] = transform.unscaled(widen(grad[k]));
  if (r.store_grads) {
    for (int64_t k = 0; k < count; ++k) grad[k] = narrow_nearest<T>(g[k]);
  }
  if (transform.maximize) {
    for (int64_t k = 0; k < count; ++k) g[k] = -g[k];
  }
  // The state, decoded.
  if constexpr (M == MomentStorage::kFp32) {
    const float* a = static_cast<const float*>(s.exp_avg) + begin;
    const float* b = static_cast<const float*>(s.exp_avg_sq) + begin;
    for (int64_t k = 0; k < count; ++k) m[k] = a[k], v[k] = b[k];
  } else if constexpr (M == MomentStorage::kBf16) {
    const auto* a = static_cast<const c10::BFloat16*>(s.exp_avg) + begin;
    const auto* b = static_cast<const c10::BFloat16*>(s.exp_avg_sq) + begin;
    for (int64_t k = 0; k < count; ++k) m[k] = widen(a[k]), v[k] = widen(b[k]);
  } else if constexpr (M == MomentStorage::kFp8) {
    const uint8_t* a = static_cast<const uint8_t*>(s.exp_avg) + begin;
    const uint8_t* b = static_cast<const uint8_t*>(s.exp_avg_sq) + begin;
    const float m_scale = fp8_moment_scale(s.exp_avg_absmax[block]);
    const float v_scale = fp8_moment_scale(s.exp_avg_sq_absmax[block]);
    const float* values = r.fp8_values;  // the 256 fp8 values
    for (int64_t k = 0; k < count; ++k) {
      m[k] = values[a[k]] * m_scale;
      v[k] = values[b[k]] * v_scale;
    }
  } else {
    const uint8_t* a = static_cast<const uint8_t*>(s.exp_avg) + begin;
    const uint8_t* b = static_cast<const uint8_t*>(s.exp_avg_sq) + begin;
    const float m_scale = s.exp_avg_absmax[block], v_scale = s.exp_avg_sq_absmax[block];
    const float* smap = r.signed_map;
    const float* umap = r.unsigned_map;
    for (int64_t k = 0; k < count; ++k) {
      m[k] = dequantize_value(a[k], m_scale, smap);
      v[k] = dequantize_value(b[k], v_scale, umap);
    }
  }
  if constexpr (W == WeightStorage::kMaster) {
    const float* master = s.master + begin;
    for (int64_t k = 0; k < count; ++k) p[k] = master[k];
  } else if constexpr (W == WeightStorage::kRemainder) {
    const auto* bits = reinterpret_cast<const uint16_t*>(param);
    const int16_t* rem = s.remainder + begin;
    for (int64_t k = 0; k < count; ++k) p[k] = join_master(bits[k], rem[k]);
  } else {
    for (int64_t k = 0; k < count; ++k) p[k] = widen(param[k]);
  }
  // Adam: adam_element's weight decay first, in a loop of its own, then the rest of it with the
  // decay off and no amsgrad (the compressed step has none): the flags adam_element branches on
  // are then known in the loop, which vectorizes.
  AdamStepScalars scalars = s.scalars;
  if (scalars.weight_decay != 0.0f) {
    if (scalars.decoupled) {
      for (int64_t k = 0; k < count; ++k) p[k] = p[k] * scalars.decay;
    } else {
      for (int64_t k = 0; k < count; ++k) g[k] = fmaf(scalars.weight_decay, p[k], g[k]);
    }
  }
  scalars.weight_decay = 0.0f;
  scalars.amsgrad = false;
  for (int64_t k = 0; k < count; ++k) {
    float no_v_max = 0.0f;
    adam_element(scalars, g[k], p[k], m[k], v[k], no_v_max);
  }
  // The weight, encoded.
  if constexpr (W == WeightStorage::kMaster) {
    float* master = s.master + begin;
    for (int64_t k = 0; k < count; ++k) master[k] = p[k], param[k] = narrow_nearest<T>(p[k]);
  } else if constexpr (W == WeightStorage::kRemainder) {
    auto* bits = reinterpret_cast<uint16_t*>(param);
    int16_t* rem = s.remainder + begin;
    for (int64_t k = 0; k < count; ++k) {
      const SplitMaster split = split_master(p[k]);
      bits[k] = split.weight_bits;
      rem[k] = split.remainder;
    }
  } else if constexpr (W == WeightStorage::kStochastic && !std::is_same_v<T, float>) {
    const RandomStream random = s.weight_random;
    for (int64_t k = 0; k < count; ++k) param[k] = round_stochastic<T>(p[k], random.word(begin + k));
  } else {
    for (int64_t k = 0; k < count; ++k) param[k] = narrow_nearest<T>(p[k]);
  }
  // The moments, encoded.
  if constexpr (M == MomentStorage::kFp32) {
    float* a = static_cast<float*>(s.exp_avg) + begin;
    float* b = static_cast<float*>(s.exp_avg_sq) + begin;
    for (int64_t k = 0; k < count; ++k) a[k] = m[k], b[k] = v[k];
  } else if constexpr (M == MomentStorage::kBf16) {
    auto* a = static_cast<c10::BFloat16*>(s.exp_avg) + begin;
    auto* b = static_cast<c10::BFloat16*>(s.exp_avg_sq) + begin;
    const RandomStream random = s.moment_random;
    for (int64_t k = 0; k < count; ++k) {
      const uint32_t word = random.word(begin + k);
      a[k] = round_moment_m(m[k], word);
      b[k] = round_moment_v(v[k], word);
    }
  } else if constexpr (M == MomentStorage::kFp8) {
    const float m_max = block_absmax(m, count), v_max = block_absmax(v, count);
    s.exp_avg_absmax[block] = m_max;
    s.exp_avg_sq_absmax[block] = v_max;
    const float m_ratio = fp8_moment_ratio(m_max), v_ratio = fp8_moment_ratio(v_max);
    uint8_t* __restrict a = static_cast<uint8_t*>(s.exp_avg) + begin;
    uint8_t* __restrict b = static_cast<uint8_t*>(s.exp_avg_sq) + begin;
    for (int64_t k = 0; k < count; ++k) a[k] = fp8_moment_code(m[k] * m_ratio);
    for (int64_t k = 0; k < count; ++k) b[k] = fp8_moment_code(v[k] * v_ratio);
  } else {
    const float m_max = block_absmax(m, count), v_max = block_absmax(v, count);
    s.exp_avg_absmax[block] = m_max;
    s.exp_avg_sq_absmax[block] = v_max;
    quantize_codes(m, count, m_max, *r.signed_book, static_cast<uint8_t*>(s.exp_avg) + begin);
    quantize_codes(v, count, v_max, *r.unsigned_book, static_cast<uint8_t*>(s.exp_avg_sq) + begin);
  }
}

template <typename T, MomentStorage M, WeightStorage W>
void step_blocks(const CompressedRule& r, const CompressedSlice& s, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kQuantBlock;
    step_block<T, M, W>(r, s, begin, std::min(kQuantBlock, s.numel - begin));
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The instance of the call's dtype and modes (the checks let fp32 params through with plain
// weights only, and the remainder with bf16 only).
inline void dispatch_blocks(const CompressedRule& r, const CompressedSlice& s, int64_t b0, int64_t b1) {
  auto with_weights = [&](auto t, auto m) {
    using T = typename decltype(t)::type;
    constexpr MomentStorage M = decltype(m)::value;
    using WS = WeightStorage;
    if constexpr (std::is_same_v<T, float>) {
      return step_blocks<T, M, WS::kPlain>(r, s, b0, b1);
    } else {
      switch (r.weights) {
        case WS::kPlain: return step_blocks<T, M, WS::kPlain>(r, s, b0, b1);
        case WS::kMaster: return step_blocks<T, M, WS::kMaster>(r, s, b0, b1);
        case WS::kStochastic: return step_blocks<T, M, WS::kStochastic>(r, s, b0, b1);
        case WS::kRemainder:
          if constexpr (std::is_same_v<T, c10::BFloat16>) return step_blocks<T, M, WS::kRemainder>(r, s, b0, b1);
          return;
      }
    }
  };
  auto with_moments = [&](auto t) {
    using MS = MomentStorage;
    switch (r.moments) {
      case MS::kFp32: return with_weights(t, std::integral_constant<MS, MS::kFp32>{});
      case MS::kBf16: return with_weights(t, std::integral_constant<MS, MS::kBf16>{});
      case MS::kInt8: return with_weights(t, std::integral_constant<MS, MS::kInt8>{});
      case MS::kFp8: return with_weights(t, std::integral_constant<MS, MS::kFp8>{});
    }
  };
  switch (r.dtype) {
    case at::kFloat: return with_moments(TypeTag<float>{});
    case at::kHalf: return with_moments(TypeTag<c10::Half>{});
    case at::kBFloat16: return with_moments(TypeTag<c10::BFloat16>{});
    default: return;
  }
}
