// Tile math of the fused CKA kernel-sums kernels, written once for the device (csrc/cka_tiles.cu),
// the host-side planning (csrc/cka_binding.cpp) and the host unit test (csrc/tests/test_tile_math.cpp).
//
// A tile is the B x B block of K[i, j] = k(x_i, y_j) for row tokens I*B.. and column tokens J*B..,
// held row-major in memory with leading dimension `ld`. Device code splits the element loops over
// threads (begin = threadIdx.x, step = blockDim.x); the host runs them with begin = 0, step = 1.
// Everything here mirrors slm_fast/kernels/triton_cka.py, which documents the contract.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define SLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SLM_HOST_DEVICE inline
#endif

namespace slm_fast {

// Token tile of the CUDA kernels (rows and columns).
constexpr int kBlock = 64;

// Where a tile lies in the (rows x cols) block and how it counts.
struct TileGeometry {
  int64_t row0, col0;  // first row and column token of the tile
  int64_t n_rows, n_cols;
  bool symmetric;  // cols is rows and only tiles J >= I are visited
  bool diagonal;   // symmetric and I == J

  SLM_HOST_DEVICE bool valid(int r, int c) const { return row0 + r < n_rows && col0 + c < n_cols; }
  // The same token on both sides: its RBF distance is exactly 0, not a rounding residue.
  SLM_HOST_DEVICE bool same_token(int r, int c) const { return diagonal && r == c; }
  // An off-diagonal tile of the symmetric case also stands for its mirror image...
  SLM_HOST_DEVICE double weight() const { return symmetric && !diagonal ? 2.0 : 1.0; }
  // ...whose row sums are this tile's column sums; a diagonal tile has no mirror.
  SLM_HOST_DEVICE bool writes_col_sums() const { return !diagonal; }
};

SLM_HOST_DEVICE TileGeometry tile_geometry(int tile_i, int tile_j, int block, int64_t n_rows, int64_t n_cols,
                                           bool symmetric) {
  return TileGeometry{int64_t(tile_i) * block, int64_t(tile_j) * block, n_rows, n_cols, symmetric,
                      symmetric && tile_i == tile_j};
}

// exp(-gamma * |x - y|^2) with |x - y|^2 = |x|^2 + |y|^2 - 2 x.y clamped at 0.
SLM_HOST_DEVICE float rbf_value(float dot, float norm_x, float norm_y, float gamma, bool same_token) {
  float dist = norm_x + norm_y - 2.0f * dot;
  dist = (same_token || dist < 0.0f) ? 0.0f : dist;
  return expf(-gamma * dist);
}

// Replace the Gram tile by the kernel tile (linear: unchanged), zero outside the valid rows and
// columns so that padded entries drop out of every sum. norm_x/norm_y (tile-local, RBF only) may be
// null for the linear kernel.
SLM_HOST_DEVICE void apply_kernel(float* tile, int ld, int block, const TileGeometry& g, const float* norm_x,
                                  const float* norm_y, float gamma, bool rbf, int begin, int step) {
  for (int e = begin; e < block * block; e += step) {
    const int r = e / block, c = e % block;
    float& value = tile[r * ld + c];
    if (!g.valid(r, c)) {
      value = 0.0f;
    } else if (rbf) {
      value = rbf_value(value, norm_x[r], norm_y[c], gamma, g.same_token(r, c));
    }
  }
}

SLM_HOST_DEVICE double tile_row_sum(const float* tile, int ld, int block, int r) {
  double sum = 0.0;
  for (int c = 0; c < block; ++c) sum += tile[r * ld + c];
  return sum;
}

SLM_HOST_DEVICE double tile_col_sum(const float* tile, int ld, int block, int c) {
  double sum = 0.0;
  for (int r = 0; r < block; ++r) sum += tile[r * ld + c];
  return sum;
}

// Adds this share of sum(A*A), sum(A*B), sum(B*B) over the tile to products[0..2].
SLM_HOST_DEVICE void accumulate_products(const float* tile_a, const float* tile_b, int ld, int block, int begin,
                                         int step, double* products) {
  for (int e = begin; e < block * block; e += step) {
    const int r = e / block, c = e % block;
    const double a = tile_a[r * ld + c], b = tile_b[r * ld + c];
    products[0] += a * a;
    products[1] += a * b;
    products[2] += b * b;
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side planning (same rules as triton_cka.py)

// One launch of the band variant: layer a, optionally layer b (b < 0: none), and which write sums.
struct BandItem {
  int a, b;
  bool sums_a, sums_b;
};

// Cross pairs become two-layer items (each layer's sums written by its first item); layers in no
// cross pair get a one-layer item for their sums and self product.
inline std::vector<BandItem> plan_band_items(int n_layers, const std::vector<std::pair<int, int>>& pairs) {
  std::vector<std::pair<int, int>> cross;
  for (const auto& p : pairs) {
    if (p.first != p.second) cross.emplace_back(std::min(p.first, p.second), std::max(p.first, p.second));
  }
  std::sort(cross.begin(), cross.end());
  cross.erase(std::unique(cross.begin(), cross.end()), cross.end());
  std::vector<bool> done(n_layers, false);
  std::vector<BandItem> items;
  for (const auto& p : cross) {
    items.push_back(BandItem{p.first, p.second, !done[p.first], !done[p.second]});
    done[p.first] = done[p.second] = true;
  }
  for (int a = 0; a < n_layers; ++a) {
    if (!done[a]) items.push_back(BandItem{a, -1, true, false});
  }
  return items;
}

// The band variant while it computes at most 1.25 Gram tiles per layer, else the all-pairs one.
inline bool prefer_band(int n_layers, const std::vector<BandItem>& items) {
  int gemms = 0;
  for (const auto& item : items) gemms += item.b < 0 ? 1 : 2;
  return 4 * gemms <= 5 * n_layers;
}

// Where the band variant leaves sum(K_a * K_b): (item index, product q) with q = 0 (aa), 1 (ab),
// 2 (bb); (-1, -1) if no item holds it.
inline std::pair<int, int> locate_band_product(const std::vector<BandItem>& items, int a, int b) {
  if (a > b) std::swap(a, b);
  for (int i = 0; i < int(items.size()); ++i) {
    const BandItem& item = items[i];
    if (a == b && item.a == a) return {i, 0};
    if (a == b && item.b == a) return {i, 2};
    if (item.a == a && item.b == b) return {i, 1};
  }
  return {-1, -1};
}

// Tile pairs (I, J) for row tiles first <= I < last (J >= I when symmetric), ordered by groups of
// `group` row tiles, then J, then I, so that programs running together share tiles in L2.
inline void make_tile_pairs(int first, int last, int n_tiles_j, bool symmetric, int group, std::vector<int32_t>& tile_i,
                            std::vector<int32_t>& tile_j) {
  tile_i.clear();
  tile_j.clear();
  for (int g0 = first; g0 < last; g0 += group) {
    const int g1 = std::min(last, g0 + group);
    for (int j = 0; j < n_tiles_j; ++j) {
      for (int i = g0; i < g1; ++i) {
        if (symmetric && j < i) continue;
        tile_i.push_back(i);
        tile_j.push_back(j);
      }
    }
  }
}

// Row tiles per chunk so that the chunk's partial sums stay within `budget` bytes (at least one).
inline int row_tiles_per_chunk(int64_t bytes_per_row_tile, int64_t budget) {
  return int(std::max<int64_t>(1, budget / std::max<int64_t>(1, bytes_per_row_tile)));
}

}  // namespace slm_fast
