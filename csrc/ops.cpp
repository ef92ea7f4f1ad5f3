// Op schemas of the tangent_kernels library, and the argument checks the device
// kernels share. Kernels are registered per device: csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA, compiled only when the build has CUDA). The Python side
// (tangent_kernels/ops.py) adds fake implementations and picks backends.

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "gram_tile_update.h"
#include "sampled_grad.h"

#ifdef TANGENT_KERNELS_PYTHON_MODULE
// setup.py builds this file into the Python module tangent_kernels._C, whose only
// job is to run the registrations below when imported (as in pytorch/extension-cpp).
// The CMake build (a plain shared library) leaves this out and needs no Python.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Registers the tangent_kernels::* ops with the PyTorch dispatcher.",  // doc
      -1,    // size of per-interpreter state (none)
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
#endif

namespace tangent_kernels {

namespace {

bool is_input_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

}  // namespace

void check_gram_tile_update_args(const at::Tensor& K, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(K.dim() == 2, "gram_tile_update: K must be 2-D [m, n], got ", K.dim(), "-D shape ", K.sizes());
  TORCH_CHECK(A.dim() == 2, "gram_tile_update: A must be 2-D [m, d], got ", A.dim(), "-D shape ", A.sizes());
  TORCH_CHECK(B.dim() == 2, "gram_tile_update: B must be 2-D [n, d], got ", B.dim(), "-D shape ", B.sizes());
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "gram_tile_update: A and B must have the same dtype, got A ",
              A.scalar_type(), " and B ", B.scalar_type(), "; cast one of them");
  TORCH_CHECK(is_input_dtype(A.scalar_type()), "gram_tile_update: A and B must be float16, bfloat16, float32 or ",
              "float64, got ", A.scalar_type());
  TORCH_CHECK(K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble,
              "gram_tile_update: K must be float32 or float64 (the accumulation dtype), got ", K.scalar_type());
  TORCH_CHECK(!(A.scalar_type() == at::kDouble && K.scalar_type() != at::kDouble),
              "gram_tile_update: float64 inputs need a float64 K (accumulating them in ", K.scalar_type(),
              " would lose their precision), got K ", K.scalar_type());
  TORCH_CHECK(A.size(1) == B.size(1), "gram_tile_update: A [m, d] and B [n, d] must have the same d, got A ",
              A.sizes(), " and B ", B.sizes());
  TORCH_CHECK(K.size(0) == A.size(0) && K.size(1) == B.size(0), "gram_tile_update: K must have shape [A.size(0), ",
              "B.size(0)] = [", A.size(0), ", ", B.size(0), "], got ", K.sizes());
  TORCH_CHECK(A.device() == K.device() && B.device() == K.device(),
              "gram_tile_update: K, A and B must be on the same device, got K on ", K.device(), ", A on ",
              A.device(), ", B on ", B.device());
  TORCH_CHECK(at::has_internal_overlap(K) != at::MemOverlap::Yes,
              "gram_tile_update: K has self-overlapping memory (an expanded or stride-0 view) and cannot be ",
              "updated in place; pass K.contiguous() or a view of a real matrix");
}


namespace {

void check_index(const char* op, const char* name, const at::Tensor& t, int64_t m, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be an int64 tensor, got ", t.scalar_type(),
              "; use .long()");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == m, op, ": ", name, " must be 1-D of length m = ", m, " (one entry per ",
              "sampled weight entry), got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other tensors, got ",
              t.device());
}

// out: [B, N] floating, on `device`, written at out_columns (or its first m columns).
void check_out(const char* op, const at::Tensor& out, int64_t batch, int64_t m,
               const c10::optional<at::Tensor>& out_columns, const at::Device& device) {
  TORCH_CHECK(out.dim() == 2, op, ": out must be 2-D [B, N] (the feature block), got shape ", out.sizes());
  TORCH_CHECK(is_input_dtype(out.scalar_type()), op, ": out must be float16, bfloat16, float32 or float64, got ",
              out.scalar_type());
  TORCH_CHECK(out.size(0) == batch, op, ": out must have one row per sample (", batch, "), got shape ",
              out.sizes());
  TORCH_CHECK(out.device() == device, op, ": out must be on ", device, " like the inputs, got ", out.device());
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": out has self-overlapping memory (an ",
              "expanded view) and cannot be written in place; pass a view of a real matrix");
  if (out_columns.has_value()) {
    check_index(op, "out_columns", *out_columns, m, device);
  } else {
    TORCH_CHECK(out.size(1) >= m, op, ": without out_columns, out needs at least m = ", m,
                " columns, got shape ", out.sizes());
  }
}

