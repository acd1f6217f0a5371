// Fused CKA tile kernels: one CUDA block of 4 warps per token tile pair (I, J) computes the 64 x 64
// Gram tile X[I] Y[J]^T over d in chunks of 32 (tensor-core WMMA for bf16/fp16 and tf32, FMA for
// ieee fp32; fp32 accumulation; two shared-memory stages fed through registers), stores it in
// shared memory, applies the kernel epilogue and writes only the tile's reductions: row and column
// partial sums and Frobenius products in float64 (see cka_tiles.h for the outputs, cka_tile_math.h
// for the epilogue and reduction math).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "cka_tile_math.h"
#include "cka_tiles.h"

namespace slm_fast {
namespace {

using namespace nvcuda;

constexpr int kBlockK = 32;  // d chunk per stage
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileLd = kBlock + 4;  // padded fp32 tile row (a multiple of 4 floats, as WMMA stores need)
constexpr int kTileBytes = kBlock * kTileLd * int(sizeof(float));

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() {
  return 0.0f;
}
template <>
__device__ __forceinline__ __half zero_value<__half>() {
  return __float2half(0.0f);
}
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() {
  return __float2bfloat16(0.0f);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Shared-memory stages of one d chunk: operand tiles [kBlock, kLd] of x rows and y rows, rows padded
// by one 16-byte vector (keeps WMMA's alignment and spreads banks).
template <typename T>
struct Stages {
  static constexpr int kVec = 16 / int(sizeof(T));
  static constexpr int kLd = kBlockK + kVec;
  static constexpr int kOperandElems = kBlock * kLd;
  static constexpr int kBytes = 2 * 2 * kOperandElems * int(sizeof(T));  // 2 stages x (x, y)

  T* base;
  __device__ T* x(int stage) const { return base + (2 * stage) * kOperandElems; }
  __device__ T* y(int stage) const { return base + (2 * stage + 1) * kOperandElems; }
};

// Global -> registers -> shared memory for one operand tile of one chunk, so that the next chunk's
// loads are in flight while the current one is multiplied. `vectorized`: 16-byte loads (d, the
// row stride and the base pointer are multiples of 16 bytes), else element loads; masked to zero
// outside the valid tokens and d.
template <typename T>
struct OperandLoader {
  static constexpr int kVec = Stages<T>::kVec;
  static constexpr int kPerThread = kBlock * kBlockK / kThreads;
  static constexpr int kVecsPerRow = kBlockK / kVec;
  alignas(16) T values[kPerThread];

  __device__ void fetch(const T* base, int64_t stride, int64_t row0, int64_t n_rows, int d, int k0,
                        bool vectorized) {
    if (vectorized) {
#pragma unroll
      for (int v = 0; v < kPerThread / kVec; ++v) {
        const int idx = threadIdx.x + v * kThreads;
        const int r = idx / kVecsPerRow, c = (idx % kVecsPerRow) * kVec;
        const int64_t row = row0 + r;
        uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
        if (row < n_rows && k0 + c < d) chunk = *reinterpret_cast<const uint4*>(base + row * stride + k0 + c);
        *reinterpret_cast<uint4*>(&values[v * kVec]) = chunk;
      }
    } else {
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int idx = threadIdx.x + e * kThreads;
        const int r = idx / kBlockK, c = idx % kBlockK;
        const int64_t row = row0 + r;
        values[e] = (row < n_rows && k0 + c < d) ? base[row * stride + k0 + c] : zero_value<T>();
      }
    }
  }

  __device__ void put(T* operand, bool vectorized) const {
    if (vectorized) {
#pragma unroll
      for (int v = 0; v < kPerThread / kVec; ++v) {
        const int idx = threadIdx.x + v * kThreads;
        const int r = idx / kVecsPerRow, c = (idx % kVecsPerRow) * kVec;
        *reinterpret_cast<uint4*>(operand + r * Stages<T>::kLd + c) = *reinterpret_cast<const uint4*>(&values[v * kVec]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int idx = threadIdx.x + e * kThreads;
        operand[(idx / kBlockK) * Stages<T>::kLd + idx % kBlockK] = values[e];
      }
    }
  }
};

// Tensor-core product for bf16/fp16: each warp owns a 32 x 32 quarter of the tile (2 x 2 fragments).
template <typename T>
struct WmmaMma {
  using Stage = Stages<T>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ void step(const T* x, const T* y, int warp_row, int warp_col) {
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], x + (warp_row + 16 * i) * Stage::kLd + kk, Stage::kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], y + (warp_col + 16 * j) * Stage::kLd + kk, Stage::kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ void store(float* tile, int warp_row, int warp_col) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(tile + (warp_row + 16 * i) * kTileLd + warp_col + 16 * j, acc[i][j], kTileLd,
                                wmma::mem_row_major);
  }
};

// Tensor-core product for fp32 inputs rounded to tf32 (torch's "tf32" matmul precision).
struct Tf32Mma {
  using Stage = Stages<float>;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ void step(const float* x, const float* y, int warp_row, int warp_col) {
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], x + (warp_row + 16 * i) * Stage::kLd + kk, Stage::kLd);
#pragma unroll
        for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], y + (warp_col + 16 * j) * Stage::kLd + kk, Stage::kLd);
