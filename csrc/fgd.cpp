// Every schema of the fgd library, in one place, and the argument checks both backends share.
#include "fgd.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>

namespace fgd {
namespace {

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "fgd.", op, ": ", name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

void check_offset(double offset, const char* op) {
  TORCH_CHECK_VALUE(offset == 0.0 || offset == 1.0, "fgd.", op,
                    ": offset must be 0 (continuous coordinates) or 1 (legacy +1 pixel), got ",
                    offset);
}

void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb,
                       const char* op) {
  // RuntimeError, as PyTorch's own ops raise for tensors on different devices.
  TORCH_CHECK(a.device() == b.device(), "fgd.", op, ": expected all tensors to be on the same device, ",
              "but ", na, " is on ", a.device(), " and ", nb, " on ", b.device());
}

// The product of the non-zero sizes fits in int64, so every partial product the kernels form (H*W,
// B*C, ...) does too, even for tensors with a zero dimension and huge others.
void check_size_product(at::IntArrayRef sizes, const char* op, const char* name) {
  int64_t product = 1;
  for (const int64_t s : sizes) {
    TORCH_CHECK_VALUE(s == 0 || !c10::mul_overflows(product, s, &product), "fgd.", op, ": ", name,
                      " is too large: the product of its sizes ", c10::str(sizes),
                      " overflows int64");
  }
}

// Boxes on the CPU: finite and small enough that float32 areas cannot overflow (a side below
// 2e18 squares to below FLT_MAX / 2, so a union of two such areas is finite). On a GPU the values
// are not checked: that would cost a device sync per call.
constexpr double kMaxCoordinate = 1e18;
void check_coordinates(const at::Tensor& t, const char* op, const char* name) {
  if (!t.is_cpu() || t.numel() == 0) return;
  // One pass, no temporary of t's size (as t.abs() would be); NaN makes both ends NaN.
  const auto [lo, hi] = at::aminmax(t);
  const double l = lo.item<double>(), h = hi.item<double>();
  TORCH_CHECK_VALUE(l >= -kMaxCoordinate && h <= kMaxCoordinate, "fgd.", op, ": ", name,
                    " must hold finite coordinates within +-", kMaxCoordinate,
                    ", got values in [", l, ", ", h, "]");
}

// mask [B, H, W] of the student [B, C, H, W]: bool or non-negative floating weights.
void check_mask(const at::Tensor& mask, const at::Tensor& student, const char* op) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()), "fgd.",
                   op, ": mask must be a bool tensor or a floating-point tensor of per-location ",
                   "weights, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == student.size(0) &&
                        mask.size(1) == student.size(2) && mask.size(2) == student.size(3),
                    "fgd.", op, ": mask must have shape [B, H, W] = [", student.size(0), ", ",
                    student.size(2), ", ", student.size(3), "], got ", shape_str(mask));
  check_same_device(student, "student", mask, "mask", op);
  // Negative weights would make the loss reward error, NaN or infinite ones make it NaN. Checking
  // costs a device sync on a GPU, so only float weights (never the bool masks fgd builds) pay it.
  if (mask.is_floating_point() && mask.numel() > 0 && !mask.is_meta()) {
    const auto [lo, hi] = at::aminmax(mask);
    // Both ends in one copy to the host: one sync, where two item() calls would make two.
    const at::Tensor ends = at::stack({lo, hi}).to(at::kCPU, at::kDouble);
    const double l = ends.const_data_ptr<double>()[0], h = ends.const_data_ptr<double>()[1];
    TORCH_CHECK_VALUE(l >= 0.0 && std::isfinite(h), "fgd.", op, ": mask weights must be ",
                      "finite and non-negative, got values in [", l, ", ", h, "]");
  }
}

// The upstream gradient a private backward op takes: a floating scalar on student's device, or on
// the CPU (as PyTorch's ops take a CPU scalar beside device tensors). On another device it would
// pick that device's kernel (a meta one returns an uninitialised tensor).
void check_grad(const at::Tensor& grad, const at::Tensor& student, const char* op) {
  check_floating(grad, op, "grad");
  TORCH_CHECK_VALUE(grad.numel() == 1, "fgd.", op, ": grad must be a scalar, got shape ",
                    shape_str(grad));
  TORCH_CHECK(grad.device() == student.device() || grad.is_cpu(), "fgd.", op, ": grad must be on ",
              "the CPU or on student's device (", student.device(), "), got ", grad.device());
}

}  // namespace

