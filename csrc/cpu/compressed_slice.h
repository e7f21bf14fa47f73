// One tensor's share of the compressed Adam step on the CPU (compressed_cpu.cpp), as it hands it
// to the block loops (compressed_block_loops.h), which are built portable, for AVX2 and for
// AVX-512 and give the same bits in every build.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "mixprec/compressed_state.h"
#include "mixprec/optim_math.h"
#include "mixprec/rounding.h"

namespace mixprec::cpu {

// One tensor's pointers and per-step scalars.
struct CompressedSlice {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* exp_avg_absmax;
  float* exp_avg_sq_absmax;
  float* master;
  int16_t* remainder;
  AdamStepScalars scalars;
  RandomStream weight_random, moment_random;
  int64_t numel;
};

// A map's search tables as the CPU loops read them: the book, and its index widened to 32 bits
// (a vector gather loads 32-bit lanes; there is no byte gather).
struct CpuCodebook {
  QuantCodebook book;
  int32_t index32[kQuantIndexSize];

  void build(const float* map) {
    build_codebook(map, book);
    for (int j = 0; j < kQuantIndexSize; ++j) index32[j] = book.index[j];
  }
};

// What is the same for every tensor of one call.
struct CompressedRule {
  at::ScalarType dtype;
  GradTransform transform;
  MomentStorage moments;
  WeightStorage weights;
  bool store_grads;
  const float* signed_map;
  const float* unsigned_map;
  const CpuCodebook* signed_book;  // their search tables
  const CpuCodebook* unsigned_book;
  const float* fp8_values;  // compressed_state.h's fp8_values() (fp8 moments)
};

// Quantization blocks [b0, b1) of one tensor.
void compressed_blocks_portable(const CompressedRule& r, const CompressedSlice& s, int64_t b0, int64_t b1);
#if defined(__x86_64__) && defined(__GNUC__)
void compressed_blocks_avx2(const CompressedRule& r, const CompressedSlice& s, int64_t b0, int64_t b1);
void compressed_blocks_avx512(const CompressedRule& r, const CompressedSlice& s, int64_t b0, int64_t b1);
#endif

}  // namespace mixprec::cpu
