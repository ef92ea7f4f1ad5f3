// CPU kernels of the sampled per-sample gradient ops (schemas in ops.cpp, semantics
// in sampled_grad.h): tangent_kernels::sampled_{linear,conv,embedding}_grad.
//
// One task computes whole (sample, entry) dot products, reading a and d in place
// through their strides: nothing of size B x m x positions is ever gathered (the
// plain-torch path materializes two such operands per chunk, and that memory traffic
// dominates its time). Tasks are ordered sample-major, so the threads of a
// parallel_for share one sample's activations in cache. Each result is rounded once
// into out's dtype and stored at out[b, out_columns[j]].

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../sampled_grad.h"

namespace tangent_kernels {
namespace {

// ~16k multiply-adds per task: enough to amortize handing a range to a thread.
constexpr int64_t kGrainWork = 16384;

template <typename out_t, typename acc_t>
out_t round_to(acc_t value) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    return value;
  } else if constexpr (std::is_same_v<out_t, double>) {
    return static_cast<double>(value);
  } else {
    // 16-bit outputs of a float64 sum round through float32: a second rounding far
    // below the 16-bit one.
    return static_cast<out_t>(static_cast<float>(value));
  }
}

// sum_i x[i * sx] * y[i * sy]. Independent partial sums let the compiler vectorize
// the unit-stride case (it may not reorder one floating-point accumulator).
template <typename in_t, typename acc_t>
acc_t dot(const in_t* x, int64_t sx, const in_t* y, int64_t sy, int64_t n) {
  constexpr int kLanes = 8;
  if (n < kLanes) {
    // Rows of a few positions (a deep layer's 2x2 output): the partial sums' setup and
    // final reduction would cost more than the products.
    acc_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += static_cast<acc_t>(x[i * sx]) * static_cast<acc_t>(y[i * sy]);
    return total;
  }
  acc_t part[kLanes] = {};
  int64_t i = 0;
  if (sx == 1 && sy == 1) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) part[k] += static_cast<acc_t>(x[i + k]) * static_cast<acc_t>(y[i + k]);
    }
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(x[i * sx]) * static_cast<acc_t>(y[i * sy]);
  acc_t total = 0;
  for (int k = 0; k < kLanes; ++k) total += part[k];
  return total + tail;
}

struct Entries {
  const int64_t* d_channel;  // [m]
  const int64_t* a_channel;  // [m]
  const int64_t* offsets;    // [m, nd] kernel offsets, or nullptr (all 0)
  int64_t nd;
  int64_t m;
  const int64_t* out_columns;  // [m] or nullptr (column j)
};

template <typename in_t, typename out_t>
void sampled_dots(const SampledView& v, const in_t* a, const in_t* d, const Entries& e, out_t* out,
                  int64_t out_row, int64_t out_col) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t pad = kMaxSpatial - e.nd;
  int64_t a_step[kMaxSpatial];
  for (int i = 0; i < kMaxSpatial; ++i) a_step[i] = v.stride[i] * v.a_space[i];
  // Each entry's offsets into a sample's a and d and its output column, once per call
  // rather than once per (sample, entry): on layers with one output position (resnet18's
  // last stage at 32x32 holds most sampled entries) that arithmetic and the general dot
  // loop's setup were most of a task's time.
  std::vector<int64_t> a_entry(e.m), d_entry(e.m), out_entry(e.m);
  at::parallel_for(0, e.m, kGrainWork, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t offset = e.a_channel[j] * v.a_channel;
      if (e.offsets != nullptr) {
        for (int64_t i = 0; i < e.nd; ++i) offset += e.offsets[j * e.nd + i] * v.dilation[pad + i] * v.a_space[pad + i];
      }
      a_entry[j] = offset;
      d_entry[j] = e.d_channel[j] * v.d_channel;
      out_entry[j] = (e.out_columns != nullptr ? e.out_columns[j] : j) * out_col;
    }
  });
  const int64_t work = v.positions[0] * v.positions[1] * v.positions[2];
  const bool single = work == 1;
  const int64_t grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(work, 1));
  at::parallel_for(0, v.batch * e.m, grain, [&](int64_t begin, int64_t end) {
    // (b, j) advance with the task instead of task / m and task % m per task: a 64-bit
    // division costs more than a whole dot product on layers with one output position.
    int64_t b = begin / e.m;
    int64_t j = begin % e.m;
    while (begin < end) {
      // Tasks are sample-major: run to the end of this sample's entries (or the range).
      const int64_t stop = std::min(e.m, j + (end - begin));
      const in_t* a_b = a + b * v.a_batch;
      const in_t* d_b = d + b * v.d_batch;
      out_t* out_b = out + b * out_row;
      if (single) {
        for (int64_t k = j; k < stop; ++k) {
          out_b[out_entry[k]] = round_to<out_t, acc_t>(static_cast<acc_t>(a_b[a_entry[k]]) *
                                                       static_cast<acc_t>(d_b[d_entry[k]]));
        }
      } else {
        for (int64_t k = j; k < stop; ++k) {
          acc_t acc = 0;
          for (int64_t p0 = 0; p0 < v.positions[0]; ++p0) {
            for (int64_t p1 = 0; p1 < v.positions[1]; ++p1) {
              acc += dot<in_t, acc_t>(a_b + a_entry[k] + p0 * a_step[0] + p1 * a_step[1], a_step[2],
                                      d_b + d_entry[k] + p0 * v.d_space[0] + p1 * v.d_space[1], v.d_space[2],
                                      v.positions[2]);
            }
          }
          out_b[out_entry[k]] = round_to<out_t, acc_t>(acc);
        }
      }
      begin += stop - j;
      j = 0;
      ++b;
    }
  });
}

