// Included first by a file that is the AVX2 build of a CPU kernel (chosen at run time, see
// cpu_isa.h; ATen's own CPU kernels are compiled per instruction set the same way). Guard the
// include with `#if defined(__x86_64__) && defined(__GNUC__)`. Everything after it in the file
// compiles for AVX2 + FMA + F16C. The target pragma enables the instructions but not the feature
// macros that ATen's AVX2 Vectorized<float> (and sleef.h) test, so they are defined here too.
// Keep std::string (TORCH_CHECK messages, c10::str) out of such files: gcc 13 refuses to inline
// the standard library's always_inline members into AVX2-target functions.
#pragma once
#pragma GCC target("avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
