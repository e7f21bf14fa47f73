// One tensor's share of a fused optimizer step on the CPU, as optim_cpu.cpp hands it to the
// element loops: the portable per-element loop (the reference, in optim_cpu.cpp) and the vector
// loops (optim_vector_loops.h, built for AVX2 and AVX-512), which must give the same bits.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "mixprec/optim_math.h"
#include "mixprec/rounding.h"

namespace mixprec::cpu {

// Element 0 of each buffer of one tensor (null where the mode has none); loops run over
// elements [begin, end) of it.
struct WeightSlice {
  void* param;            // fp32, fp16 or bf16 (or fp64, portable loop only)
  void* grad;             // the param's dtype (written back when StepRule::store_grads)
  float* master;          // fp32 master weights
  void* compensation;     // Kahan rounding error, the param's dtype
  RandomStream random;    // stochastic rounding's stream for this tensor at this step
};

struct AdamSlice {
  WeightSlice w;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // amsgrad only
  AdamStepScalars scalars;
};

struct SgdSlice {
  WeightSlice w;
  float* momentum_buffer;  // null without momentum
  bool first;              // the buffer starts as a copy of the grad
};

// What is the same for every tensor of one call.
struct StepRule {
  at::ScalarType dtype;
  GradTransform transform;
  Rounding rounding;
  bool store_grads;  // write the unscaled, clipped gradient back (torch's fused kernels do)
};

void adam_slice_portable(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end);
void sgd_slice_portable(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a,
                        int64_t begin, int64_t end);

#if defined(__x86_64__) && defined(__GNUC__)
// The vector loops (fp32, fp16 and bf16 params; fp64 stays portable). Elements outside whole
// vectors (8 elements for AVX2, 16 for AVX-512) go through the portable loop.
void adam_slice_avx2(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end);
void sgd_slice_avx2(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a,
                    int64_t begin, int64_t end);
void adam_slice_avx512(const StepRule& rule, const AdamSlice& a, int64_t begin, int64_t end);
void sgd_slice_avx512(const StepRule& rule, const SgdStepScalars& s, const SgdSlice& a,
                      int64_t begin, int64_t end);
#endif

}  // namespace mixprec::cpu
