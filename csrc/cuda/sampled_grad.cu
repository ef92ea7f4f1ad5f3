// CUDA kernels of the sampled per-sample gradient ops (schemas in ops.cpp, semantics
// in sampled_grad.h): the sparse sampled-dot-product strategy. One warp computes one
// (sample, entry) dot product over the positions, reading a and d in place through
// their strides, and a warp shuffle reduces it; nothing of size B x m x positions is
// gathered. Same semantics as the CPU kernels (csrc/cpu/sampled_grad.cpp): fp32
// accumulation (fp64 for fp64 inputs), one rounding into out's dtype.
//
// Status: compiled in CI; run on an H100 (2026-11-23): tests/test_sampled_ops.py's
// `gpu`-marked tests compare it with the plain-torch reference, and bench/bench_gram.py
// measured it fastest of the GPU backends (bench/RESULTS.md).
//
// Index ranges are checked with device asserts (a host-side check would need a sync
// per call); an out-of-range index aborts the CUDA context with a message.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../sampled_grad.h"

namespace tangent_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename out_t, typename acc_t>
__device__ __forceinline__ out_t round_to(acc_t value) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    return value;
  } else if constexpr (std::is_same_v<out_t, double>) {
    return static_cast<double>(value);
  } else {
    return static_cast<out_t>(static_cast<float>(value));
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

struct Entries {
  const int64_t* d_channel;
  const int64_t* a_channel;
  const int64_t* offsets;  // [m, nd] or nullptr
  int64_t nd;
  int64_t m;
  const int64_t* out_columns;  // or nullptr
};

// The position loop advances a mixed-radix counter (p0, p1, p2) by the warp width with
// at most one carry per digit: no integer division inside it (the first version divided
// each flat position back into coordinates, four 64-bit divisions per element, while
// this kernel took 36% of tk.gram's GPU time on resnet50 at 224x224 on an H100). Samples
// run along the grid's y dimension, so no division splits a task index either, and a
// warp reuses an entry's index setup for all the samples it visits.
template <typename in_t, typename out_t>
__global__ void sampled_dots_kernel(SampledView v, const in_t* __restrict__ a, const in_t* __restrict__ d,
                                    Entries e, out_t* __restrict__ out, int64_t out_row, int64_t out_col,
                                    int64_t out_columns_limit) {
  using acc_t = at::opmath_type<in_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // Position counts fit in 32 bits (checked on the host), so the counter does too.
  const int positions = static_cast<int>(v.positions[0] * v.positions[1] * v.positions[2]);
  // With no positions every dot is 0 and the counter never runs; radix 1 keeps it defined.
  const int n1 = positions > 0 ? static_cast<int>(v.positions[1]) : 1,
            n2 = positions > 0 ? static_cast<int>(v.positions[2]) : 1;
  // kWarp in the mixed radix (positions[0], n1, n2), and each lane's first position.
  const int step2 = kWarp % n2, step1 = (kWarp / n2) % n1, step0 = kWarp / (n2 * n1);
  const int first2 = lane % n2, first1 = (lane / n2) % n1, first0 = lane / (n2 * n1);
  const int64_t a_step[kMaxSpatial] = {v.stride[0] * v.a_space[0], v.stride[1] * v.a_space[1],
                                       v.stride[2] * v.a_space[2]};
  const int64_t pad = kMaxSpatial - e.nd;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; j < e.m; j += warps) {
    const int64_t oc = e.d_channel[j];
    const int64_t ic = e.a_channel[j];
    CUDA_KERNEL_ASSERT(oc >= 0 && oc < v.d_channels && ic >= 0 && ic < v.a_channels);
    int64_t a_entry = ic * v.a_channel;
    if (e.offsets != nullptr) {
      for (int64_t i = 0; i < e.nd; ++i) {
        const int64_t k = e.offsets[j * e.nd + i];
        const int64_t s = pad + i;
        CUDA_KERNEL_ASSERT(k >= 0 && (v.positions[s] == 0 ||
                                      k * v.dilation[s] + (v.positions[s] - 1) * v.stride[s] < v.a_extent[s]));
        a_entry += k * v.dilation[s] * v.a_space[s];
      }
    }
    const int64_t column = e.out_columns != nullptr ? e.out_columns[j] : j;
    CUDA_KERNEL_ASSERT(column >= 0 && column < out_columns_limit);
    for (int64_t b = blockIdx.y; b < v.batch; b += gridDim.y) {
      const in_t* a_at = a + b * v.a_batch + a_entry;
      const in_t* d_at = d + b * v.d_batch + oc * v.d_channel;
      acc_t acc = 0;
      int p0 = first0, p1 = first1, p2 = first2;
      for (int p = lane; p < positions; p += kWarp) {
        acc += static_cast<acc_t>(a_at[p0 * a_step[0] + p1 * a_step[1] + p2 * a_step[2]]) *
               static_cast<acc_t>(d_at[p0 * v.d_space[0] + p1 * v.d_space[1] + p2 * v.d_space[2]]);
        p2 += step2;
        const int carry2 = p2 >= n2;
        p2 -= carry2 * n2;
        p1 += step1 + carry2;
        const int carry1 = p1 >= n1;
        p1 -= carry1 * n1;
        p0 += step0 + carry1;
      }
      acc = warp_sum(acc);
      if (lane == 0) out[b * out_row + column * out_col] = round_to<out_t, acc_t>(acc);
    }
  }
}

