// CPU kernel of tangent_kernels::gram_tile_update: K[r, c] += <A[r], B[c]> on a
// (possibly strided) tile of a Gram matrix, optionally only on/below the global diagonal.
//
// The products go through at::mm (BLAS) in K's dtype, panel by panel: a panel of up
// to ~kPanelBytes of K's rows is computed into a scratch buffer P, then added into K
// by a plain loop that touches only the allowed entries, so masked entries stay
// bit-identical (adding a masked-out 0 would turn -0.0 into +0.0). With `lower`, a
// panel is split into blocks of kRowBlock rows and each block's GEMM stops at its
// last row's diagonal, which skips almost all of the upper triangle.
//
// 16-bit inputs (and float32 inputs with a float64 K) are upcast chunk by chunk
// along d, never as a whole: d can be ~1e6, and a full float32 copy of A would be
// larger than A itself. Each chunk of A and B is converted once per panel (usually
// once in all) and feeds every block GEMM of the panel.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../gram_tile_update.h"

namespace tangent_kernels {
namespace {

// Rows per block when `lower`: large enough for BLAS to run near peak, small enough
// that the triangle a diagonal block computes and then discards (<= kRowBlock^2 / 2
// entries) stays a small share of the tile.
constexpr int64_t kRowBlock = 256;
// Scratch product per panel: at most this many bytes (rounded to whole blocks).
constexpr int64_t kPanelBytes = int64_t{64} << 20;
// Upcast chunks along d: at most this many bytes of upcast A and B rows at once,
// and at most kMaxCastCols columns (each GEMM still has a long inner dimension).
constexpr int64_t kCastChunkBytes = int64_t{16} << 20;
constexpr int64_t kMaxCastCols = 4096;
constexpr int64_t kMinCastCols = 64;

// K[r0 + i, c] += P[i, c] for the block's rows i < rows and the columns the mask
// allows (c < cols, and c on/below the global diagonal when `lower`).
template <typename acc_t>
void add_allowed(const at::Tensor& K, const at::Tensor& P, int64_t r0, int64_t rows, int64_t cols, bool lower,
                 int64_t row_offset, int64_t col_offset) {
  acc_t* const k = K.data_ptr<acc_t>();
  const acc_t* const p = P.data_ptr<acc_t>();  // contiguous [rows, cols]
  const int64_t ks0 = K.stride(0);
  const int64_t ks1 = K.stride(1);
  // ~32k additions per task: enough work to amortize waking a thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = r0 + i;
      const int64_t c_end = lower ? lower_column_end(r, cols, row_offset, col_offset) : cols;
      acc_t* const krow = k + r * ks0;
      const acc_t* const prow = p + i * cols;
      if (ks1 == 1) {
        for (int64_t c = 0; c < c_end; ++c) krow[c] += prow[c];
      } else {
        for (int64_t c = 0; c < c_end; ++c) krow[c * ks1] += prow[c];
      }
    }
  });
}

// One GEMM of a panel: rows [r0, r0 + rows) of the panel against columns [0, cols).
struct Block {
  int64_t r0, rows, cols;
};

void gram_tile_update_cpu(const at::Tensor& K, const at::Tensor& A, const at::Tensor& B, int64_t row_offset,
                          int64_t col_offset, bool lower) {
  check_gram_tile_update_args(K, A, B);
  TORCH_CHECK(K.device().is_cpu(), "gram_tile_update (CPU kernel): expected CPU tensors, got K on ", K.device());
  const int64_t m = A.size(0);
  const int64_t n = B.size(0);
  const int64_t d = A.size(1);
  if (m == 0 || n == 0 || d == 0) return;  // nothing to add (d == 0: every dot product is empty)

  const at::ScalarType acc = K.scalar_type();
  const int64_t acc_size = static_cast<int64_t>(c10::elementSize(acc));
  const bool upcast = A.scalar_type() != acc;
  const int64_t panel_blocks = std::max<int64_t>(1, kPanelBytes / (kRowBlock * n * acc_size));
  const int64_t panel_rows = std::min(m, panel_blocks * kRowBlock);
  at::Tensor scratch = at::empty({panel_rows * n}, K.options());

  std::vector<Block> blocks;
  for (int64_t p0 = 0; p0 < m; p0 += panel_rows) {
    const int64_t prows = std::min(panel_rows, m - p0);
    // The block GEMMs: one for the whole panel, or with `lower` one per kRowBlock rows,
    // each up to its last row's diagonal (later blocks reach further right, so a block
    // with no columns is skipped, not the end).
    blocks.clear();
    const int64_t step = lower ? kRowBlock : prows;
    for (int64_t r0 = 0; r0 < prows; r0 += step) {
      const int64_t rows = std::min(step, prows - r0);
      const int64_t cols = lower ? lower_column_end(p0 + r0 + rows - 1, n, row_offset, col_offset) : n;
      if (cols > 0) blocks.push_back({r0, rows, cols});
    }
    if (blocks.empty()) continue;
    const int64_t pcols = blocks.back().cols;  // the widest block is the last one
    // P: [prows, pcols] in K's dtype; a block writes P[r0:r0+rows, :cols] (ld = pcols).
    at::Tensor P = scratch.narrow(0, 0, prows * pcols).view({prows, pcols});
    auto block_out = [&](const Block& blk) { return P.narrow(0, blk.r0, blk.rows).narrow(1, 0, blk.cols); };
    const at::Tensor a_panel = A.narrow(0, p0, prows);
    const at::Tensor b_panel = B.narrow(0, 0, pcols);
    if (!upcast) {
      for (const Block& blk : blocks) {
        at::Tensor out = block_out(blk);
        at::mm_out(out, a_panel.narrow(0, blk.r0, blk.rows), b_panel.narrow(0, 0, blk.cols).t());
      }
    } else {
      const int64_t budget = kCastChunkBytes / ((prows + pcols) * acc_size);
      const int64_t chunk = std::clamp(budget, kMinCastCols, kMaxCastCols);
      for (int64_t k0 = 0; k0 < d; k0 += chunk) {
        const int64_t kc = std::min(chunk, d - k0);
        const at::Tensor a = a_panel.narrow(1, k0, kc).to(acc);
        const at::Tensor b = b_panel.narrow(1, k0, kc).to(acc);
        for (const Block& blk : blocks) {
          at::Tensor out = block_out(blk);
          const at::Tensor a_blk = a.narrow(0, blk.r0, blk.rows);
          const at::Tensor b_blk_t = b.narrow(0, 0, blk.cols).t();
          if (k0 == 0) {
            at::mm_out(out, a_blk, b_blk_t);
          } else {
            out.addmm_(a_blk, b_blk_t);
          }
        }
      }
    }
    // Rows before the first block (skipped: no allowed column) add nothing.
    const int64_t first = blocks.front().r0;
    AT_DISPATCH_FLOATING_TYPES(acc, "gram_tile_update_cpu", [&] {
      add_allowed<scalar_t>(K, P.narrow(0, first, prows - first), p0 + first, prows - first, pcols, lower,
                            row_offset, col_offset);
    });
  }
}

}  // namespace
}  // namespace tangent_kernels

TORCH_LIBRARY_IMPL(tangent_kernels, CPU, m) {
  m.impl("gram_tile_update", &tangent_kernels::gram_tile_update_cpu);
}