void check_floats(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& d) {
  TORCH_CHECK(a.scalar_type() == d.scalar_type(), op, ": ", a_name, " and d must have the same dtype, got ",
              a.scalar_type(), " and ", d.scalar_type(), "; cast one of them");
  TORCH_CHECK(is_input_dtype(d.scalar_type()), op, ": ", a_name, " and d must be float16, bfloat16, float32 or ",
              "float64, got ", d.scalar_type());
  TORCH_CHECK(a.device() == d.device(), op, ": ", a_name, " and d must be on one device, got ", a.device(),
              " and ", d.device());
}

}  // namespace

int64_t check_sampled_linear_args(const at::Tensor& a, const at::Tensor& d, const at::Tensor& rows,
                                  const at::Tensor& cols, const at::Tensor& out,
                                  const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_linear_grad";
  TORCH_CHECK(a.dim() == 3 && d.dim() == 3, op, ": a and d must be 3-D [B, T, in] and [B, T, out] (flatten the ",
              "token dims into T), got ", a.sizes(), " and ", d.sizes());
  TORCH_CHECK(a.size(0) == d.size(0) && a.size(1) == d.size(1), op, ": a [B, T, in] and d [B, T, out] must ",
              "agree on B and T, got ", a.sizes(), " and ", d.sizes());
  check_floats(op, a, "a", d);
  const int64_t m = rows.dim() == 1 ? rows.size(0) : -1;
  check_index(op, "rows", rows, m, a.device());
  check_index(op, "cols", cols, m, a.device());
  check_out(op, out, a.size(0), m, out_columns, a.device());
  return m;
}

int64_t check_sampled_conv_args(const at::Tensor& a_pad, const at::Tensor& d, const at::Tensor& out_channel,
                                const at::Tensor& in_channel, const at::Tensor& kernel_offsets,
                                at::IntArrayRef stride, at::IntArrayRef dilation, const at::Tensor& out,
                                const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_conv_grad";
  const int64_t nd = a_pad.dim() - 2;
  TORCH_CHECK(nd >= 1 && nd <= kMaxSpatial, op, ": a_pad must be [B, C, *spatial] with 1 to 3 spatial dims, got ",
              a_pad.sizes());
  TORCH_CHECK(d.dim() == a_pad.dim() && d.size(0) == a_pad.size(0), op, ": d must be [B, O, *out] with a_pad's B ",
              "and number of dims, got a_pad ", a_pad.sizes(), " and d ", d.sizes());
  check_floats(op, a_pad, "a_pad", d);
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == nd && static_cast<int64_t>(dilation.size()) == nd, op,
              ": stride and dilation need one value per spatial dim (", nd, "), got ", stride, " and ", dilation);
  for (int64_t i = 0; i < nd; ++i) {
    TORCH_CHECK(stride[i] >= 1 && dilation[i] >= 1, op, ": stride and dilation must be >= 1, got ", stride,
                " and ", dilation);
  }
  const int64_t m = out_channel.dim() == 1 ? out_channel.size(0) : -1;
  check_index(op, "out_channel", out_channel, m, a_pad.device());
  check_index(op, "in_channel", in_channel, m, a_pad.device());
  TORCH_CHECK(kernel_offsets.scalar_type() == at::kLong && kernel_offsets.dim() == 2 &&
                  kernel_offsets.size(0) == m && kernel_offsets.size(1) == nd,
              op, ": kernel_offsets must be int64 [m, ", nd, "] (one kernel position per entry), got ",
              kernel_offsets.scalar_type(), " ", kernel_offsets.sizes());
  TORCH_CHECK(kernel_offsets.device() == a_pad.device(), op, ": kernel_offsets must be on ", a_pad.device());
  check_out(op, out, a_pad.size(0), m, out_columns, a_pad.device());
  return m;
}

