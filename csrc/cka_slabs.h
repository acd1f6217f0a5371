// Launch interface of the slab path (csrc/cka_slabs.cu): the batched cuBLASLt Gram GEMM of a row slab
// and a column chunk for all layers, and the CUDA epilogue over its fp32 stage. Free of torch headers;
// the torch binding (csrc/cka_binding.cpp) fills these structs and slm_fast/kernels/slabs.py drives the
// slabs and chunks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "cka_tiles.h"

namespace slm_fast {

// stage[a] = x[a] @ y[a]^T (fp32 out, fp32 accumulation) for a < n_layers: x [n_i, d] and y [n_j, d]
// with unit stride along d, consecutive layers stride_*_layer elements apart; stage [L, n_i, n_j]
// contiguous. fp32 inputs use tf32 tensor cores when `tf32`, else full fp32.
struct GramSlabParams {
  const void* x;
  const void* y;
  float* stage;
  int64_t n_layers, n_i, n_j, d;
  int64_t stride_x_layer, stride_y_layer, stride_x_row, stride_y_row;
  ScalarKind kind;
  bool tf32;
  void* workspace;
  size_t workspace_bytes;
};

// Empty on success, else what failed (cuBLASLt status).
std::string gram_slab(const GramSlabParams& params, cudaStream_t stream);

// The epilogue over stage [L, n_i, n_j] (see cka_slab_math.h): RBF values from the Gram entries and the
// fp32 squared norms (norm_i[a * stride_norm_i + r], norm_j[a * stride_norm_j + c]) with per-layer
// scale = log2(e) gamma, written back as K - offsets[a]; linear: the stage is left as it is. Partial
// row sums [L, slab_warp_columns(n_j), n_i] and, when col_sums, column sums [L, slab_row_blocks(n_i), n_j]
// in fp32. diagonal: stage column c is the token of row c - diagonal_shift (its distance is 0).
struct SlabEpilogueParams {
  float* stage;
  const float* norm_i;
  const float* norm_j;
  const float* scales;
  const float* offsets;
  float* row_part;
  float* col_part;
  int64_t n_layers, n_i, n_j;
  int64_t stride_norm_i, stride_norm_j;
  int64_t diagonal_shift;
  bool rbf, diagonal, col_sums;
};

cudaError_t launch_slab_epilogue(const SlabEpilogueParams& params, cudaStream_t stream);

}  // namespace slm_fast