// Index checks on the host, before any memory is read with the indices: O(m).
void check_range(const char* op, const char* name, const int64_t* values, int64_t m, int64_t size) {
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK(values[j] >= 0 && values[j] < size, op, ": ", name, "[", j, "] = ", values[j], " is outside [0, ",
                size, ")");
  }
}

void check_out_columns(const char* op, const c10::optional<at::Tensor>& out_columns, const at::Tensor& out,
                       int64_t m) {
  if (out_columns.has_value()) check_range(op, "out_columns", out_columns->data_ptr<int64_t>(), m, out.size(1));
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

at::Tensor contiguous_index(const at::Tensor& t) { return t.contiguous(); }

void run(const char* op, const SampledView& v, const at::Tensor& a, const at::Tensor& d, const Entries& e,
         const at::Tensor& out) {
  if (e.m == 0 || v.batch == 0) return;
  dispatch_in_out(a.scalar_type(), out.scalar_type(), [&](auto* in_tag, auto* out_tag) {
    using in_t = std::remove_pointer_t<decltype(in_tag)>;
    using out_t = std::remove_pointer_t<decltype(out_tag)>;
    sampled_dots<in_t, out_t>(v, a.data_ptr<in_t>(), d.data_ptr<in_t>(), e, out.data_ptr<out_t>(), out.stride(0),
                              out.stride(1));
  });
}

void sampled_linear_grad_cpu(const at::Tensor& a, const at::Tensor& d, const at::Tensor& rows,
                             const at::Tensor& cols, const at::Tensor& out,
                             const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_linear_grad (CPU kernel)";
  const int64_t m = check_sampled_linear_args(a, d, rows, cols, out, out_columns);
  TORCH_CHECK(a.device().is_cpu(), op, ": expected CPU tensors, got ", a.device());
  const at::Tensor r = contiguous_index(rows), c = contiguous_index(cols);
  const c10::optional<at::Tensor> oc =
      out_columns.has_value() ? c10::optional<at::Tensor>(out_columns->contiguous()) : c10::nullopt;
  check_range(op, "rows", r.data_ptr<int64_t>(), m, d.size(2));
  check_range(op, "cols", c.data_ptr<int64_t>(), m, a.size(2));
  check_out_columns(op, oc, out, m);
  // Tokens become the (unit-stride) position axis: one transposed copy of each
  // activation, instead of every dot product striding over features.
  auto channels_first = [](const at::Tensor& t) {
    const at::Tensor tt = t.transpose(1, 2);
    return (t.size(1) > 1 && tt.stride(2) != 1) ? tt.contiguous() : tt;
  };
  const at::Tensor at_ = channels_first(a), dt = channels_first(d);
  const int64_t one[] = {1};
  const SampledView v = make_sampled_view(at_, dt, one, one);
  const Entries e{r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), nullptr, 1, m,
                  oc.has_value() ? oc->data_ptr<int64_t>() : nullptr};
  run(op, v, at_, dt, e, out);
}

