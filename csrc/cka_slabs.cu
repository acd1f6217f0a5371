// The slab path of the CUDA backend: Gram tiles of all layers by one strided-batched cuBLASLt GEMM
// (bf16/fp16 inputs, fp32 accumulation and output; tf32 or fp32 for fp32 inputs), and a CUDA epilogue
// that turns the fp32 stage into kernel values and partial sums (element math: cka_slab_math.h).
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <unordered_map>

#include "cka_slab_math.h"
#include "cka_slabs.h"

namespace slm_fast {
namespace {

// One cuBLASLt handle per device, created on first use and kept for the process.
cublasLtHandle_t lt_handle(std::string& error) {
  static std::mutex mutex;
  static std::unordered_map<int, cublasLtHandle_t> handles;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    error = "cudaGetDevice failed";
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto found = handles.find(device);
  if (found != handles.end()) return found->second;
  cublasLtHandle_t handle = nullptr;
  const cublasStatus_t status = cublasLtCreate(&handle);
  if (status != CUBLAS_STATUS_SUCCESS) {
    error = std::string("cublasLtCreate: ") + cublasLtGetStatusString(status);
    return nullptr;
  }
  handles.emplace(device, handle);
  return handle;
}

cudaDataType_t data_type(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat16:
      return CUDA_R_16F;
    case ScalarKind::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

// Descriptors released at scope exit, whatever step failed.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;
  ~LtDescriptors() {
    if (preference) cublasLtMatmulPreferenceDestroy(preference);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// A column-major layout rows x cols with leading dimension ld, batched n_layers times `stride` apart.
cublasStatus_t batched_layout(cublasLtMatrixLayout_t* layout, cudaDataType_t type, int64_t rows, int64_t cols,
                              int64_t ld, int64_t n_layers, int64_t stride) {
  cublasStatus_t status = cublasLtMatrixLayoutCreate(layout, type, uint64_t(rows), uint64_t(cols), ld);
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  const int32_t batch = int32_t(n_layers);
  status = cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch));
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  return cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                          sizeof(stride));
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarpColumns / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Block (column block, row block, layer): thread t owns stage column blockIdx.x * kEpilogueThreads + t
// over the block's kEpilogueRows rows.
template <bool kRbf, bool kDiagonal, bool kColSums>
__global__ void __launch_bounds__(kEpilogueThreads) slab_epilogue_kernel(SlabEpilogueParams p) {
  const int64_t layer = blockIdx.z;
  const int64_t col = int64_t(blockIdx.x) * kEpilogueThreads + threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.y) * kEpilogueRows;
  const int64_t row1 = row0 + kEpilogueRows < p.n_i ? row0 + kEpilogueRows : p.n_i;
  const bool valid_col = col < p.n_j;
  float* stage = p.stage + layer * p.n_i * p.n_j;
  float scale = 0.0f, offset = 0.0f, norm_j = 0.0f;
  if (kRbf) {
    scale = p.scales[layer];
    offset = p.offsets[layer];
    norm_j = valid_col ? p.norm_j[layer * p.stride_norm_j + col] : 0.0f;
  }
  const int64_t warp_column = int64_t(blockIdx.x) * (kEpilogueThreads / kWarpColumns) + threadIdx.x / kWarpColumns;
  float* row_part = p.row_part + (layer * slab_warp_columns(p.n_j) + warp_column) * p.n_i;
  const bool lane0 = threadIdx.x % kWarpColumns == 0;
  float col_sum = 0.0f;
  for (int64_t row = row0; row < row1; ++row) {
    float value = 0.0f;
    if (valid_col) {
      float* entry = stage + row * p.n_j + col;
      value = *entry;
      if (kRbf) {
        const bool same = slab_same_token(kDiagonal, row, col, p.diagonal_shift);
        value = slab_rbf_value(value, p.norm_i[layer * p.stride_norm_i + row], norm_j, scale, same);
        *entry = value - offset;
      }
    }
    col_sum += value;
    const float row_sum = warp_sum(value);
    if (lane0) row_part[row] = row_sum;
  }
  if (kColSums && valid_col) p.col_part[(layer * slab_row_blocks(p.n_i) + blockIdx.y) * p.n_j + col] = col_sum;
}

template <bool kRbf, bool kDiagonal>
void launch_epilogue(const SlabEpilogueParams& p, dim3 grid, cudaStream_t stream) {
  if (p.col_sums) {
    slab_epilogue_kernel<kRbf, kDiagonal, true><<<grid, kEpilogueThreads, 0, stream>>>(p);
  } else {
    slab_epilogue_kernel<kRbf, kDiagonal, false><<<grid, kEpilogueThreads, 0, stream>>>(p);
  }
}

}  // namespace