void check_box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2, double offset) {
  const char* op = "box_iou";
  check_floating(boxes1, op, "boxes1");
  check_floating(boxes2, op, "boxes2");
  TORCH_CHECK_TYPE(boxes1.scalar_type() == boxes2.scalar_type(), "fgd.box_iou: boxes1 and boxes2 ",
                   "must have the same dtype, got ", boxes1.scalar_type(), " and ",
                   boxes2.scalar_type());
  auto check_shape = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE((t.dim() == 2 || t.dim() == 3) && t.size(-1) == 4, "fgd.box_iou: ", name,
                      " must have shape [N, 4] or [B, N, 4] (x1, y1, x2, y2), got ",
                      shape_str(t));
  };
  check_shape(boxes1, "boxes1");
  check_shape(boxes2, "boxes2");
  TORCH_CHECK_VALUE(boxes1.dim() == boxes2.dim(), "fgd.box_iou: boxes1 and boxes2 must both be ",
                    "batched ([B, N, 4], [B, M, 4]) or both not, got ", shape_str(boxes1), " and ",
                    shape_str(boxes2));
  TORCH_CHECK_VALUE(boxes1.dim() == 2 || boxes1.size(0) == boxes2.size(0), "fgd.box_iou: boxes1 ",
                    "and boxes2 must have the same batch size, got ", shape_str(boxes1), " and ",
                    shape_str(boxes2));
  check_same_device(boxes1, "boxes1", boxes2, "boxes2", op);
  check_offset(offset, op);
  // the output [B,] N, M
  check_size_product({boxes1.dim() == 3 ? boxes1.size(0) : 1, boxes1.size(-2), boxes2.size(-2)}, op,
                     "the output [B, N, M]");
  check_coordinates(boxes1, op, "boxes1");
  check_coordinates(boxes2, op, "boxes2");
}

MaskShape check_imitation_mask(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                               const at::Tensor& gt_counts, c10::SymIntArrayRef feat_size,
                               double thresh, double offset) {
  const char* op = "imitation_mask";
  check_floating(anchors, op, "anchors");
  check_floating(gt_boxes, op, "gt_boxes");
  TORCH_CHECK_TYPE(anchors.scalar_type() == gt_boxes.scalar_type(), "fgd.imitation_mask: anchors ",
                   "and gt_boxes must have the same dtype, got ", anchors.scalar_type(), " and ",
                   gt_boxes.scalar_type());
  TORCH_CHECK_TYPE(gt_counts.scalar_type() == at::kLong, "fgd.imitation_mask: gt_counts must be ",
                   "an int64 tensor, got ", gt_counts.scalar_type());
  TORCH_CHECK_VALUE(gt_boxes.dim() == 3 && gt_boxes.size(2) == 4, "fgd.imitation_mask: gt_boxes ",
                    "must have shape [B, G, 4] (padded, x1, y1, x2, y2), got ", shape_str(gt_boxes));
  TORCH_CHECK_VALUE((anchors.dim() == 2 || anchors.dim() == 3) && anchors.size(-1) == 4,
                    "fgd.imitation_mask: anchors must have shape [H*W*K, 4] or [B, H*W*K, 4], got ",
                    shape_str(anchors));
  MaskShape s;
  s.B = gt_boxes.size(0);
  s.G = gt_boxes.size(1);
  s.A = anchors.size(-2);
  s.batched_anchors = anchors.dim() == 3;
  TORCH_CHECK_VALUE(!s.batched_anchors || anchors.size(0) == s.B, "fgd.imitation_mask: batched ",
                    "anchors must have the batch size of gt_boxes (", s.B, "), got ",
                    shape_str(anchors));
  TORCH_CHECK_VALUE(gt_counts.dim() == 1 && gt_counts.size(0) == s.B, "fgd.imitation_mask: ",
                    "gt_counts must have shape [B] = [", s.B, "], got ", shape_str(gt_counts));
  TORCH_CHECK_VALUE(feat_size.size() == 2, "fgd.imitation_mask: feat_size must be (H, W), got ",
                    feat_size.size(), " values");
  s.H = feat_size[0].guard_int(__FILE__, __LINE__);
  s.W = feat_size[1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(s.H > 0 && s.W > 0, "fgd.imitation_mask: feat_size must be two positive ",
                    "integers (H, W), got (", s.H, ", ", s.W, ")");
  int64_t HW = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(s.H, s.W, &HW) && HW <= s.A && s.A % HW == 0,
                    "fgd.imitation_mask: the number of anchors (", s.A, ") must be a positive ",
                    "multiple of H*W = ", s.H, "*", s.W, " (K anchors per location)");
  s.K = s.A / HW;
  check_size_product({s.B, s.H, s.W}, op, "the output [B, H, W]");
  check_size_product({s.B, s.G, s.A}, op, "the IoU count B*G*A");
  TORCH_CHECK_VALUE(thresh >= 0.0 && thresh < 1.0, "fgd.imitation_mask: thresh must be in [0, 1), ",
                    "got ", thresh);
  check_offset(offset, op);
  check_same_device(anchors, "anchors", gt_boxes, "gt_boxes", op);
  TORCH_CHECK(gt_counts.device() == gt_boxes.device() || gt_counts.is_cpu(),
              "fgd.imitation_mask: gt_counts must be on the CPU or on gt_boxes' device (",
              gt_boxes.device(), "), got ", gt_counts.device());
  // Values can be checked without a device sync only on the CPU; the kernels clamp them anyway.
  if (gt_counts.is_cpu() && s.B > 0) {
    const int64_t lo = gt_counts.min().item<int64_t>();
    const int64_t hi = gt_counts.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= s.G, "fgd.imitation_mask: gt_counts must be in [0, G] = [0, ",
                      s.G, "], got values in [", lo, ", ", hi, "]");
  }
  check_coordinates(anchors, op, "anchors");
  check_coordinates(gt_boxes, op, "gt_boxes");
  return s;
}

