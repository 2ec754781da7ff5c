// Which instruction-set clone of the C++ CPU kernels runs.
//
// The extension is built for the baseline x86-64 ISA (it must load on any x86-64 CPU); the hot loops also come
// as clones compiled for AVX2 + FMA and for AVX-512 (F, BW, VL, DQ), in the same translation unit, and
// cpu_isa() picks one per call:
//
//   P2T_CPU_ISA unset, empty or "auto": the best clone this CPU has (avx512 > avx2 > default);
//   P2T_CPU_ISA=default | avx2 | avx512: that clone (an error when this CPU or this build lacks it), e.g. to test
//   every clone on one machine or to compare them.
//
// The variable is read at every call (a getenv, well under a microsecond), so a test may change it in-process.
// Clones exist with GCC and Clang on x86-64; elsewhere only "default" does.
//
// with_isa(isa, f) runs f() inside a function compiled for that ISA and flattened (every call inside f that can
// be inlined is): the loops of f are compiled for the ISA. Loops that need 512-bit vectors call a target
// function of their own per row instead (the vectoriser picks 256-bit vectors for a loop nested in another).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define P2T_X86_CLONES 1
#define P2T_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define P2T_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#else
#define P2T_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif
#else
#define P2T_X86_CLONES 0
#endif

namespace p2t {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

// Whether this CPU can run the clone (and this build has it).
inline bool cpu_supports(Isa isa) {
#if P2T_X86_CLONES
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return true;
  }
#else
  return isa == Isa::kDefault;
#endif
}

inline Isa best_isa() {
  static const Isa best = cpu_supports(Isa::kAvx512) ? Isa::kAvx512
                          : cpu_supports(Isa::kAvx2) ? Isa::kAvx2
                                                     : Isa::kDefault;
  return best;
}

// Whether P2T_CPU_ISA names a clone (then every kernel runs that clone, as asked).
inline bool cpu_isa_forced() {
  const char* v = std::getenv("P2T_CPU_ISA");
  return v != nullptr && *v != '\0' && std::strcmp(v, "auto") != 0;
}

// The clone to run now: P2T_CPU_ISA when set (checked), else the best one.
inline Isa cpu_isa() {
  const char* v = std::getenv("P2T_CPU_ISA");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return best_isa();
  Isa want;
  if (std::strcmp(v, "avx512") == 0) {
    want = Isa::kAvx512;
  } else if (std::strcmp(v, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(v, "default") == 0) {
    want = Isa::kDefault;
  } else {
    TORCH_CHECK(false, "P2T_CPU_ISA must be auto, default, avx2 or avx512, got '", v, "'");
  }
  TORCH_CHECK(cpu_supports(want), "P2T_CPU_ISA=", v, " but this CPU (or this build of p2t) has no ", v,
              " clone; the best here is ", isa_name(best_isa()));
  return want;
}

#if P2T_X86_CLONES
template <typename F>
P2T_TARGET_AVX2 __attribute__((flatten)) void run_avx2(const F& f) {
  f();
}
template <typename F>
P2T_TARGET_AVX512 __attribute__((flatten)) void run_avx512(const F& f) {
  f();
}
#endif

template <typename F>
inline void with_isa(Isa isa, const F& f) {
#if P2T_X86_CLONES
  if (isa == Isa::kAvx512) return run_avx512(f);
  if (isa == Isa::kAvx2) return run_avx2(f);
#endif
  f();
}

}  // namespace p2t
