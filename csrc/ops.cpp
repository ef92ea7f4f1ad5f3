// Op schemas of the tangent_kernels library, and the argument checks the device
// kernels share. Kernels are registered per device: csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA, compiled only when the build has CUDA). The Python side
// (tangent_kernels/ops.py) adds fake implementations and picks backends.

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "gram_tile_update.h"

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

}  // namespace tangent_kernels

TORCH_LIBRARY(tangent_kernels, m) {
  // K[r, c] += sum_k A[r, k] * B[c, k] for the tile K: [A.size(0), B.size(0)] (a
  // view into the full Gram, any strides). With `lower`, entries with global row
  // row_offset + r < global column col_offset + c are left untouched (only the lower
  // triangle of a symmetric Gram is computed). Accumulates in K's dtype.
  m.def(
      "gram_tile_update(Tensor(a!) K, Tensor A, Tensor B, int row_offset, int col_offset, bool lower) -> ()");
}