void check_imitation_loss(const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& mask) {
  const char* op = "imitation_loss";
  check_floating(student, op, "student");
  check_floating(teacher, op, "teacher");
  TORCH_CHECK_TYPE(student.scalar_type() == teacher.scalar_type(), "fgd.imitation_loss: student ",
                   "and teacher must have the same dtype, got ", student.scalar_type(), " and ",
                   teacher.scalar_type(), " (cast the teacher's features to the student's dtype)");
  TORCH_CHECK_VALUE(student.dim() == 4, "fgd.imitation_loss: student must have shape [B, C, H, W], ",
                    "got ", shape_str(student));
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "fgd.imitation_loss: teacher must have the ",
                    "shape of student ", shape_str(student), ", got ", shape_str(teacher));
  check_same_device(student, "student", teacher, "teacher", op);
  check_size_product(student.sizes(), op, "student");
  check_mask(mask, student, op);
}

void check_imitation_loss_backward(const at::Tensor& grad, const at::Tensor& student,
                                   const at::Tensor& teacher, const at::Tensor& mask) {
  check_imitation_loss(student, teacher, mask);
  check_grad(grad, student, "_imitation_loss_backward");
}

AdaptShape check_masked_adapt(const at::Tensor& student, const at::Tensor& teacher,
                              const at::Tensor& mask, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  const char* op = "masked_adapt_loss";
  check_floating(student, op, "student");
  auto same_dtype = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == student.scalar_type(), "fgd.masked_adapt_loss: ", name,
                     " must have the student's dtype (", student.scalar_type(), "), got ",
                     t.scalar_type());
    check_same_device(student, "student", t, name, op);
  };
  same_dtype(teacher, "teacher");
  same_dtype(weight, "weight");
  TORCH_CHECK_VALUE(student.dim() == 4, "fgd.masked_adapt_loss: student must have shape ",
                    "[B, Cs, H, W], got ", shape_str(student));
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == weight.size(3) &&
                        (weight.size(2) == 1 || weight.size(2) == 3),
                    "fgd.masked_adapt_loss: weight must be a 1x1 or 3x3 conv weight [Ct, Cs, k, k] ",
                    "with k = 1 or 3 (stride 1, padding k // 2), got ", shape_str(weight));
  AdaptShape a{student.size(0), student.size(1), weight.size(0), student.size(2), student.size(3),
               weight.size(2)};
  TORCH_CHECK_VALUE(a.Cs > 0 && a.Ct > 0, "fgd.masked_adapt_loss: the adaptation conv needs at least ",
                    "one input and one output channel (as conv2d does), got student ",
                    shape_str(student), " and weight ", shape_str(weight));
  TORCH_CHECK_VALUE(weight.size(1) == a.Cs, "fgd.masked_adapt_loss: weight ", shape_str(weight),
                    " takes ", weight.size(1), " input channels but student ", shape_str(student),
                    " has ", a.Cs);
  TORCH_CHECK_VALUE(teacher.dim() == 4 && teacher.size(0) == a.B && teacher.size(1) == a.Ct &&
                        teacher.size(2) == a.H && teacher.size(3) == a.W,
                    "fgd.masked_adapt_loss: teacher must have shape [B, Ct, H, W] = [", a.B, ", ",
                    a.Ct, ", ", a.H, ", ", a.W, "] (Ct = weight.shape[0]), got ", shape_str(teacher));
  if (bias.has_value() && bias->defined()) {
    same_dtype(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == a.Ct, "fgd.masked_adapt_loss: bias ",
                      "must have shape [Ct] = [", a.Ct, "], got ", shape_str(*bias));
  }
  check_size_product({a.B, std::max(a.Cs, a.Ct), a.H, a.W}, op, "student / teacher");
  check_size_product({a.Ct, a.Cs, a.k, a.k}, op, "weight");
  // the CPU kernels keep a location's row and column in an int
  TORCH_CHECK_VALUE(student.numel() == 0 || (a.H <= INT32_MAX && a.W <= INT32_MAX),
                    "fgd.masked_adapt_loss: student's height and width must be below 2^31, got ",
                    shape_str(student));
  check_mask(mask, student, op);
  return a;
}

