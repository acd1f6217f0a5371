// Host test of csrc/cka_tile_math.h: the tile epilogue and reductions of the CUDA kernels, run on the
// CPU over every tile pair of small ragged problems exactly as the kernel and the binding combine them
// (thread-strided element loops, symmetric weights and mirrored column sums, chunked tile tables),
// checked against straightforward loops over the full kernel matrices. Built and run by
// tests/test_csrc_host.py; prints "ok" and exits 0 on success.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../cka_slab_math.h"
#include "../cka_tile_math.h"

using namespace slm_fast;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

void expect_close(double got, double want, double rtol, const std::string& what) {
  const double err = std::fabs(got - want);
  if (!(err <= rtol * std::max(1.0, std::fabs(want)))) {
    ++failures;
    std::printf("FAIL: %s: got %.10g, want %.10g\n", what.c_str(), got, want);
  }
}

using Matrix = std::vector<std::vector<float>>;  // [tokens][d]

Matrix random_matrix(int n, int d, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix x(n, std::vector<float>(d));
  for (auto& row : x)
    for (auto& v : row) v = normal(rng);
  return x;
}

double dot(const std::vector<float>& x, const std::vector<float>& y) {
  double s = 0.0;
  for (size_t c = 0; c < x.size(); ++c) s += double(x[c]) * y[c];
  return s;
}