template <typename in_t, typename out_t>
__global__ void embedding_dots_kernel(const int64_t* __restrict__ tokens, int64_t batch, int64_t length,
                                      const in_t* __restrict__ d, int64_t d_b, int64_t d_t, int64_t d_e,
                                      int64_t embed, const int64_t* __restrict__ rows,
                                      const int64_t* __restrict__ cols, int64_t m, int64_t padding,
                                      bool has_padding, const int64_t* __restrict__ out_columns,
                                      out_t* __restrict__ out, int64_t out_row, int64_t out_col,
                                      int64_t out_columns_limit) {
  using acc_t = at::opmath_type<in_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; task < batch * m;
       task += warps) {
    const int64_t b = task / m;
    const int64_t j = task % m;
    const int64_t row = rows[j];
    const int64_t col = cols[j];
    CUDA_KERNEL_ASSERT(col >= 0 && col < embed);
    acc_t acc = 0;
    if (!(has_padding && row == padding)) {
      for (int64_t t = lane; t < length; t += kWarp) {
        if (tokens[b * length + t] == row) acc += static_cast<acc_t>(d[b * d_b + t * d_t + col * d_e]);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      const int64_t column = out_columns != nullptr ? out_columns[j] : j;
      CUDA_KERNEL_ASSERT(column >= 0 && column < out_columns_limit);
      out[b * out_row + column * out_col] = round_to<out_t, acc_t>(acc);
    }
  }
}

int blocks_for(int64_t tasks) {
  const int64_t wanted = (tasks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  // Grid-stride loops cover the rest; enough blocks to fill any current GPU.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 65535)));
}

template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, F&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in, "sampled_grad", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out, "sampled_grad", [&] {
      body(static_cast<in_t*>(nullptr), static_cast<scalar_t*>(nullptr));
    });
  });
}

