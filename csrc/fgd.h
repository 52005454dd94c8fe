// Argument checks shared by the CPU and CUDA entry points. They live in C++ so that a direct
// torch.ops.fgd.* call is as memory-safe as the Python wrapper: TORCH_CHECK_TYPE raises TypeError,
// TORCH_CHECK_VALUE raises ValueError, each naming the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

// The operator library: fgd, or fgd_emu for the emulated CUDA kernels (tests/emu_build.py), which
// compiles fgd.cpp again so that both libraries share these schemas and checks.
#ifndef FGD_LIBRARY
#define FGD_LIBRARY fgd
#endif

namespace fgd {

// Everything an imitation_mask kernel needs to know about the shapes.
struct MaskShape {
  int64_t B, G, A, H, W, K;
  bool batched_anchors;  // anchors are [B, A, 4] rather than one [A, 4] set shared by the batch
};

void check_box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2, double offset);
MaskShape check_imitation_mask(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                               const at::Tensor& gt_counts, c10::SymIntArrayRef feat_size,
                               double thresh, double offset);
void check_imitation_loss(const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& mask);
// The same, and grad: a floating scalar on student's device or the CPU.
void check_imitation_loss_backward(const at::Tensor& grad, const at::Tensor& student,
                                   const at::Tensor& teacher, const at::Tensor& mask);

// Shapes of a masked_adapt_loss call: student [B, Cs, H, W], weight [Ct, Cs, k, k].
struct AdaptShape {
  int64_t B, Cs, Ct, H, W, k;
};
AdaptShape check_masked_adapt(const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& mask, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias);
// The same, grad as for imitation_loss, and saved / idx as _masked_adapt_forward returns them.
AdaptShape check_masked_adapt_backward(const at::Tensor& grad, const at::Tensor& saved,
                                       const at::Tensor& idx, const at::Tensor& student,
                                       const at::Tensor& teacher, const at::Tensor& mask,
                                       const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias);

// The per-location weights the loss kernels read: the mask, contiguous, in the type the kernels
// accumulate `student` in (float, or double for float64 features).
at::Tensor mask_weights(const at::Tensor& mask, const at::Tensor& student);

}  // namespace fgd
