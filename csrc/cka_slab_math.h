// Element math of the slab epilogue (csrc/cka_slabs.cu), written once for the device kernel and the
// host unit test (csrc/tests/test_tile_math.cpp). The slab path (slm_fast/kernels/slabs.py) computes
// the Gram tiles of all layers for a row slab and a column chunk by one batched cuBLASLt GEMM into a
// stage [L, n_i, n_j] of fp32; the epilogue turns each Gram entry into a kernel value, writes its
// partial row and column sums, and stores K - offset back for the Frobenius GEMM.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SLM_SLAB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SLM_SLAB_HOST_DEVICE inline
#endif

namespace slm_fast {

// Threads of one epilogue block: one stage column each, over kEpilogueRows rows. Row sums are reduced
// per warp (32 columns), column sums per block (kEpilogueRows rows).
constexpr int kEpilogueThreads = 256;
constexpr int kEpilogueRows = 32;
constexpr int kWarpColumns = 32;

// exp2(-scale * |x - y|^2), |x - y|^2 = |x|^2 + |y|^2 - 2 x.y clamped at 0 (exactly 0 for the same
// token); scale = log2(e) gamma.
SLM_SLAB_HOST_DEVICE float slab_rbf_value(float gram, float norm_i, float norm_j, float scale, bool same_token) {
  float dist = norm_i + norm_j - 2.0f * gram;
  dist = (same_token || dist < 0.0f) ? 0.0f : dist;
  return exp2f(-scale * dist);
}

// Stage column j holds the token of stage row j - diagonal_shift (diagonal chunks of the symmetric case).
SLM_SLAB_HOST_DEVICE bool slab_same_token(bool diagonal, int64_t row, int64_t col, int64_t diagonal_shift) {
  return diagonal && row + diagonal_shift == col;
}

// Layout of the partial sums: row partials [L, n_warp_columns, n_i] (one per warp of 32 columns),
// column partials [L, n_row_blocks, n_j] (one per block of kEpilogueRows rows).
SLM_SLAB_HOST_DEVICE int64_t slab_column_blocks(int64_t n_j) {
  return (n_j + kEpilogueThreads - 1) / kEpilogueThreads;
}
SLM_SLAB_HOST_DEVICE int64_t slab_warp_columns(int64_t n_j) {
  return slab_column_blocks(n_j) * (kEpilogueThreads / kWarpColumns);
}
SLM_SLAB_HOST_DEVICE int64_t slab_row_blocks(int64_t n_i) { return (n_i + kEpilogueRows - 1) / kEpilogueRows; }

}  // namespace slm_fast