AdaptShape check_masked_adapt_backward(const at::Tensor& grad, const at::Tensor& saved,
                                       const at::Tensor& idx, const at::Tensor& student,
                                       const at::Tensor& teacher, const at::Tensor& mask,
                                       const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias) {
  const char* op = "_masked_adapt_backward";
  const AdaptShape a = check_masked_adapt(student, teacher, mask, weight, bias);
  check_grad(grad, student, op);
  TORCH_CHECK_TYPE(saved.scalar_type() == student.scalar_type(), "fgd.", op, ": saved must have ",
                   "the student's dtype (", student.scalar_type(), "), got ", saved.scalar_type());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "fgd.", op, ": idx must be an int64 tensor, got ",
                   idx.scalar_type());
  check_same_device(student, "student", saved, "saved", op);
  check_same_device(student, "student", idx, "idx", op);
  TORCH_CHECK_VALUE(idx.dim() == 1 && saved.dim() == 2 && saved.size(0) == a.Ct &&
                        saved.size(1) == idx.size(0),
                    "fgd.", op, ": saved [Ct, N] and idx [N] must be the tensors ",
                    "_masked_adapt_forward(save=True) returned for these inputs (Ct = ", a.Ct,
                    "), got saved ", shape_str(saved), " and idx ", shape_str(idx));
  return a;
}

at::Tensor mask_weights(const at::Tensor& mask, const at::Tensor& student) {
  return mask.to(at::toOpMathType(student.scalar_type())).contiguous();
}

}  // namespace fgd

// Through a macro so that FGD_LIBRARY is expanded before TORCH_LIBRARY pastes it into names.
#define FGD_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FGD_TORCH_LIBRARY_AUTOGRAD(ns, m) TORCH_LIBRARY_IMPL(ns, Autograd, m)
#define FGD_TORCH_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

