// Launch interface of the fused CKA tile kernels (csrc/cka_tiles.cu), free of torch headers so that
// the kernels compile with plain nvcc; the torch binding (csrc/cka_binding.cpp) fills these structs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace slm_fast {

enum class ScalarKind { kFloat32, kFloat16, kBFloat16 };

// One layer's operands: K[i, j] = k(x_i, y_j), x rows [n_rows, d] and y rows [n_cols, d] (unit
// stride along d), squared row norms (fp32, RBF only, else null).
struct LayerArgs {
  const void* x;
  const void* y;
  const float* norm_x;
  const float* norm_y;
  int64_t stride_x, stride_y;  // elements between consecutive tokens
  int d;
  float gamma;
};

// One launch over a table of tile pairs (one CUDA block each); see tile_pairs_kernel.
struct TilePairsParams {
  const int32_t* tile_i;
  const int32_t* tile_j;
  int n_tile_pairs;
  int first_tile_i;  // partial buffers are indexed by I - first_tile_i
  int64_t n_rows, n_cols;
  LayerArgs a, b;
  bool rbf, symmetric, two_layers, tf32;
  // Partial row/column sums [I - first_tile_i, J, kBlock] (float64); null: not written.
  double* row_part_a;
  double* col_part_a;
  double* row_part_b;
  double* col_part_b;
  int64_t stride_part_i, stride_part_j;
  // Frobenius products (aa, ab, bb) [q, I - first_tile_i, J] (float64); null: not written.
  double* frob;
  int64_t stride_frob_q, stride_frob_i;
  // Kernel tile of layer a per tile pair [t, kBlock * kBlock] (float64); null: not written.
  double* staged;
  int64_t stride_staged_t;
};

cudaError_t launch_tile_pairs(const TilePairsParams& params, ScalarKind kind, bool vectorized, cudaStream_t stream);

// out[i] = |x_i|^2 in fp32 for x [n_rows, d] with row stride `stride`.
cudaError_t launch_squared_row_norms(const void* x, ScalarKind kind, int64_t n_rows, int d, int64_t stride,
                                     float* out, cudaStream_t stream);

}  // namespace slm_fast