// The full kernel matrix in double, straight from the definition.
std::vector<std::vector<double>> kernel_matrix(const Matrix& x, const Matrix& y, bool rbf, double gamma) {
  std::vector<std::vector<double>> k(x.size(), std::vector<double>(y.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    for (size_t j = 0; j < y.size(); ++j) {
      if (!rbf) {
        k[i][j] = dot(x[i], y[j]);
      } else {
        double dist = 0.0;
        for (size_t c = 0; c < x[i].size(); ++c) dist += (double(x[i][c]) - y[j][c]) * (double(x[i][c]) - y[j][c]);
        k[i][j] = std::exp(-gamma * dist);
      }
    }
  }
  return k;
}

struct Sums {
  std::vector<std::vector<double>> rows, cols;  // [layer][token]
  std::vector<double> products;                 // sum(K_a K_b) for (a, b) = (0, 0), (0, 1), (1, 1)
};

// The kernel's path: per tile pair, Gram tile in fp32 -> apply_kernel -> row/col sums and products,
// with every element loop split over `threads` strided shares; tile pairs from chunked tables.
Sums tiled_sums(const Matrix* rows, const Matrix* cols, bool symmetric, bool rbf, const double* gammas, int block,
                int chunk_rows, int threads) {
  const int64_t m = int64_t(rows[0].size()), k = int64_t(cols[0].size());
  const int n_tiles_i = int((m + block - 1) / block), n_tiles_j = int((k + block - 1) / block);
  const int ld = block + 4;
  Sums sums{{std::vector<double>(m), std::vector<double>(m)}, {std::vector<double>(k), std::vector<double>(k)}, {0, 0, 0}};
  std::vector<float> tiles[2] = {std::vector<float>(block * ld), std::vector<float>(block * ld)};
  std::vector<float> norm_x(block), norm_y(block);
  std::vector<std::vector<int>> visits(n_tiles_i, std::vector<int>(n_tiles_j, 0));
  std::vector<int32_t> tile_i, tile_j;
  for (int first = 0; first < n_tiles_i; first += chunk_rows) {
    make_tile_pairs(first, std::min(n_tiles_i, first + chunk_rows), n_tiles_j, symmetric, 3, tile_i, tile_j);
    for (size_t t = 0; t < tile_i.size(); ++t) {
      ++visits[tile_i[t]][tile_j[t]];
      const TileGeometry g = tile_geometry(tile_i[t], tile_j[t], block, m, k, symmetric);
      for (int layer = 0; layer < 2; ++layer) {
        float* tile = tiles[layer].data();
        for (int r = 0; r < block; ++r) {
          const int64_t i = g.row0 + r;
          norm_x[r] = i < m ? float(dot(rows[layer][i], rows[layer][i])) : 0.0f;
          for (int c = 0; c < block; ++c) {
            const int64_t j = g.col0 + c;
            if (r == 0) norm_y[c] = j < k ? float(dot(cols[layer][j], cols[layer][j])) : 0.0f;
            tile[r * ld + c] = (i < m && j < k) ? float(dot(rows[layer][i], cols[layer][j])) : 0.0f;
          }
        }
        for (int thread = 0; thread < threads; ++thread)
          apply_kernel(tile, ld, block, g, rbf ? norm_x.data() : nullptr, rbf ? norm_y.data() : nullptr,
                       float(gammas[layer]), rbf, thread, threads);
        for (int r = 0; r < block; ++r) {
          if (g.row0 + r < m) sums.rows[layer][g.row0 + r] += tile_row_sum(tile, ld, block, r);
        }
        if (g.writes_col_sums()) {
          for (int c = 0; c < block; ++c) {
            if (g.col0 + c < k) sums.cols[layer][g.col0 + c] += tile_col_sum(tile, ld, block, c);
          }
        }
      }
      for (int thread = 0; thread < threads; ++thread) {
        double share[3] = {0, 0, 0};
        accumulate_products(tiles[0].data(), tiles[1].data(), ld, block, thread, threads, share);
        for (int q = 0; q < 3; ++q) sums.products[q] += g.weight() * share[q];
      }
    }
  }
  for (int i = 0; i < n_tiles_i; ++i)
    for (int j = 0; j < n_tiles_j; ++j)
      expect(visits[i][j] == ((symmetric && j < i) ? 0 : 1), "tile pair (" + std::to_string(i) + ", " +
                                                                 std::to_string(j) + ") visited exactly once");
  if (symmetric) {  // the mirror tiles' row sums are the visited tiles' column sums
    for (int layer = 0; layer < 2; ++layer) {
      for (int64_t i = 0; i < m; ++i) sums.rows[layer][i] += sums.cols[layer][i];
      sums.cols[layer] = sums.rows[layer];
    }
  }
  return sums;
}

void check_problem(int m, int k, int d, bool symmetric, bool rbf, int chunk_rows, std::mt19937& rng) {
  const std::string name = std::string(symmetric ? "symmetric" : "rectangular") + (rbf ? " rbf" : " linear") +
                           " m=" + std::to_string(m) + " k=" + std::to_string(k) + " chunk=" + std::to_string(chunk_rows);
  Matrix rows[2] = {random_matrix(m, d, rng), random_matrix(m, d, rng)};
  Matrix cols[2] = {random_matrix(k, d, rng), random_matrix(k, d, rng)};
  if (symmetric) {
    cols[0] = rows[0];
    cols[1] = rows[1];
  }
  // RBF: distances of random rows are about 2d; gammas keep the kernel values spread out.
  const double gammas[2] = {0.5 / d, 0.25 / d};
  const Sums got = tiled_sums(rows, cols, symmetric, rbf, gammas, kBlock, chunk_rows, 128);
  const auto k0 = kernel_matrix(rows[0], cols[0], rbf, gammas[0]);
  const auto k1 = kernel_matrix(rows[1], cols[1], rbf, gammas[1]);
  const std::vector<std::vector<double>>* mats[2] = {&k0, &k1};
  const double rtol = 1e-4;  // fp32 Gram tiles against double
  double want[3] = {0, 0, 0};
  for (int layer = 0; layer < 2; ++layer) {
    const auto& km = *mats[layer];
    for (int i = 0; i < m; ++i) {
      double s = 0.0;
      for (int j = 0; j < k; ++j) s += km[i][j];
      expect_close(got.rows[layer][i], s, rtol, name + " row sum");
    }
    for (int j = 0; j < k; ++j) {
      double s = 0.0;
      for (int i = 0; i < m; ++i) s += km[i][j];
      expect_close(got.cols[layer][j], s, rtol, name + " col sum");
    }
  }
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < k; ++j) {
      want[0] += k0[i][j] * k0[i][j];
      want[1] += k0[i][j] * k1[i][j];
      want[2] += k1[i][j] * k1[i][j];
    }
  }
  for (int q = 0; q < 3; ++q) expect_close(got.products[q], want[q], rtol, name + " product " + std::to_string(q));
}