#pragma unroll
        for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ void store(float* tile, int warp_row, int warp_col) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(tile + (warp_row + 16 * i) * kTileLd + warp_col + 16 * j, acc[i][j], kTileLd,
                                wmma::mem_row_major);
  }
};

// IEEE fp32 product on the FMA units: thread (tr, tc) of a 16 x 8 grid owns rows tr + 16 i and
// columns tc + 8 j (interleaved, so that a warp's shared-memory reads hit distinct banks).
struct SimtMma {
  using Stage = Stages<float>;
  float acc[4][8];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }

  __device__ void step(const float* x, const float* y, int, int) {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < kBlockK; ++kk) {
      float xv[4], yv[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = x[(tr + 16 * i) * Stage::kLd + kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) yv[j] = y[(tc + 8 * j) * Stage::kLd + kk];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(xv[i], yv[j], acc[i][j]);
    }
  }

  __device__ void store(float* tile, int, int) const {
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) tile[(tr + 16 * i) * kTileLd + tc + 8 * j] = acc[i][j];
  }
};

// The Gram tile X[g.row0 ..] Y[g.col0 ..]^T into `tile` (fp32, kTileLd), through `stages`. Ends with
// a barrier: the tile is complete and the stages are free.
template <typename T, typename Mma>
__device__ void gram_tile(const LayerArgs& layer, const TileGeometry& g, bool vectorized, const Stages<T>& stages,
                          float* tile) {
  const T* x = static_cast<const T*>(layer.x);
  const T* y = static_cast<const T*>(layer.y);
  const int warp = threadIdx.x / 32;
  const int warp_row = (warp / 2) * 32, warp_col = (warp % 2) * 32;
  OperandLoader<T> load_x, load_y;
  Mma mma;
  mma.zero();
  load_x.fetch(x, layer.stride_x, g.row0, g.n_rows, layer.d, 0, vectorized);
  load_y.fetch(y, layer.stride_y, g.col0, g.n_cols, layer.d, 0, vectorized);
  load_x.put(stages.x(0), vectorized);
  load_y.put(stages.y(0), vectorized);
  __syncthreads();
  const int n_chunks = (layer.d + kBlockK - 1) / kBlockK;
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    const int stage = chunk & 1;
    const bool more = chunk + 1 < n_chunks;
    if (more) {
      load_x.fetch(x, layer.stride_x, g.row0, g.n_rows, layer.d, (chunk + 1) * kBlockK, vectorized);
      load_y.fetch(y, layer.stride_y, g.col0, g.n_cols, layer.d, (chunk + 1) * kBlockK, vectorized);
    }
    mma.step(stages.x(stage), stages.y(stage), warp_row, warp_col);
    if (more) {
      load_x.put(stages.x(stage ^ 1), vectorized);
      load_y.put(stages.y(stage ^ 1), vectorized);
    }
    __syncthreads();
  }
  mma.store(tile, warp_row, warp_col);
  __syncthreads();
}

// The kernel tile of one layer in `tile`; ends with a barrier.
template <typename T, typename Mma>
__device__ void kernel_tile(const LayerArgs& layer, const TileGeometry& g, bool rbf, bool vectorized,
                            const Stages<T>& stages, float* tile, float (*norms)[kBlock]) {
  if (rbf) {  // visible to every thread after gram_tile's first barrier
    const int t = threadIdx.x % kBlock;
    if (threadIdx.x < kBlock) {
      norms[0][t] = g.row0 + t < g.n_rows ? layer.norm_x[g.row0 + t] : 0.0f;
    } else {
      norms[1][t] = g.col0 + t < g.n_cols ? layer.norm_y[g.col0 + t] : 0.0f;
    }
  }
  gram_tile<T, Mma>(layer, g, vectorized, stages, tile);
  apply_kernel(tile, kTileLd, kBlock, g, norms[0], norms[1], layer.gamma, rbf, threadIdx.x, kThreads);
  __syncthreads();
}

// Threads 0..63 write the row sums, threads 64..127 the column sums (not for a symmetric diagonal tile).
__device__ void write_tile_sums(const float* tile, const TileGeometry& g, double* row_part, double* col_part) {
  const int t = threadIdx.x % kBlock;
  if (threadIdx.x < kBlock) {
    row_part[t] = tile_row_sum(tile, kTileLd, kBlock, t);
  } else if (g.writes_col_sums()) {
    col_part[t] = tile_col_sum(tile, kTileLd, kBlock, t);
  }
}