void sampled_conv_grad_cpu(const at::Tensor& a_pad, const at::Tensor& d, const at::Tensor& out_channel,
                           const at::Tensor& in_channel, const at::Tensor& kernel_offsets, at::IntArrayRef stride,
                           at::IntArrayRef dilation, const at::Tensor& out,
                           const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_conv_grad (CPU kernel)";
  const int64_t m =
      check_sampled_conv_args(a_pad, d, out_channel, in_channel, kernel_offsets, stride, dilation, out, out_columns);
  TORCH_CHECK(a_pad.device().is_cpu(), op, ": expected CPU tensors, got ", a_pad.device());
  const at::Tensor o = contiguous_index(out_channel), c = contiguous_index(in_channel);
  const at::Tensor k = kernel_offsets.contiguous();
  const c10::optional<at::Tensor> oc =
      out_columns.has_value() ? c10::optional<at::Tensor>(out_columns->contiguous()) : c10::nullopt;
  check_range(op, "out_channel", o.data_ptr<int64_t>(), m, d.size(1));
  check_range(op, "in_channel", c.data_ptr<int64_t>(), m, a_pad.size(1));
  check_out_columns(op, oc, out, m);
  const int64_t nd = a_pad.dim() - 2;
  const int64_t* offsets = k.data_ptr<int64_t>();
  for (int64_t i = 0; i < nd; ++i) {
    const int64_t positions = d.size(2 + i);
    if (positions == 0) continue;  // empty output: nothing is read
    // The last position's read must stay inside a_pad for every entry's offset.
    const int64_t room = a_pad.size(2 + i) - 1 - (positions - 1) * stride[i];
    for (int64_t j = 0; j < m; ++j) {
      const int64_t off = offsets[j * nd + i];
      TORCH_CHECK(off >= 0 && off * dilation[i] <= room, op, ": kernel_offsets[", j, ", ", i, "] = ", off,
                  " reads outside a_pad (spatial size ", a_pad.size(2 + i), ", ", positions,
                  " output positions, stride ", stride[i], ", dilation ", dilation[i], ")");
    }
  }
  const SampledView v = make_sampled_view(a_pad, d, stride, dilation);
  const Entries e{o.data_ptr<int64_t>(), c.data_ptr<int64_t>(), offsets, nd, m,
                  oc.has_value() ? oc->data_ptr<int64_t>() : nullptr};
  run(op, v, a_pad, d, e, out);
}

template <typename in_t, typename out_t>
void embedding_dots(const int64_t* tokens, int64_t length, const in_t* d, int64_t d_b, int64_t d_t, int64_t d_e,
                    const int64_t* rows, const int64_t* cols, int64_t m, int64_t batch, int64_t padding,
                    bool has_padding, const int64_t* out_columns, out_t* out, int64_t out_row, int64_t out_col) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainWork / std::max<int64_t>(length, 1));
  at::parallel_for(0, batch * m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / m;
      const int64_t j = task % m;
      const int64_t row = rows[j];
      acc_t acc = 0;
      if (!(has_padding && row == padding)) {
        const int64_t* tok = tokens + b * length;
        const in_t* dcol = d + b * d_b + cols[j] * d_e;
        for (int64_t t = 0; t < length; ++t) {
          if (tok[t] == row) acc += static_cast<acc_t>(dcol[t * d_t]);
        }
      }
      const int64_t column = out_columns != nullptr ? out_columns[j] : j;
      out[b * out_row + column * out_col] = round_to<out_t, acc_t>(acc);
    }
  });
}

void sampled_embedding_grad_cpu(const at::Tensor& tokens, const at::Tensor& d, const at::Tensor& rows,
                                const at::Tensor& cols, c10::optional<int64_t> padding_idx, const at::Tensor& out,
                                const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_embedding_grad (CPU kernel)";
  const int64_t m = check_sampled_embedding_args(tokens, d, rows, cols, out, out_columns);
  TORCH_CHECK(d.device().is_cpu(), op, ": expected CPU tensors, got ", d.device());
  const at::Tensor r = contiguous_index(rows), c = contiguous_index(cols), tok = tokens.contiguous();
  const c10::optional<at::Tensor> oc =
      out_columns.has_value() ? c10::optional<at::Tensor>(out_columns->contiguous()) : c10::nullopt;
  // rows are compared with tokens, never used as an address: any value is safe.
  check_range(op, "cols", c.data_ptr<int64_t>(), m, d.size(2));
  check_out_columns(op, oc, out, m);
  if (m == 0 || d.size(0) == 0) return;
  dispatch_in_out(d.scalar_type(), out.scalar_type(), [&](auto* in_tag, auto* out_tag) {
    using in_t = std::remove_pointer_t<decltype(in_tag)>;
    using out_t = std::remove_pointer_t<decltype(out_tag)>;
    embedding_dots<in_t, out_t>(tok.data_ptr<int64_t>(), tok.size(1), d.data_ptr<in_t>(), d.stride(0), d.stride(1),
                                d.stride(2), r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), m, d.size(0),
                                padding_idx.value_or(0), padding_idx.has_value(),
                                oc.has_value() ? oc->data_ptr<int64_t>() : nullptr, out.data_ptr<out_t>(),
                                out.stride(0), out.stride(1));
  });
}

}  // namespace
}  // namespace tangent_kernels

TORCH_LIBRARY_IMPL(tangent_kernels, CPU, m) {
  m.impl("sampled_linear_grad", &tangent_kernels::sampled_linear_grad_cpu);
  m.impl("sampled_conv_grad", &tangent_kernels::sampled_conv_grad_cpu);
  m.impl("sampled_embedding_grad", &tangent_kernels::sampled_embedding_grad_cpu);
}
