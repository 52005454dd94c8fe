// Hot CPU loops are written as plain loops over structure-of-arrays data that the compiler
// vectorises; FGD_CPU_CLONES builds each of them for AVX-512, AVX2 and baseline x86-64 and picks
// one at load time, so a portable build still runs wide vectors where the CPU has them.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FGD_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FGD_CPU_CLONES
#endif

#include <cstdint>

#include "../box.h"

namespace fgd {

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
