// The emulated build's side of csrc/cuda/common.cuh (FGD_EMU defined): what nvcc builds take from
// the CUDA runtime and c10/cuda, here from the emulator (emu.h). Included by common.cuh only.
#pragma once
#include <c10/core/Device.h>

#include <cstdint>

#include "emu.h"

#define FGD_LAUNCH(grid, block, stream, ...) FGD_EMU_LAUNCH(grid, block, __VA_ARGS__)
#define FGD_LAUNCH_CHECK() ((void)0)
#define FGD_CUDA_IMPL(m) FGD_TORCH_LIBRARY_IMPL(FGD_LIBRARY, CPU, m)

namespace fgd {
using Stream = void*;
inline Stream current_stream() { return nullptr; }
// Emulated kernels run on the CPU tensors they are given.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
// The emulator's limits, which the tests lower so that every grid-stride loop is really taken.
inline int64_t max_grid_y() { return emu::config().max_grid_y; }
inline int64_t max_blocks() { return emu::config().max_blocks; }
}  // namespace fgd