int64_t check_sampled_embedding_args(const at::Tensor& tokens, const at::Tensor& d, const at::Tensor& rows,
                                     const at::Tensor& cols, const at::Tensor& out,
                                     const c10::optional<at::Tensor>& out_columns) {
  const char* op = "sampled_embedding_grad";
  TORCH_CHECK(tokens.dim() == 2 && d.dim() == 3, op, ": tokens must be [B, T] and d [B, T, E], got ",
              tokens.sizes(), " and ", d.sizes());
  TORCH_CHECK(tokens.size(0) == d.size(0) && tokens.size(1) == d.size(1), op, ": tokens [B, T] and d [B, T, E] ",
              "must agree on B and T, got ", tokens.sizes(), " and ", d.sizes());
  TORCH_CHECK(tokens.scalar_type() == at::kLong, op, ": tokens must be int64, got ", tokens.scalar_type(),
              "; use .long()");
  TORCH_CHECK(is_input_dtype(d.scalar_type()), op, ": d must be float16, bfloat16, float32 or float64, got ",
              d.scalar_type());
  TORCH_CHECK(tokens.device() == d.device(), op, ": tokens and d must be on one device, got ", tokens.device(),
              " and ", d.device());
  const int64_t m = rows.dim() == 1 ? rows.size(0) : -1;
  check_index(op, "rows", rows, m, d.device());
  check_index(op, "cols", cols, m, d.device());
  check_out(op, out, d.size(0), m, out_columns, d.device());
  return m;
}

SampledView make_sampled_view(const at::Tensor& a, const at::Tensor& d, at::IntArrayRef stride,
                              at::IntArrayRef dilation) {
  SampledView v;
  const int64_t nd = a.dim() - 2;
  const int64_t pad = kMaxSpatial - nd;  // leading size-1 dims
  v.batch = a.size(0);
  v.a_batch = a.stride(0);
  v.a_channel = a.stride(1);
  v.d_batch = d.stride(0);
  v.d_channel = d.stride(1);
  v.a_channels = a.size(1);
  v.d_channels = d.size(1);
  for (int64_t i = 0; i < nd; ++i) {
    v.positions[pad + i] = d.size(2 + i);
    v.a_space[pad + i] = a.stride(2 + i);
    v.d_space[pad + i] = d.stride(2 + i);
    v.a_extent[pad + i] = a.size(2 + i);
    v.stride[pad + i] = stride[i];
    v.dilation[pad + i] = dilation[i];
  }
  return v;
}

}  // namespace tangent_kernels

TORCH_LIBRARY(tangent_kernels, m) {
  // K[r, c] += sum_k A[r, k] * B[c, k] for the tile K: [A.size(0), B.size(0)] (a
  // view into the full Gram, any strides). With `lower`, entries with global row
  // row_offset + r < global column col_offset + c are left untouched (only the lower
  // triangle of a symmetric Gram is computed). Accumulates in K's dtype.
  m.def(
      "gram_tile_update(Tensor(a!) K, Tensor A, Tensor B, int row_offset, int col_offset, bool lower) -> ()");
  // The sampled per-sample weight gradients (csrc/sampled_grad.h): for every sample b
  // and sampled entry j, out[b, out_columns[j]] (out[b, j] without out_columns) =
  //   linear:    sum_t d[b, t, rows[j]] * a[b, t, cols[j]]            a: [B, T, I], d: [B, T, O]
  //   conv:      sum_p d[b, out_channel[j], p] * a_pad[b, in_channel[j], p * stride + kernel_offsets[j] * dilation]
  //   embedding: sum_t [tokens[b, t] == rows[j] != padding_idx] * d[b, t, cols[j]]
  // Accumulated in float32 (float64 for float64 inputs), rounded once into out's dtype.
  // Distinct out_columns are the caller's duty (a repeated column gets one of its values).
  m.def(
      "sampled_linear_grad(Tensor a, Tensor d, Tensor rows, Tensor cols, Tensor(a!) out, "
      "Tensor? out_columns) -> ()");
  m.def(
      "sampled_conv_grad(Tensor a_pad, Tensor d, Tensor out_channel, Tensor in_channel, Tensor kernel_offsets, "
      "int[] stride, int[] dilation, Tensor(a!) out, Tensor? out_columns) -> ()");
  m.def(
      "sampled_embedding_grad(Tensor tokens, Tensor d, Tensor rows, Tensor cols, int? padding_idx, "
      "Tensor(a!) out, Tensor? out_columns) -> ()");
}
