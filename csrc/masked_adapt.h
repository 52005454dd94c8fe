// masked_adapt_loss: the adaptation conv, its activation and the imitation loss at the masked
// locations only. The driver (masked_adapt.cpp) is device-generic: it finds the masked locations,
// walks them in chunks and runs the products through ATen's matmul (BLAS / cuBLAS); each backend
// supplies the three memory-bound kernels below.
//
// Layout: a chunk of n masked locations gathers cols [Cs*k*k, n] (rows in the order of
// weight.view(Ct, Cs*k*k)'s columns), so the conv there is z = weight [Ct, Cs*k*k] @ cols -> [Ct, n].
// Keeping the location index last makes every kernel read and write runs of neighbouring locations.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace fgd {

// What the epilogue leaves in z. Both gradients lack the factor 1/(N_p) (and the upstream
// gradient): applied in backward, so that float16 buffers never hold values scaled down by N_p.
enum class EpilogueMode {
  kLossOnly,    // leave z as it is
  kStudentGrad, // z <- w * (act(z + b) - t) * act'(z + b): N_p * d(loss)/dz
  kDiff,        // z <- w * (act(z + b) - t): -N_p * d(loss)/d(teacher)
};

struct AdaptKernels {
  // cols [Cs*k*k, n] (contiguous) <- the zero-padded k x k neighbourhoods in student [B, Cs, H, W]
  // (contiguous) of the locations idx [n] (flat b*H*W + y*W + x).
  void (*im2col)(const at::Tensor& student, const at::Tensor& idx, int64_t k, at::Tensor& cols);
  // grad [B, Cs, H, W] (contiguous, opmath dtype) += the transpose of im2col applied to cols.
  void (*col2im)(const at::Tensor& cols, const at::Tensor& idx, int64_t k, at::Tensor& grad);
  // z [Ct, n] (unit column stride) holds weight @ cols; teacher [B, Ct, H, W] contiguous; w [n] the
  // locations' mask weights (float, double for float64). Returns a tensor whose sum (in double) is
  // sum_i w_i sum_c (act(z + b) - t)^2, and rewrites z as `mode` says.
  at::Tensor (*epilogue)(at::Tensor& z, const at::Tensor& teacher, const at::Tensor& idx,
                         const at::Tensor& w, const c10::optional<at::Tensor>& bias, bool relu,
                         EpilogueMode mode);
};

// Returns (loss, saved, idx): with save, saved [Ct, N] = N_p * d(loss)/dz at the masked locations
// idx [N] (flat b*H*W + y*W + x), which the backward takes back instead of finding them again.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_adapt_forward(
    const AdaptKernels& kernels, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& mask, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    bool relu, bool save);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_adapt_backward(
    const AdaptKernels& kernels, const at::Tensor& grad, const at::Tensor& saved,
    const at::Tensor& idx, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& mask, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    bool relu, std::array<bool, 4> output_mask);

}  // namespace fgd
