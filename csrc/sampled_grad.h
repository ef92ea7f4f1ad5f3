// Shared pieces of the sampled per-sample gradient ops (sampled_linear_grad,
// sampled_conv_grad, sampled_embedding_grad): the argument checks every device kernel
// runs (defined in ops.cpp, where the schemas are) and the reduction of all three
// layouts to one "channels x up to 3 spatial dims" description.
//
// Every op writes out[b, out_columns[j]] (or out[b, j] when out_columns is None) for
// the m sampled weight entries j, directly into the caller's feature block: no [B, m]
// temporary and no gathered [B, m, positions] operand. Products are accumulated in
// float32 (float64 for float64 inputs) and rounded once into out's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace tangent_kernels {

// At most 3 spatial dims (Conv3d); Linear is a Conv1d with kernel 1 whose positions
// are its tokens, lower-dimensional convs get leading size-1 dims.
constexpr int kMaxSpatial = 3;

// a (the layer input, padded for convs) and d = ds/dz viewed as [B, channels, P0, P1, P2]
// with element strides; positions p run over d's spatial extent P, and entry (o, c, k)
// reads a at p * step + k * dilation.
struct SampledView {
  int64_t batch = 0;
  int64_t positions[kMaxSpatial] = {1, 1, 1};  // d's spatial extent, padded with leading 1s
  int64_t a_batch = 0, a_channel = 0, a_space[kMaxSpatial] = {0, 0, 0};
  int64_t d_batch = 0, d_channel = 0, d_space[kMaxSpatial] = {0, 0, 0};
  int64_t a_extent[kMaxSpatial] = {1, 1, 1};   // a's spatial extent (for bounds checks)
  int64_t stride[kMaxSpatial] = {1, 1, 1};
  int64_t dilation[kMaxSpatial] = {1, 1, 1};
  int64_t a_channels = 0, d_channels = 0;
};

// Checks shared by the CPU and CUDA kernels; throw c10::Error (RuntimeError in Python)
// naming the argument and the fix. Each returns m, the number of sampled entries.
int64_t check_sampled_linear_args(const at::Tensor& a, const at::Tensor& d, const at::Tensor& rows,
                                  const at::Tensor& cols, const at::Tensor& out,
                                  const c10::optional<at::Tensor>& out_columns);
int64_t check_sampled_conv_args(const at::Tensor& a_pad, const at::Tensor& d, const at::Tensor& out_channel,
                                const at::Tensor& in_channel, const at::Tensor& kernel_offsets,
                                at::IntArrayRef stride, at::IntArrayRef dilation, const at::Tensor& out,
                                const c10::optional<at::Tensor>& out_columns);
int64_t check_sampled_embedding_args(const at::Tensor& tokens, const at::Tensor& d, const at::Tensor& rows,
                                     const at::Tensor& cols, const at::Tensor& out,
                                     const c10::optional<at::Tensor>& out_columns);

// The view of a conv's (a_pad, d); a linear layer's (a, d) [B, T, I] / [B, T, O] are
// passed transposed, [B, I, T] / [B, O, T], with stride = dilation = 1.
SampledView make_sampled_view(const at::Tensor& a, const at::Tensor& d, at::IntArrayRef stride,
                              at::IntArrayRef dilation);

}  // namespace tangent_kernels