std::string gram_slab(const GramSlabParams& p, cudaStream_t stream) {
  std::string error;
  cublasLtHandle_t handle = lt_handle(error);
  if (!handle) return error;
  // Row-major stage[n_i, n_j] = X Y^T is the column-major (n_j x n_i) product Y X^T: A = Y read as the
  // column-major d x n_j matrix, transposed; B = X as the column-major d x n_i matrix.
  const cudaDataType_t input = data_type(p.kind);
  const cublasComputeType_t compute = p.kind == ScalarKind::kFloat32 && p.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                             : CUBLAS_COMPUTE_32F;
  LtDescriptors desc;
  const cublasOperation_t transpose = CUBLAS_OP_T, none = CUBLAS_OP_N;
  cublasStatus_t status = cublasLtMatmulDescCreate(&desc.op, compute, CUDA_R_32F);
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose));
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &none, sizeof(none));
  if (status == CUBLAS_STATUS_SUCCESS)
    status = batched_layout(&desc.a, input, p.d, p.n_j, p.stride_y_row, p.n_layers, p.stride_y_layer);
  if (status == CUBLAS_STATUS_SUCCESS)
    status = batched_layout(&desc.b, input, p.d, p.n_i, p.stride_x_row, p.n_layers, p.stride_x_layer);
  if (status == CUBLAS_STATUS_SUCCESS)
    status = batched_layout(&desc.c, CUDA_R_32F, p.n_j, p.n_i, p.n_j, p.n_layers, p.n_i * p.n_j);
  if (status == CUBLAS_STATUS_SUCCESS) status = cublasLtMatmulPreferenceCreate(&desc.preference);
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulPreferenceSetAttribute(desc.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &p.workspace_bytes, sizeof(p.workspace_bytes));
  if (status != CUBLAS_STATUS_SUCCESS) return std::string("cuBLASLt set-up: ") + cublasLtGetStatusString(status);
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  status = cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.c, desc.c, desc.preference, 1,
                                          &heuristic, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
    return std::string("cuBLASLt has no algorithm for this GEMM: ") + cublasLtGetStatusString(status);
  }
  const float alpha = 1.0f, beta = 0.0f;
  status = cublasLtMatmul(handle, desc.op, &alpha, p.y, desc.a, p.x, desc.b, &beta, p.stage, desc.c, p.stage, desc.c,
                          &heuristic.algo, p.workspace, p.workspace_bytes, stream);
  if (status != CUBLAS_STATUS_SUCCESS) return std::string("cublasLtMatmul: ") + cublasLtGetStatusString(status);
  return {};
}

cudaError_t launch_slab_epilogue(const SlabEpilogueParams& p, cudaStream_t stream) {
  if (p.n_layers == 0 || p.n_i == 0 || p.n_j == 0) return cudaSuccess;
  const dim3 grid(unsigned(slab_column_blocks(p.n_j)), unsigned(slab_row_blocks(p.n_i)), unsigned(p.n_layers));
  if (p.rbf) {
    if (p.diagonal) {
      launch_epilogue<true, true>(p, grid, stream);
    } else {
      launch_epilogue<true, false>(p, grid, stream);
    }
  } else {
    launch_epilogue<false, false>(p, grid, stream);
  }
  return cudaGetLastError();
}

}  // namespace slm_fast