void run(const char* op, const SampledView& v, const at::Tensor& a, const at::Tensor& d, const Entries& e,
         const at::Tensor& out) {
  if (e.m == 0 || v.batch == 0) return;
  TORCH_CHECK(v.positions[0] * v.positions[1] * v.positions[2] < (int64_t{1} << 31) - kWarp, op,
              ": more than 2^31 output positions per sample are not supported (split the input)");
  const c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_in_out(a.scalar_type(), out.scalar_type(), [&](auto* in_tag, auto* out_tag) {
    using in_t = std::remove_pointer_t<decltype(in_tag)>;
    using out_t = std::remove_pointer_t<decltype(out_tag)>;
    // Few enough blocks that each warp strides over many (entry, sample) pairs: with one
    // pair per warp (a block per 8 entries and sample), per-block setup outweighed the
    // dots of resnet50's 7x7 layers and the kernel ran 22% slower on an H100.
    const int64_t samples_per_grid = std::min<int64_t>(v.batch, 4);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((e.m + kWarpsPerBlock - 1) / kWarpsPerBlock, 2048)),
                    static_cast<unsigned>(samples_per_grid));
    sampled_dots_kernel<in_t, out_t><<<grid, kWarp * kWarpsPerBlock, 0, stream>>>(
        v, a.data_ptr<in_t>(), d.data_ptr<in_t>(), e, out.data_ptr<out_t>(), out.stride(0), out.stride(1),
        out.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

c10::optional<at::Tensor> contiguous_columns(const c10::optional<at::Tensor>& out_columns) {
  return out_columns.has_value() ? c10::optional<at::Tensor>(out_columns->contiguous()) : c10::nullopt;
}

void sampled_linear_grad_cuda(const at::Tensor& a, const at::Tensor& d, const at::Tensor& rows,
                              const at::Tensor& cols, const at::Tensor& out,
                              const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_linear_grad (CUDA kernel)";
  const int64_t m = check_sampled_linear_args(a, d, rows, cols, out, out_columns);
  TORCH_CHECK(a.is_cuda(), op, ": expected CUDA tensors, got ", a.device());
  const at::Tensor r = rows.contiguous(), c = cols.contiguous();
  const c10::optional<at::Tensor> oc = contiguous_columns(out_columns);
  // Channels-first views: consecutive lanes read consecutive tokens of one feature.
  const at::Tensor at_ = a.transpose(1, 2), dt = d.transpose(1, 2);
  const int64_t one[] = {1};
  const SampledView v = make_sampled_view(at_, dt, one, one);
  const Entries e{r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), nullptr, 1, m,
                  oc.has_value() ? oc->data_ptr<int64_t>() : nullptr};
  run(op, v, at_, dt, e, out);
}

void sampled_conv_grad_cuda(const at::Tensor& a_pad, const at::Tensor& d, const at::Tensor& out_channel,
                            const at::Tensor& in_channel, const at::Tensor& kernel_offsets, at::IntArrayRef stride,
                            at::IntArrayRef dilation, const at::Tensor& out,
                            const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_conv_grad (CUDA kernel)";
  const int64_t m =
      check_sampled_conv_args(a_pad, d, out_channel, in_channel, kernel_offsets, stride, dilation, out, out_columns);
  TORCH_CHECK(a_pad.is_cuda(), op, ": expected CUDA tensors, got ", a_pad.device());
  const at::Tensor o = out_channel.contiguous(), c = in_channel.contiguous(), k = kernel_offsets.contiguous();
  const c10::optional<at::Tensor> oc = contiguous_columns(out_columns);
  const SampledView v = make_sampled_view(a_pad, d, stride, dilation);
  const Entries e{o.data_ptr<int64_t>(), c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), a_pad.dim() - 2, m,
                  oc.has_value() ? oc->data_ptr<int64_t>() : nullptr};
  run(op, v, a_pad, d, e, out);
}

void sampled_embedding_grad_cuda(const at::Tensor& tokens, const at::Tensor& d, const at::Tensor& rows,
                                 const at::Tensor& cols, c10::optional<int64_t> padding_idx, const at::Tensor& out,
                                 const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_embedding_grad (CUDA kernel)";
  const int64_t m = check_sampled_embedding_args(tokens, d, rows, cols, out, out_columns);
  TORCH_CHECK(d.is_cuda(), op, ": expected CUDA tensors, got ", d.device());
  if (m == 0 || d.size(0) == 0) return;
  const at::Tensor r = rows.contiguous(), c = cols.contiguous(), tok = tokens.contiguous();
  const c10::optional<at::Tensor> oc = contiguous_columns(out_columns);
  const c10::cuda::CUDAGuard guard(d.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_in_out(d.scalar_type(), out.scalar_type(), [&](auto* in_tag, auto* out_tag) {
    using in_t = std::remove_pointer_t<decltype(in_tag)>;
    using out_t = std::remove_pointer_t<decltype(out_tag)>;
    embedding_dots_kernel<in_t, out_t><<<blocks_for(d.size(0) * m), kWarp * kWarpsPerBlock, 0, stream>>>(
        tok.data_ptr<int64_t>(), d.size(0), tok.size(1), d.data_ptr<in_t>(), d.stride(0), d.stride(1), d.stride(2),
        d.size(2), r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), m, padding_idx.value_or(0),
        padding_idx.has_value(), oc.has_value() ? oc->data_ptr<int64_t>() : nullptr, out.data_ptr<out_t>(),
        out.stride(0), out.stride(1), out.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace tangent_kernels

TORCH_LIBRARY_IMPL(tangent_kernels, CUDA, m) {
  m.impl("sampled_linear_grad", &tangent_kernels::sampled_linear_grad_cuda);
  m.impl("sampled_conv_grad", &tangent_kernels::sampled_conv_grad_cuda);
  m.impl("sampled_embedding_grad", &tangent_kernels::sampled_embedding_grad_cuda);
}
