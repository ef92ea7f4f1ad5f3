// CUDA kernel of tangent_kernels::gram_tile_update: K[r, c] += <A[r], B[c]> on a
// (possibly strided) tile of a Gram matrix, optionally only on/below the global diagonal.
//
// A plain shared-memory tiled GEMM, written to be right by construction rather than
// fast: each thread block owns a kTile x kTile tile of K, stages kTileK-wide slices of
// A and B through shared memory (converted to the accumulation type on load), and
// each thread accumulates a kPerThread x kPerThread micro-tile in registers. Every
// element of K is owned by exactly one thread, so the final read-add-write needs no
// atomics. Accumulation is in K's dtype (float, or double for a float64 K).
//
// With `lower`, thread blocks whose whole tile lies above the global diagonal return
// before loading anything; blocks on the diagonal mask per element at the store.
//
// Validated on an H100 (tests/test_gram_tile_update.py's gpu tests); not yet timed
// against cuBLAS, so backend="auto" uses cuBLAS through torch for CUDA tensors.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../gram_tile_update.h"

namespace tangent_kernels {
namespace {

constexpr int kTile = 64;       // rows (of A) and columns (rows of B) per thread block
constexpr int kTileK = 16;      // slice of the inner dimension staged per step
constexpr int kThreadsDim = 16; // 16 x 16 threads
constexpr int kThreads = kThreadsDim * kThreadsDim;
constexpr int kPerThread = kTile / kThreadsDim;  // 4 x 4 outputs per thread
static_assert(kTile % kThreadsDim == 0, "tile must split evenly over the threads");

// 16-bit types convert to float first (their only conversion operator); other types
// convert directly.
template <typename T>
struct Widened {
  using type = T;
};
template <>
struct Widened<c10::Half> {
  using type = float;
};
template <>
struct Widened<c10::BFloat16> {
  using type = float;
};

template <typename acc_t, typename in_t>
__device__ __forceinline__ acc_t widen(in_t x) {
  return static_cast<acc_t>(static_cast<typename Widened<in_t>::type>(x));
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) gram_tile_update_kernel(
    // output tile K: [M, N], strides in elements
    acc_t* __restrict__ K, int64_t k_s0, int64_t k_s1,
    // A: [M, D], B: [N, D], strides in elements
    const in_t* __restrict__ A, int64_t a_s0, int64_t a_s1,
    const in_t* __restrict__ B, int64_t b_s0, int64_t b_s1,
    // sizes
    int64_t M, int64_t N, int64_t D,
    // position of the tile in the full Gram, for the `lower` mask
    int64_t row_offset, int64_t col_offset, bool lower) {
  // +1 column of padding: the staging stores below walk the first index fastest.
  __shared__ acc_t As[kTileK][kTile + 1];
  __shared__ acc_t Bs[kTileK][kTile + 1];

  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (lower) {
    // Whole tile above the diagonal: even its last row's global index is below its
    // first column's. The condition is the same for every thread of the block, so
    // returning here (before any barrier) is safe.
    const int64_t last_row = (m0 + kTile < M ? m0 + kTile : M) - 1;
    if (row_offset + last_row < col_offset + n0) return;
  }

  const int tx = static_cast<int>(threadIdx.x) % kThreadsDim;  // column within the micro-tile grid
  const int ty = static_cast<int>(threadIdx.x) / kThreadsDim;  // row within the micro-tile grid

  acc_t acc[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = acc_t(0);
  }

  for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
    // Stage A[m0:m0+kTile, k0:k0+kTileK] and B[n0:n0+kTile, k0:k0+kTileK], transposed
    // into [k][row], zero-filled outside the matrices. Consecutive threads read
    // consecutive k (contiguous when the inner stride is 1).
    for (int e = static_cast<int>(threadIdx.x); e < kTile * kTileK; e += kThreads) {
      const int r = e / kTileK;
      const int kk = e % kTileK;
      const int64_t gk = k0 + kk;
      const int64_t ga = m0 + r;
      const int64_t gb = n0 + r;
      As[kk][r] = (ga < M && gk < D) ? widen<acc_t>(A[ga * a_s0 + gk * a_s1]) : acc_t(0);
      Bs[kk][r] = (gb < N && gk < D) ? widen<acc_t>(B[gb * b_s0 + gk * b_s1]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t a[kPerThread];
      acc_t b[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) a[i] = As[kk][ty + i * kThreadsDim];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) b[j] = Bs[kk][tx + j * kThreadsDim];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();  // before the next step overwrites the staged slices
  }

  // Thread (ty, tx) owns rows m0 + ty + i * 16 and columns n0 + tx + j * 16:
  // neighbouring threads write neighbouring columns.
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t r = m0 + ty + i * kThreadsDim;
    if (r >= M) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t c = n0 + tx + j * kThreadsDim;
      if (c >= N) continue;
      if (lower && row_offset + r < col_offset + c) continue;  // above the diagonal: untouched
      K[r * k_s0 + c * k_s1] += acc[i][j];
    }
  }
}

template <typename in_t, typename acc_t>
void launch(const at::Tensor& K, const at::Tensor& A, const at::Tensor& B, int64_t row_offset, int64_t col_offset,
            bool lower) {
  const int64_t M = A.size(0);
  const int64_t N = B.size(0);
  const int64_t D = A.size(1);
  const int64_t row_tiles = (M + kTile - 1) / kTile;
  const int64_t col_tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(row_tiles <= 65535, "gram_tile_update (CUDA): A has ", M, " rows; at most ", int64_t{65535} * kTile,
              " per call (split the tile)");
  TORCH_CHECK(col_tiles <= 65535, "gram_tile_update (CUDA): B has ", N, " rows; at most ", int64_t{65535} * kTile,
              " per call (split the tile)");
  const dim3 grid(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(row_tiles));
  const dim3 block(kThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(K.device().index()).stream();
  gram_tile_update_kernel<in_t, acc_t><<<grid, block, 0, stream>>>(
      K.data_ptr<acc_t>(), K.stride(0), K.stride(1),
      A.data_ptr<in_t>(), A.stride(0), A.stride(1),
      B.data_ptr<in_t>(), B.stride(0), B.stride(1),
      M, N, D, row_offset, col_offset, lower);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gram_tile_update_cuda(const at::Tensor& K, const at::Tensor& A, const at::Tensor& B, int64_t row_offset,
                           int64_t col_offset, bool lower) {
  check_gram_tile_update_args(K, A, B);
  TORCH_CHECK(K.device().is_cuda(), "gram_tile_update (CUDA kernel): expected CUDA tensors, got K on ", K.device());
  if (A.size(0) == 0 || B.size(0) == 0 || A.size(1) == 0) return;  // nothing to add; a 0-size grid is invalid
  const c10::cuda::CUDAGuard device_guard(K.device());
  const bool k_double = K.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gram_tile_update_cuda", [&] {
    using in_t = scalar_t;
    if constexpr (std::is_same_v<in_t, double>) {
      launch<double, double>(K, A, B, row_offset, col_offset, lower);  // the checks made K float64
    } else if (k_double) {
      launch<in_t, double>(K, A, B, row_offset, col_offset, lower);
    } else {
      launch<in_t, float>(K, A, B, row_offset, col_offset, lower);
    }
  });
}

}  // namespace
}  // namespace tangent_kernels

TORCH_LIBRARY_IMPL(tangent_kernels, CUDA, m) {
  m.impl("gram_tile_update", &tangent_kernels::gram_tile_update_cuda);
}