void check_epilogue() {
  expect(rbf_value(3.0f, 2.0f, 2.0f, 0.5f, false) == 1.0f, "negative rounding distance clamps to 0");
  expect(rbf_value(0.0f, 2.0f, 2.0f, 0.5f, true) == 1.0f, "same token has distance 0");
  expect_close(rbf_value(1.0f, 2.0f, 3.0f, 0.5f, false), std::exp(-1.5), 1e-6, "rbf value");
  const TileGeometry diag = tile_geometry(1, 1, kBlock, 100, 100, true);
  const TileGeometry off = tile_geometry(0, 1, kBlock, 100, 100, true);
  const TileGeometry rect = tile_geometry(1, 1, kBlock, 100, 70, false);
  expect(diag.weight() == 1.0 && !diag.writes_col_sums() && diag.same_token(3, 3), "symmetric diagonal tile");
  expect(off.weight() == 2.0 && off.writes_col_sums() && !off.same_token(3, 3), "symmetric off-diagonal tile");
  expect(rect.weight() == 1.0 && rect.writes_col_sums() && !rect.same_token(3, 3), "rectangular tile");
  expect(rect.valid(35, 5) && !rect.valid(36, 5) && !rect.valid(0, 6), "ragged edges of a tile");
}

void check_planning() {
  const std::vector<std::pair<int, int>> pairs = {{1, 0}, {1, 2}, {2, 2}, {0, 1}};
  const std::vector<BandItem> items = plan_band_items(4, pairs);
  expect(items.size() == 3, "band items: two cross pairs and one lone layer");
  expect(items[0].a == 0 && items[0].b == 1 && items[0].sums_a && items[0].sums_b, "first item writes both sums");
  expect(items[1].a == 1 && items[1].b == 2 && !items[1].sums_a && items[1].sums_b, "layer 1's sums written once");
  expect(items[2].a == 3 && items[2].b < 0 && items[2].sums_a, "a lone layer gets its own item");
  expect(locate_band_product(items, 2, 2) == std::make_pair(1, 2), "self product of a second layer");
  expect(locate_band_product(items, 1, 1) == std::make_pair(0, 2), "self product from the first item holding it");
  expect(locate_band_product(items, 2, 1) == std::make_pair(1, 1), "cross product, either order");
  expect(locate_band_product(items, 3, 3) == std::make_pair(2, 0), "self product of a lone layer");
  expect(locate_band_product(items, 0, 3) == std::make_pair(-1, -1), "a pair no item holds");
  expect(prefer_band(2, plan_band_items(2, {{0, 1}})), "one pair of two layers: band");
  expect(!prefer_band(3, plan_band_items(3, {{0, 1}, {1, 2}})), "a chain of three layers: all pairs");
  expect(row_tiles_per_chunk(1000, 10) == 1 && row_tiles_per_chunk(10, 1000) == 100, "row chunk sizes");
}