FGD_TORCH_LIBRARY(FGD_LIBRARY, m) {
  m.def("box_iou(Tensor boxes1, Tensor boxes2, float offset=0.0) -> Tensor");
  m.def(
      "imitation_mask(Tensor anchors, Tensor gt_boxes, Tensor gt_counts, SymInt[2] feat_size, "
      "float thresh=0.5, float offset=0.0) -> Tensor");
  m.def("imitation_loss(Tensor student, Tensor teacher, Tensor mask) -> Tensor");
  // d(loss)/d(student) scaled by `grad`; the teacher's gradient is its negation.
  m.def("_imitation_loss_backward(Tensor grad, Tensor student, Tensor teacher, Tensor mask) -> Tensor");
  // masked_adapt_loss = imitation_loss(act(conv2d(student, weight, bias, padding=k//2)), teacher,
  // mask), computed at the masked locations only (see masked_adapt.h); fgd.ops.masked_adapt_loss
  // is the entry point. With save, `saved` [Ct, N] holds N_p * d(loss)/d(conv output) at the masked
  // locations `idx` [N] for the backward; without (no backward will run) both are empty.
  m.def(
      "_masked_adapt_forward(Tensor student, Tensor teacher, Tensor mask, Tensor weight, "
      "Tensor? bias, bool relu, bool save) -> (Tensor loss, Tensor saved, Tensor idx)");
  // Gradients for (student, teacher, weight, bias), each scaled by `grad`; the ones not asked for in
  // output_mask come back empty.
  m.def(
      "_masked_adapt_backward(Tensor grad, Tensor saved, Tensor idx, Tensor student, Tensor teacher, "
      "Tensor mask, Tensor weight, Tensor? bias, bool relu, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

// The checks alone, for the shape functions in fgd/ops.py: tensors on the meta device reach those
// instead of a kernel, and must fail as the kernels do (a bad shape, a meta tensor beside a CPU one;
// for the backward ops a meta grad, saved or idx too).
namespace fgd {
namespace {
void check_imitation_mask_op(const at::Tensor& anchors, const at::Tensor& gt_boxes,
                             const at::Tensor& gt_counts, c10::SymIntArrayRef feat_size,
                             double thresh, double offset) {
  check_imitation_mask(anchors, gt_boxes, gt_counts, feat_size, thresh, offset);
}
void check_masked_adapt_op(const at::Tensor& student, const at::Tensor& teacher,
                           const at::Tensor& mask, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias) {
  check_masked_adapt(student, teacher, mask, weight, bias);
}
void check_masked_adapt_backward_op(const at::Tensor& grad, const at::Tensor& saved,
                                    const at::Tensor& idx, const at::Tensor& student,
                                    const at::Tensor& teacher, const at::Tensor& mask,
                                    const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias) {
  check_masked_adapt_backward(grad, saved, idx, student, teacher, mask, weight, bias);
}
}  // namespace
}  // namespace fgd

FGD_TORCH_LIBRARY_FRAGMENT(FGD_LIBRARY, m) {
  m.def("_check_box_iou(Tensor boxes1, Tensor boxes2, float offset) -> ()", &fgd::check_box_iou);
  m.def(
      "_check_imitation_mask(Tensor anchors, Tensor gt_boxes, Tensor gt_counts, SymInt[2] "
      "feat_size, float thresh, float offset) -> ()",
      &fgd::check_imitation_mask_op);
  m.def("_check_imitation_loss(Tensor student, Tensor teacher, Tensor mask) -> ()",
        &fgd::check_imitation_loss);
  m.def(
      "_check_masked_adapt(Tensor student, Tensor teacher, Tensor mask, Tensor weight, Tensor? "
      "bias) -> ()",
      &fgd::check_masked_adapt_op);
  m.def(
      "_check_imitation_loss_backward(Tensor grad, Tensor student, Tensor teacher, Tensor mask) "
      "-> ()",
      &fgd::check_imitation_loss_backward);
  m.def(
      "_check_masked_adapt_backward(Tensor grad, Tensor saved, Tensor idx, Tensor student, Tensor "
      "teacher, Tensor mask, Tensor weight, Tensor? bias) -> ()",
      &fgd::check_masked_adapt_backward_op);
}

// box_iou and imitation_mask are not differentiable: skipping autograd keeps their outputs free of
// a grad_fn even when the boxes require grad (e.g. predicted boxes).
FGD_TORCH_LIBRARY_AUTOGRAD(FGD_LIBRARY, m) {
  m.impl("box_iou", torch::CppFunction::makeFallthrough());
  m.impl("imitation_mask", torch::CppFunction::makeFallthrough());
}
