// Which copy of the vectorised loops (vec.h) the CPU kernels run.
#include <ATen/Version.h>

#include <string>

#include "vec.h"

namespace fgd {
namespace {

Isa supported() {
#if defined(FGD_X86_ISAS)
  __builtin_cpu_init();
  // What ATen's AVX-512 and AVX2 builds assume (cpuinfo checks in DispatchStub.cpp, -mf16c).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa select() {
  const std::string cap = at::get_cpu_capability();
  const Isa wanted = cap == "AVX512" ? Isa::kAvx512 : cap == "AVX2" ? Isa::kAvx2 : Isa::kDefault;
  const Isa best = supported();
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

}  // namespace

Isa isa() {
  static const Isa selected = select();
  return selected;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace fgd
