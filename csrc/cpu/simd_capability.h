// at::vec compiles its SIMD specialisations only where a CPU_CAPABILITY_* macro is set (ATen
// sets it per kernel file). Set it from the compiler's target, so that -march=native builds get
// AVX-512 or AVX2 vectors, and give the inline namespace a name of its own so these
// instantiations never meet the generic ones of other translation units. Builds without these
// targets (KDOPS_PORTABLE=1) use the generic Vectorized, compiler-vectorised loops.
//
// Include first in a kernel file, before any ATen header (the macros must precede at::vec).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY kdops_avx512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY kdops_avx2
#endif
