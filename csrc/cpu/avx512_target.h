// Included first by a file that is the AVX-512 build of a CPU kernel (chosen at run time, see
// cpu_isa.h), as avx2_target.h is for AVX2: everything after it compiles for AVX-512 F/BW/VL/DQ
// (with AVX2, FMA and F16C), and the feature macros that ATen's AVX-512 Vectorized<float> tests
// are defined. The same rule holds: keep std::string out of such files.
#pragma once
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