// The slab epilogue (csrc/cka_slabs.cu) emulated on the host as the kernel runs it: blocks of
// kEpilogueThreads columns x kEpilogueRows rows per layer, each thread one column, row sums reduced
// per warp of 32 columns; a stage [L, n_i, n_j] of Gram entries of random rows at a diagonal shift.
// Checks the values written back (K - offset), the partial layouts and their totals against direct
// exp(-gamma |x - y|^2) over the full slab.
void check_slab_epilogue(int n_layers, int n_i, int n_j, int d, int64_t shift, bool diagonal, bool col_sums,
                         std::mt19937& rng) {
  const std::string where = "slab epilogue " + std::to_string(n_i) + "x" + std::to_string(n_j) +
                            (diagonal ? " diagonal" : "") + " shift " + std::to_string(shift);
  const int64_t warp_cols = slab_warp_columns(n_j), row_blocks = slab_row_blocks(n_i);
  for (int a = 0; a < n_layers; ++a) {
    // Column c holds token c - shift of the row side when diagonal: build the columns from the rows.
    Matrix x = random_matrix(n_i, d, rng);
    Matrix y = random_matrix(n_j, d, rng);
    if (diagonal) {
      for (int c = 0; c < n_j; ++c) {
        if (c - shift >= 0 && c - shift < n_i) y[c] = x[c - shift];
      }
    }
    const float gamma = 0.5f / float(d), scale = float(gamma / std::log(2.0)), offset = 0.25f;
    std::vector<float> stage(size_t(n_i) * n_j), norm_i(n_i), norm_j(n_j);
    for (int r = 0; r < n_i; ++r) norm_i[r] = float(dot(x[r], x[r]));
    for (int c = 0; c < n_j; ++c) norm_j[c] = float(dot(y[c], y[c]));
    for (int r = 0; r < n_i; ++r)
      for (int c = 0; c < n_j; ++c) stage[size_t(r) * n_j + c] = float(dot(x[r], y[c]));
    std::vector<float> row_part(size_t(warp_cols) * n_i, -1.0f), col_part(size_t(row_blocks) * n_j, -1.0f);
    for (int64_t bx = 0; bx < slab_column_blocks(n_j); ++bx) {
      for (int64_t by = 0; by < row_blocks; ++by) {
        const int64_t row0 = by * kEpilogueRows, row1 = std::min<int64_t>(row0 + kEpilogueRows, n_i);
        std::vector<float> col_sum(kEpilogueThreads, 0.0f);
        for (int64_t row = row0; row < row1; ++row) {
          std::vector<float> warp_sum(kEpilogueThreads / kWarpColumns, 0.0f);
          for (int t = 0; t < kEpilogueThreads; ++t) {
            const int64_t col = bx * kEpilogueThreads + t;
            float value = 0.0f;
            if (col < n_j) {
              float& entry = stage[size_t(row) * n_j + col];
              value = slab_rbf_value(entry, norm_i[row], norm_j[col], scale, slab_same_token(diagonal, row, col, shift));
              entry = value - offset;
            }
            col_sum[t] += value;
            warp_sum[t / kWarpColumns] += value;
          }
          for (int w = 0; w < kEpilogueThreads / kWarpColumns; ++w)
            row_part[size_t(bx * (kEpilogueThreads / kWarpColumns) + w) * n_i + row] = warp_sum[w];
        }
        for (int t = 0; t < kEpilogueThreads; ++t) {
          const int64_t col = bx * kEpilogueThreads + t;
          if (col_sums && col < n_j) col_part[size_t(by) * n_j + col] = col_sum[t];
        }
      }
    }
    // Direct values and sums; the same token's distance must be exactly 0 (K = 1).
    std::vector<double> row_want(n_i, 0.0), col_want(n_j, 0.0);
    for (int r = 0; r < n_i; ++r) {
      for (int c = 0; c < n_j; ++c) {
        double dist = 0.0;
        for (int e = 0; e < d; ++e) dist += double(x[r][e] - y[c][e]) * double(x[r][e] - y[c][e]);
        const double want = std::exp(-double(gamma) * dist);
        const double got = double(stage[size_t(r) * n_j + c]) + offset;
        expect_close(got, want, 1e-4, where + " value");
        if (diagonal && r + shift == c) expect(got == 1.0, where + ": the same token gives exactly 1");
        row_want[r] += want;
        col_want[c] += want;
      }
    }
    for (int r = 0; r < n_i; ++r) {
      double total = 0.0;
      for (int64_t w = 0; w < warp_cols; ++w) total += row_part[size_t(w) * n_i + r];
      expect_close(total, row_want[r], 1e-4, where + " row sum");
    }
    if (col_sums) {
      for (int c = 0; c < n_j; ++c) {
        double total = 0.0;
        for (int64_t b = 0; b < row_blocks; ++b) total += col_part[size_t(b) * n_j + c];
        expect_close(total, col_want[c], 1e-4, where + " column sum");
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  check_epilogue();
  check_planning();
  check_slab_epilogue(2, 40, 40, 12, 0, true, false, rng);     // a diagonal block, 2 row blocks
  check_slab_epilogue(1, 33, 300, 7, -5, false, true, rng);    // off-diagonal chunk over 2 column blocks
  check_slab_epilogue(1, 16, 20, 5, 4, true, true, rng);       // the shifted-diagonal mapping
  for (bool rbf : {false, true}) {
    check_problem(150, 70, 24, false, rbf, 2, rng);   // ragged on both sides, two row chunks
    check_problem(150, 150, 24, true, rbf, 1, rng);   // symmetric, one row tile per chunk
    check_problem(130, 130, 17, true, rbf, 8, rng);   // one chunk, 2 tiles plus a sliver
    check_problem(20, 5, 9, false, rbf, 8, rng);      // smaller than one tile
  }
  if (failures != 0) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
