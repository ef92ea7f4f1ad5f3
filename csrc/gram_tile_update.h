// Shared declarations for the gram_tile_update op: argument checks used by every
// device kernel (CPU in csrc/cpu, CUDA in csrc/cuda). The schema lives in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tangent_kernels {

// Validates K: [m, n] float32/float64, A: [m, d], B: [n, d] (same dtype, one of
// float16/bfloat16/float32/float64; float64 inputs need a float64 K), all on
// K's device, K without self-overlapping memory. Throws c10::Error (RuntimeError
// in Python) naming the offending argument and the fix.
void check_gram_tile_update_args(const at::Tensor& K, const at::Tensor& A, const at::Tensor& B);

// First column (exclusive end) a tile row may touch when `lower`: row r of the tile
// is global row row_offset + r and may update columns c with
// col_offset + c <= row_offset + r, i.e. c < row_offset - col_offset + r + 1.
// Clamped to [0, n].
inline int64_t lower_column_end(int64_t r, int64_t n, int64_t row_offset, int64_t col_offset) {
  const int64_t end = row_offset - col_offset + r + 1;
  return end < 0 ? 0 : (end > n ? n : end);
}

}  // namespace tangent_kernels
