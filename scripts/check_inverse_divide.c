// Exhaustive check behind the compressed step's division by a reciprocal (Markstein): for a
// divisor d in [2^-20, 1] and r = 1/d correctly rounded, q = x*r, e = fma(-q, d, x), fma(e, r, q)
// must equal x/d for every float x the kernels divide: the Adam step's sqrt(v) (0, every normal
// in [2^-76, 2^65)) and the 8-bit ratio's |x| <= absmax. Divisors: sqrt(1 - beta2^step) rounded
// as the kernel rounds it for common beta2 and the first steps, plus random ones in the range.
// Build and run (AVX2 + FMA): gcc -O2 -mavx2 -mfma -fno-fast-math scripts/check_inverse_divide.c -lm
//   && ./a.out [random divisors, default 64]. Prints the differences found (expected: 0).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static uint32_t to_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

// Every float with bits in [lo, hi), both signs, for one divisor.
static long check(float d, uint32_t lo, uint32_t hi) {
  const float r = 1.0f / d;
  const __m256 vd = _mm256_set1_ps(d), vr = _mm256_set1_ps(r);
  const __m256i step = _mm256_set1_epi32(8), sign = _mm256_set1_epi32((int)0x80000000u);
  __m256i bits = _mm256_add_epi32(_mm256_set1_epi32((int)lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  long bad = 0;
  for (uint64_t b = lo; b + 8 <= hi; b += 8, bits = _mm256_add_epi32(bits, step)) {
    for (int s = 0; s < 2; ++s) {
      const __m256 x = _mm256_castsi256_ps(s ? _mm256_or_si256(bits, sign) : bits);
      const __m256 exact = _mm256_div_ps(x, vd);
      const __m256 q = _mm256_mul_ps(x, vr);
      const __m256 got = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, vd, x), vr, q);
      const int same = _mm256_movemask_epi8(
          _mm256_cmpeq_epi32(_mm256_castps_si256(exact), _mm256_castps_si256(got)));
      if (same != -1) {
        bad += 8 - __builtin_popcount((unsigned)same) / 4;
        if (bad <= 3) fprintf(stderr, "d=%a x-block=%08llx\n", d, (unsigned long long)b);
      }
    }
  }
  return bad;
}

int main(int argc, char** argv) {
  const int randoms = argc > 1 ? atoi(argv[1]) : 64;
  const uint32_t lo = to_bits(0x1p-76f), hi = to_bits(0x1p65f);
  float divisors[4096];
  int n = 0;
  const double betas[] = {0.999, 0.99, 0.95, 0.9, 0.9999, 0.98, 0.995};
  for (int b = 0; b < 7; ++b) {
    for (int step = 1; step <= 8; ++step) {
      divisors[n++] = sqrtf(1.0f - powf((float)betas[b], (float)step));
    }
  }
  srand(12345);
  for (int k = 0; k < randoms; ++k) {
    const double u = (double)rand() / RAND_MAX;  // log-uniform in [2^-20, 1]
    divisors[n++] = (float)exp2(-20.0 * u);
  }
  divisors[n++] = 0x1p-20f;
  divisors[n++] = 1.0f;
  divisors[n++] = from_bits(0x3F7FFFFFu);  // the largest float below 1
  long total = 0;
  for (int k = 0; k < n; ++k) {
    const long bad = check(divisors[k], lo, hi);
    total += bad;
    if (bad) printf("divisor %a: %ld differences\n", divisors[k], bad);
  }
  printf("%d divisors x %u magnitudes x 2 signs: %ld differences\n", n, hi - lo, total);
  return total != 0;
}