__device__ double block_sum(double value, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

template <typename T, typename Mma>
__global__ void __launch_bounds__(kThreads) tile_pairs_kernel(TilePairsParams p, bool vectorized) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float norms[2][kBlock];
  __shared__ double scratch[kWarps];
  float* tile_a = reinterpret_cast<float*>(smem);
  const Stages<T> stages{reinterpret_cast<T*>(smem + kTileBytes)};
  float* tile_b = reinterpret_cast<float*>(smem + kTileBytes);  // b's tile reuses the stages after its Gram

  const int tile_i = p.tile_i[blockIdx.x], tile_j = p.tile_j[blockIdx.x];
  const TileGeometry g = tile_geometry(tile_i, tile_j, kBlock, p.n_rows, p.n_cols, p.symmetric);
  const int64_t local_i = tile_i - p.first_tile_i;
  const int64_t part_offset = local_i * p.stride_part_i + int64_t(tile_j) * p.stride_part_j;

  // Layer a, then layer b in the same loop body (one copy of the main loop in the binary).
  const int n_layers = p.two_layers ? 2 : 1;
  for (int layer = 0; layer < n_layers; ++layer) {
    float* tile = layer == 0 ? tile_a : tile_b;
    double* row_part = layer == 0 ? p.row_part_a : p.row_part_b;
    double* col_part = layer == 0 ? p.col_part_a : p.col_part_b;
    kernel_tile<T, Mma>(layer == 0 ? p.a : p.b, g, p.rbf, vectorized, stages, tile, norms);
    if (row_part != nullptr) write_tile_sums(tile, g, row_part + part_offset, col_part + part_offset);
    if (layer == 0 && p.staged != nullptr) {
      double* out = p.staged + int64_t(blockIdx.x) * p.stride_staged_t;
      for (int e = threadIdx.x; e < kBlock * kBlock; e += kThreads) out[e] = tile[(e / kBlock) * kTileLd + e % kBlock];
    }
  }
  if (p.frob != nullptr) {
    double products[3] = {0.0, 0.0, 0.0};
    accumulate_products(tile_a, p.two_layers ? tile_b : tile_a, kTileLd, kBlock, threadIdx.x, kThreads, products);
    double* out = p.frob + local_i * p.stride_frob_i + tile_j;
#pragma unroll
    for (int q = 0; q < 3; ++q) {
      if (q > 0 && !p.two_layers) break;
      const double total = block_sum(products[q], scratch);
      if (threadIdx.x == 0) out[q * p.stride_frob_q] = g.weight() * total;
    }
  }
}

template <typename T, typename Mma>
cudaError_t launch(const TilePairsParams& params, bool vectorized, cudaStream_t stream) {
  constexpr int kSmem = kTileBytes + (Stages<T>::kBytes > kTileBytes ? Stages<T>::kBytes : kTileBytes);
  if (params.n_tile_pairs == 0) return cudaSuccess;
  cudaError_t err =
      cudaFuncSetAttribute(tile_pairs_kernel<T, Mma>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  tile_pairs_kernel<T, Mma><<<params.n_tile_pairs, kThreads, kSmem, stream>>>(params, vectorized);
  return cudaGetLastError();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    squared_row_norms_kernel(const T* x, int64_t n_rows, int d, int64_t stride, float* out) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  float sum = 0.0f;
  for (int c = lane; c < d; c += 32) {
    const float v = to_float(x[row * stride + c]);
    sum = fmaf(v, v, sum);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (lane == 0) out[row] = sum;
}

template <typename T>
cudaError_t launch_norms(const void* x, int64_t n_rows, int d, int64_t stride, float* out, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  const int64_t blocks = (n_rows + kWarps - 1) / kWarps;
  squared_row_norms_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), n_rows, d, stride, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tile_pairs(const TilePairsParams& params, ScalarKind kind, bool vectorized, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat16:
      return launch<__half, WmmaMma<__half>>(params, vectorized, stream);
    case ScalarKind::kBFloat16:
      return launch<__nv_bfloat16, WmmaMma<__nv_bfloat16>>(params, vectorized, stream);
    case ScalarKind::kFloat32:
      return params.tf32 ? launch<float, Tf32Mma>(params, vectorized, stream)
                         : launch<float, SimtMma>(params, vectorized, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_squared_row_norms(const void* x, ScalarKind kind, int64_t n_rows, int d, int64_t stride,
                                     float* out, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat16:
      return launch_norms<__half>(x, n_rows, d, stride, out, stream);
    case ScalarKind::kBFloat16:
      return launch_norms<__nv_bfloat16>(x, n_rows, d, stride, out, stream);
    case ScalarKind::kFloat32:
      return launch_norms<float>(x, n_rows, d, stride, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace slm_fast
