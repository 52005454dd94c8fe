// Hot CPU loops are written as plain loops over structure-of-arrays data that the compiler
// vectorises. FGD_PER_ISA compiles each of them once per x86 ISA (AVX-512, AVX2, baseline) and runs
// the copy for the path fgd::isa() picked, as ATen's DispatchStub does for its own kernels: the path
// follows at::get_cpu_capability() (so ATEN_CPU_CAPABILITY=default|avx2|avx512 selects it) and is
// chosen once per process.
//
// Why the loops vectorise on AVX2: the extension is built with -fno-trapping-math (clang's default),
// which lets the compiler evaluate both sides of a select (`c ? a / b : 0`) in vector registers;
// under GCC's default it only does so with AVX-512's masked instructions, and the AVX2 and baseline
// copies stayed scalar. Results do not change: every operation is still IEEE, in source order.
// tests/test_isa.py checks the built library for the vector code and runs the parity tests per path.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include "../box.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FGD_X86_ISAS 1
#define FGD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FGD_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define FGD_TARGET_AVX2
#define FGD_TARGET_AVX512
#endif

namespace fgd {

// The CPU code paths, in the order of at::native::CPUCapability on x86.
enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The path the CPU kernels run: at::get_cpu_capability(), lowered to what this CPU supports (ATen
// trusts ATEN_CPU_CAPABILITY; fgd will not run AVX-512 code on a CPU without it). Fixed at first use.
Isa isa();
const char* isa_name(Isa isa);

// Defines `ret name params`, which runs `name##_impl args` compiled for the path isa() picked. The
// three copies are separate functions named name_avx512 / name_avx2 / name_default (never inlined
// into the dispatcher: their targets differ), which is what tests/test_isa.py disassembles.
#define FGD_PER_ISA(ret, name, params, args)                                                     \
  FGD_TARGET_AVX512 __attribute__((noinline)) ret name##_avx512 params {                         \
    return name##_impl args;                                                                     \
  }                                                                                              \
  FGD_TARGET_AVX2 __attribute__((noinline)) ret name##_avx2 params { return name##_impl args; }  \
  __attribute__((noinline)) ret name##_default params { return name##_impl args; }               \
  inline ret name params {                                                                       \
    switch (isa()) {                                                                             \
      case Isa::kAvx512:                                                                         \
        return name##_avx512 args;                                                               \
      case Isa::kAvx2:                                                                           \
        return name##_avx2 args;                                                                 \
      default:                                                                                   \
        return name##_default args;                                                              \
    }                                                                                            \
  }

// Independent partial results per vectorised loop: reductions (sums, maxima) keep kLanes of them,
// which the compiler maps to vector registers without reassociating (no fast-math needed).
constexpr int kLanes = 16;

// Conversions between the feature types and float written as plain integer and float operations and
// selects, which the vectoriser understands (c10's own conversions branch, and use F16C only when a
// whole file is compiled for it). Results are c10's bit for bit: round to nearest even, NaN stays
// NaN (tests/test_isa.py checks every half and bfloat16 value). to_float(v) widens a feature value
// to its accumulator type, from_float(value, S()) rounds an accumulator value to the feature type S.
FGD_HD float to_float(c10::BFloat16 v) { return c10::bit_cast<float>(uint32_t(v.x) << 16); }
FGD_HD c10::BFloat16 from_float(float f, c10::BFloat16) {
  const uint32_t u = c10::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded),
                       c10::BFloat16::from_bits());
}
// Half: the bit manipulations of F. Giesen's half_to_float / float_to_half_fast3_rtne, as selects.
FGD_HD float to_float(c10::Half v) {
  const uint32_t h = v.x, em = h & 0x7FFFu, sign = (h & 0x8000u) << 16;
  const uint32_t normal = (em << 13) + (112u << 23);                          // rebias 15 -> 127
  const uint32_t special = (em << 13) | 0x7F800000u;                          // inf, NaN
  const uint32_t subnormal = c10::bit_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(em)) *
                                                     5.9604644775390625e-8f);  // em * 2^-24, exact
  const uint32_t r = em >= 0x7C00u ? special : em < 0x400u ? subnormal : normal;
  return c10::bit_cast<float>(r | sign);
}
FGD_HD c10::Half from_float(float f, c10::Half) {
  const uint32_t u = c10::bit_cast<uint32_t>(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  // Subnormal or zero: adding 0.5 (= 2^-1, as bits 126 << 23) lines the 10 mantissa bits up at the
  // bottom of the float, the addition rounding to nearest even.
  const float magic = c10::bit_cast<float>(126u << 23);
  const uint32_t subnormal = c10::bit_cast<uint32_t>(c10::bit_cast<float>(a) + magic) - (126u << 23);
  // Normal: rebias the exponent and round to nearest even on the 13 dropped bits.
  const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // The three cases blended with masks, not ?: — nested selects inside a caller's select make a
  // branch GCC will not vectorise.
  const uint32_t is_sub = 0u - static_cast<uint32_t>(a < (113u << 23));
  const uint32_t is_big = 0u - static_cast<uint32_t>(a >= (143u << 23));
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN -> quiet NaN, else inf
  uint32_t r = (normal & ~is_sub) | (subnormal & is_sub);
  r = (r & ~is_big) | (big & is_big);
  return c10::Half(static_cast<uint16_t>(r | sign), c10::Half::from_bits());
}
FGD_HD float to_float(float v) { return v; }
FGD_HD double to_float(double v) { return v; }
template <typename T>
FGD_HD T from_float(T v, T) { return v; }

// Boxes [n, 4] (x1, y1, x2, y2) as five arrays x1, y1, x2, y2, area of n values each.
template <typename T>
struct BoxesSoA {
  const T *x1, *y1, *x2, *y2, *area;
};

template <typename T>
inline BoxesSoA<T> soa_view(const T* base, int64_t n) {
  return {base, base + n, base + 2 * n, base + 3 * n, base + 4 * n};
}

// Fills dst [5 * n] with the SoA form of the contiguous [n, 4] boxes at src.
template <typename T>
inline void to_soa(const T* src, int64_t n, T offset, T* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* b = src + 4 * i;
    dst[i] = b[0];
    dst[n + i] = b[1];
    dst[2 * n + i] = b[2];
    dst[3 * n + i] = b[3];
    dst[4 * n + i] = box_area(b[0], b[1], b[2], b[3], offset);
  }
}

}  // namespace fgd
