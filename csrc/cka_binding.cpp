// Torch binding of the fused CKA tile kernels: `slm_fast._cuda.kernel_sums`, the kernel-sums
// contract of slm_fast/kernels/__init__.py on CUDA tensors (thin Python wrapper: kernels/cuda.py).
//
// The host side plans the launches exactly as slm_fast/kernels/triton_cka.py does: row tiles are
// processed in chunks whose float64 partial sums [layer, I - first, J, kBlock] fit a memory budget;
// the band variant launches one two-layer item per cross pair (Frobenius products reduced in the
// kernel), the all-pairs variant stages each layer's kernel tiles in float64 for a batch of tile pairs
// and takes their L x L products with one batched matmul. Every sum across tiles is a float64 sum of
// per-tile partials (deterministic, no atomics).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cka_slab_math.h"
#include "cka_slabs.h"
#include "cka_tile_math.h"
#include "cka_tiles.h"

namespace slm_fast {
namespace {

constexpr int64_t kPartialsBytes = int64_t(256) << 20;
constexpr int64_t kStagedBytes = int64_t(2) << 30;
constexpr int kL2GroupRows = 8;

enum class Variant : int64_t { kCheaper = 0, kBand = 1, kAllPairs = 2 };

struct Problem {
  std::vector<at::Tensor> rows, cols;            // unit stride along d, one dtype
  std::vector<at::Tensor> row_norms, col_norms;  // fp32 |x|^2 (RBF) or undefined
  std::vector<double> gammas;
  std::vector<std::pair<int, int>> pairs;
  bool rbf, symmetric, tf32;
  int64_t n_rows, n_cols;
  ScalarKind kind;
  at::TensorOptions f64;

  int n_layers() const { return int(rows.size()); }
};

ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "activations must be fp32, bf16 or fp16, got ", dtype);
  }
  return ScalarKind::kFloat32;  // not reached
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

at::Tensor squared_row_norms(const at::Tensor& x, ScalarKind kind) {
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  check_cuda(launch_squared_row_norms(x.data_ptr(), kind, x.size(0), int(x.size(1)), x.stride(0),
                                      out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "squared_row_norms");
  return out;
}

at::Tensor unit_stride(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor y = x.to(dtype);
  return y.stride(1) == 1 ? y : y.contiguous();
}

Problem prepare(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& cols, bool rbf,
                const std::vector<double>& gammas, const at::Tensor& pairs, bool tf32) {
  TORCH_CHECK_VALUE(!rows.empty(), "kernel_sums needs at least one layer");
  const bool symmetric = cols.empty();
  TORCH_CHECK_VALUE(symmetric || cols.size() == rows.size(), rows.size(), " row layers but ", cols.size(),
                    " column layers");
  Problem p;
  p.rbf = rbf;
  p.symmetric = symmetric;
  p.tf32 = tf32;
  at::ScalarType dtype = rows[0].scalar_type();
  std::vector<at::Tensor> all(rows);
  all.insert(all.end(), cols.begin(), cols.end());
  for (const at::Tensor& t : all) {
    TORCH_CHECK_VALUE(t.dim() == 2, "activations must be 2-d [tokens, d]");
    TORCH_CHECK_VALUE(t.is_cuda() && t.device() == rows[0].device(), "all activations must be on one CUDA device");
    scalar_kind(t.scalar_type());
    dtype = at::promote_types(dtype, t.scalar_type());
  }
  p.kind = scalar_kind(dtype);
  p.n_rows = rows[0].size(0);
  p.n_cols = symmetric ? p.n_rows : cols[0].size(0);
  for (size_t a = 0; a < rows.size(); ++a) {
    const at::Tensor& c = symmetric ? rows[a] : cols[a];
    TORCH_CHECK_VALUE(rows[a].size(0) == p.n_rows && c.size(0) == p.n_cols,
                      "every layer must have the same number of row tokens and of column tokens");
    TORCH_CHECK_VALUE(rows[a].size(1) == c.size(1), "layer ", a, ": rows have d = ", rows[a].size(1),
                      " but cols have d = ", c.size(1));
    TORCH_CHECK_VALUE(rows[a].size(1) < (int64_t(1) << 31), "d must fit in 32 bits");
    p.rows.push_back(unit_stride(rows[a], dtype));
    p.cols.push_back(symmetric ? p.rows.back() : unit_stride(c, dtype));
  }
  if (rbf) {
    TORCH_CHECK_VALUE(gammas.size() == rows.size(), "the rbf kernel needs one gamma per layer (", rows.size(), ")");
    for (size_t a = 0; a < rows.size(); ++a) {
      TORCH_CHECK_VALUE(std::isfinite(gammas[a]) && gammas[a] > 0, "gammas must be finite and positive");
      p.row_norms.push_back(squared_row_norms(p.rows[a], p.kind));
      p.col_norms.push_back(symmetric ? p.row_norms.back() : squared_row_norms(p.cols[a], p.kind));
    }
    p.gammas = gammas;
  } else {
    TORCH_CHECK_VALUE(gammas.empty(), "the linear kernel takes no gammas");
    p.gammas.assign(rows.size(), 0.0);
    p.row_norms.resize(rows.size());
    p.col_norms.resize(rows.size());
  }
  TORCH_CHECK_VALUE(pairs.dim() == 2 && pairs.size(1) == 2 && !at::isFloatingType(pairs.scalar_type()),
                    "pairs must be an integer tensor [P, 2]");
  const at::Tensor pairs_cpu = pairs.to(at::kCPU, at::kLong).contiguous();
  const int64_t* pair_data = pairs_cpu.data_ptr<int64_t>();
  for (int64_t i = 0; i < pairs_cpu.size(0); ++i) {
    const int64_t a = pair_data[2 * i], b = pair_data[2 * i + 1];
    TORCH_CHECK_VALUE(0 <= a && a < p.n_layers() && 0 <= b && b < p.n_layers(), "pairs must index layers 0..",
                      p.n_layers() - 1);
    p.pairs.emplace_back(int(a), int(b));
  }
  p.f64 = p.rows[0].options().dtype(at::kDouble);
  return p;
}

LayerArgs layer_args(const Problem& p, int a) {
  LayerArgs args;
  args.x = p.rows[a].data_ptr();
  args.y = p.cols[a].data_ptr();
  args.norm_x = p.rbf ? p.row_norms[a].data_ptr<float>() : nullptr;
  args.norm_y = p.rbf ? p.col_norms[a].data_ptr<float>() : nullptr;
  args.stride_x = p.rows[a].stride(0);
  args.stride_y = p.cols[a].stride(0);
  args.d = int(p.rows[a].size(1));
  args.gamma = float(p.gammas[a]);
  return args;
}

// 16-byte vector loads need d, the row strides and the base pointers at 16-byte multiples.
bool vectorizable(const Problem& p) {
  const int64_t vec = p.kind == ScalarKind::kFloat32 ? 4 : 8;
  for (int a = 0; a < p.n_layers(); ++a) {
    for (const at::Tensor* t : {&p.rows[a], &p.cols[a]}) {
      if (t->size(1) % vec != 0 || t->stride(0) % vec != 0 || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0)
        return false;
    }
  }
  return true;
}

at::Tensor device_table(const std::vector<int32_t>& values, const at::Device& device) {
  return at::from_blob(const_cast<int32_t*>(values.data()), {int64_t(values.size())}, at::kInt).to(device);
}

// values.flatten()[where] as a new tensor.
at::Tensor gather(const at::Tensor& values, const std::vector<int64_t>& where) {
  const at::Tensor index = at::from_blob(const_cast<int64_t*>(where.data()), {int64_t(where.size())}, at::kLong);
  return values.flatten().index_select(0, index.to(values.device()));
}

// The state of one row chunk: its tile pairs and its partial row/column sums [L, I - first, J, B].
struct Chunk {
  int first, last;
  at::Tensor tile_i, tile_j;
  at::Tensor row_part, col_part;
};

TilePairsParams base_params(const Problem& p, const Chunk& chunk, const at::Tensor& tile_i, const at::Tensor& tile_j) {
  TilePairsParams params{};
  params.tile_i = tile_i.data_ptr<int32_t>();
  params.tile_j = tile_j.data_ptr<int32_t>();
  params.n_tile_pairs = int(tile_i.numel());
  params.first_tile_i = chunk.first;
  params.n_rows = p.n_rows;
  params.n_cols = p.n_cols;
  params.rbf = p.rbf;
  params.symmetric = p.symmetric;
  params.tf32 = p.tf32;
  params.stride_part_i = chunk.row_part.stride(1);
  params.stride_part_j = chunk.row_part.stride(2);
  return params;
}

void set_sums(TilePairsParams& params, const Chunk& chunk, int layer, bool second) {
  double* rows = chunk.row_part[layer].data_ptr<double>();
  double* cols = chunk.col_part[layer].data_ptr<double>();
  (second ? params.row_part_b : params.row_part_a) = rows;
  (second ? params.col_part_b : params.col_part_a) = cols;
}

void launch(const Problem& p, const TilePairsParams& params) {
  check_cuda(launch_tile_pairs(params, p.kind, vectorizable(p), c10::cuda::getCurrentCUDAStream()),
             "tile_pairs_kernel");
}

// Runs `launch_chunk(chunk)` over the row chunks and sums the partials in float64; returns
// (sum over chunks of what launch_chunk returns, row_sums [L, m], col_sums [L, k]).
template <typename LaunchChunk>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_over_tiles(const Problem& p, int64_t bytes_per_row_tile,
                                                                  LaunchChunk launch_chunk) {
  const int n_tiles_i = int((p.n_rows + kBlock - 1) / kBlock);
  const int n_tiles_j = int((p.n_cols + kBlock - 1) / kBlock);
  const int64_t n_layers = p.n_layers();
  at::Tensor row_acc = at::zeros({n_layers, int64_t(n_tiles_i) * kBlock}, p.f64);
  at::Tensor col_acc = at::zeros({n_layers, int64_t(n_tiles_j) * kBlock}, p.f64);
  at::Tensor frob;
  const int64_t per_row_tile = n_layers * n_tiles_j * 2 * kBlock * 8 + bytes_per_row_tile;
  const int step = row_tiles_per_chunk(per_row_tile, kPartialsBytes);
  std::vector<int32_t> tile_i, tile_j;
  for (int first = 0; first < n_tiles_i; first += step) {
    Chunk chunk;
    chunk.first = first;
    chunk.last = std::min(n_tiles_i, first + step);
    make_tile_pairs(chunk.first, chunk.last, n_tiles_j, p.symmetric, kL2GroupRows, tile_i, tile_j);
    chunk.tile_i = device_table(tile_i, p.rows[0].device());
    chunk.tile_j = device_table(tile_j, p.rows[0].device());
    chunk.row_part = at::zeros({n_layers, chunk.last - chunk.first, n_tiles_j, kBlock}, p.f64);
    chunk.col_part = at::zeros_like(chunk.row_part);
    at::Tensor part = launch_chunk(chunk);
    frob = frob.defined() ? frob + part : part;
    row_acc.slice(1, int64_t(first) * kBlock, int64_t(chunk.last) * kBlock) += chunk.row_part.sum(2).flatten(1);
    col_acc += chunk.col_part.sum(1).flatten(1);
  }
  at::Tensor row_sums = row_acc.slice(1, 0, p.n_rows);
  at::Tensor col_sums = col_acc.slice(1, 0, p.n_cols);
  if (p.symmetric) {
    row_sums = row_sums + col_sums;
    col_sums = row_sums.clone();
  }
  return {frob, row_sums.contiguous(), col_sums.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_band(const Problem& p) {
  const std::vector<BandItem> items = plan_band_items(p.n_layers(), p.pairs);
  const int64_t n_items = int64_t(items.size());
  const int64_t n_tiles_j = (p.n_cols + kBlock - 1) / kBlock;
  auto launch_chunk = [&](const Chunk& chunk) {
    at::Tensor frob = at::zeros({n_items, 3, chunk.last - chunk.first, n_tiles_j}, p.f64);
    for (int64_t i = 0; i < n_items; ++i) {
      const BandItem& item = items[i];
      TilePairsParams params = base_params(p, chunk, chunk.tile_i, chunk.tile_j);
      params.a = layer_args(p, item.a);
      params.two_layers = item.b >= 0;
      params.b = layer_args(p, params.two_layers ? item.b : item.a);
      if (item.sums_a) set_sums(params, chunk, item.a, false);
      if (item.sums_b) set_sums(params, chunk, item.b, true);
      params.frob = frob[i].data_ptr<double>();
      params.stride_frob_q = frob.stride(1);
      params.stride_frob_i = frob.stride(2);
      launch(p, params);
    }
    return frob.sum({2, 3});
  };
  auto [products, row_sums, col_sums] = reduce_over_tiles(p, n_items * 3 * n_tiles_j * 8, launch_chunk);
  std::vector<int64_t> where;
  for (const auto& [a, b] : p.pairs) {
    const auto [item, q] = locate_band_product(items, a, b);
    TORCH_CHECK(item >= 0, "no band item holds the pair (", a, ", ", b, ")");
    where.push_back(int64_t(item) * 3 + q);
  }
  return {gather(products, where), row_sums, col_sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_all_pairs(const Problem& p) {
  const int64_t n_layers = p.n_layers();
  const int64_t tile_elems = int64_t(kBlock) * kBlock;
  const int64_t batch = std::max<int64_t>(1, kStagedBytes / (n_layers * tile_elems * 8));
  auto launch_chunk = [&](const Chunk& chunk) {
    at::Tensor products = at::zeros({n_layers, n_layers}, p.f64);
    const int64_t n_pairs = chunk.tile_i.numel();
    for (int64_t start = 0; start < n_pairs; start += batch) {
      const int64_t end = std::min(n_pairs, start + batch);
      const at::Tensor batch_i = chunk.tile_i.slice(0, start, end);
      const at::Tensor batch_j = chunk.tile_j.slice(0, start, end);
      at::Tensor staged = at::empty({end - start, n_layers, tile_elems}, p.f64);
      for (int64_t a = 0; a < n_layers; ++a) {
        TilePairsParams params = base_params(p, chunk, batch_i, batch_j);
        params.a = params.b = layer_args(p, int(a));
        set_sums(params, chunk, int(a), false);
        params.staged = staged.select(1, a).data_ptr<double>();
        params.stride_staged_t = staged.stride(0);
        launch(p, params);
      }
      at::Tensor weights = at::ones({end - start}, p.f64);
      if (p.symmetric) weights.masked_fill_(batch_i != batch_j, 2.0);
      products += at::bmm(staged, staged.transpose(1, 2)).mul_(weights.view({-1, 1, 1})).sum(0);
    }
    return products;
  };
  auto [products, row_sums, col_sums] = reduce_over_tiles(p, 0, launch_chunk);
  std::vector<int64_t> where;
  for (const auto& [a, b] : p.pairs) where.push_back(a * n_layers + b);
  return {gather(products, where), row_sums, col_sums};
}

}  // namespace

// rows: L tensors [m, d_a]; cols: L tensors [k, d_a], or empty for the symmetric case (cols = rows);
// gammas: L floats for RBF, empty for linear; pairs: [P, 2] layer indices; tf32: fp32 inputs use
// tf32 tensor cores (else ieee FMA); variant: 0 the cheaper, 1 band, 2 all pairs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_sums(const std::vector<at::Tensor>& rows,
                                                           const std::vector<at::Tensor>& cols, bool rbf,
                                                           const std::vector<double>& gammas, const at::Tensor& pairs,
                                                           bool tf32, int64_t variant) {
  TORCH_CHECK_VALUE(variant >= 0 && variant <= 2, "variant must be 0 (cheaper), 1 (band) or 2 (all pairs)");
  TORCH_CHECK_VALUE(!rows.empty() && rows[0].is_cuda(), "kernel_sums needs at least one layer on a CUDA device");
  const c10::cuda::CUDAGuard guard(rows[0].device());
  const Problem p = prepare(rows, cols, rbf, gammas, pairs, tf32);
  if (p.n_rows == 0 || p.n_cols == 0) {
    return {at::zeros({int64_t(p.pairs.size())}, p.f64), at::zeros({p.n_layers(), p.n_rows}, p.f64),
            at::zeros({p.n_layers(), p.n_cols}, p.f64)};
  }
  bool band = Variant(variant) == Variant::kBand;
  if (Variant(variant) == Variant::kCheaper) band = prefer_band(p.n_layers(), plan_band_items(p.n_layers(), p.pairs));
  return band ? run_band(p) : run_all_pairs(p);
}

// ---------------------------------------------------------------------------------------------
// The slab path's two steps (cka_slabs.h); slm_fast/kernels/slabs.py drives the slabs and chunks.

constexpr int64_t kGemmWorkspaceBytes = int64_t(32) << 20;

void check_stacked(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.dim() == 3 && t.stride(2) == 1, name,
                    " must be a CUDA tensor [L, tokens, d] with unit stride along d");
}

// stage[a] = x[a] @ y[a]^T in fp32 for stacked layers x [L, n_i, d], y [L, n_j, d] of one dtype into
// the contiguous fp32 stage [L, n_i, n_j], by one batched cuBLASLt GEMM.
void gram_slab_op(const at::Tensor& x, const at::Tensor& y, at::Tensor& stage, bool tf32) {
  check_stacked(x, "x");
  check_stacked(y, "y");
  TORCH_CHECK_VALUE(x.scalar_type() == y.scalar_type() && x.size(0) == y.size(0) && x.size(2) == y.size(2),
                    "x and y must have one dtype, the same layers and the same width");
  TORCH_CHECK_VALUE(stage.is_cuda() && stage.scalar_type() == at::kFloat && stage.is_contiguous() &&
                        stage.dim() == 3 && stage.size(0) == x.size(0) && stage.size(1) == x.size(1) &&
                        stage.size(2) == y.size(1),
                    "stage must be a contiguous fp32 CUDA tensor [L, n_i, n_j]");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor workspace = at::empty({kGemmWorkspaceBytes}, x.options().dtype(at::kByte));
  GramSlabParams params{};
  params.x = x.data_ptr();
  params.y = y.data_ptr();
  params.stage = stage.data_ptr<float>();
  params.n_layers = x.size(0);
  params.n_i = x.size(1);
  params.n_j = y.size(1);
  params.d = x.size(2);
  params.stride_x_layer = x.stride(0);
  params.stride_y_layer = y.stride(0);
  params.stride_x_row = x.stride(1);
  params.stride_y_row = y.stride(1);
  params.kind = scalar_kind(x.scalar_type());
  params.tf32 = tf32;
  params.workspace = workspace.data_ptr();
  params.workspace_bytes = size_t(kGemmWorkspaceBytes);
  if (params.n_layers == 0 || params.n_i == 0 || params.n_j == 0) return;
  const std::string error = gram_slab(params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error.empty(), "gram_slab: ", error);
}

// The epilogue over the stage [L, n_i, n_j] (cka_slabs.h); returns the fp32 partial row sums
// [L, warp columns, n_i] and column sums [L, row blocks, n_j] (empty when not col_sums).
std::tuple<at::Tensor, at::Tensor> slab_epilogue_op(at::Tensor& stage, const at::Tensor& norm_i,
                                                    const at::Tensor& norm_j, const at::Tensor& scales,
                                                    const at::Tensor& offsets, int64_t diagonal_shift, bool rbf,
                                                    bool diagonal, bool col_sums) {
  TORCH_CHECK_VALUE(stage.is_cuda() && stage.scalar_type() == at::kFloat && stage.is_contiguous() && stage.dim() == 3,
                    "stage must be a contiguous fp32 CUDA tensor [L, n_i, n_j]");
  const int64_t n_layers = stage.size(0), n_i = stage.size(1), n_j = stage.size(2);
  for (const at::Tensor* t : {&norm_i, &norm_j, &scales, &offsets}) {
    TORCH_CHECK_VALUE(t->is_cuda() && t->scalar_type() == at::kFloat && t->stride(-1) == 1,
                      "norms, scales and offsets must be fp32 CUDA tensors with unit inner stride");
  }
  if (rbf) {
    TORCH_CHECK_VALUE(norm_i.dim() == 2 && norm_i.size(0) == n_layers && norm_i.size(1) >= n_i && norm_j.dim() == 2 &&
                          norm_j.size(0) == n_layers && norm_j.size(1) >= n_j && scales.numel() == n_layers &&
                          offsets.numel() == n_layers,
                      "rbf needs norms [L, >= n_i] and [L, >= n_j], and L scales and offsets");
  }
  const c10::cuda::CUDAGuard guard(stage.device());
  const auto f32 = stage.options();
  at::Tensor row_part = at::empty({n_layers, slab_warp_columns(n_j), n_i}, f32);
  at::Tensor col_part = col_sums ? at::empty({n_layers, slab_row_blocks(n_i), n_j}, f32) : at::empty({0}, f32);
  SlabEpilogueParams params{};
  params.stage = stage.data_ptr<float>();
  params.norm_i = norm_i.data_ptr<float>();
  params.norm_j = norm_j.data_ptr<float>();
  params.scales = scales.data_ptr<float>();
  params.offsets = offsets.data_ptr<float>();
  params.row_part = row_part.data_ptr<float>();
  params.col_part = col_sums ? col_part.data_ptr<float>() : nullptr;
  params.n_layers = n_layers;
  params.n_i = n_i;
  params.n_j = n_j;
  params.stride_norm_i = rbf ? norm_i.stride(0) : 0;
  params.stride_norm_j = rbf ? norm_j.stride(0) : 0;
  params.diagonal_shift = diagonal_shift;
  params.rbf = rbf;
  params.diagonal = diagonal;
  params.col_sums = col_sums;
  check_cuda(launch_slab_epilogue(params, c10::cuda::getCurrentCUDAStream()), "slab_epilogue_kernel");
  return {row_part, col_part};
}

}  // namespace slm_fast

namespace {

// Runs fn, turning bad input (c10::ValueError) into Python's ValueError whatever translators exist.
template <typename Fn>
auto value_errors_to_python(Fn fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::ValueError& e) {
    throw pybind11::value_error(e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CKA kernel-sums tiles (see slm_fast/kernels/cuda.py)";
  m.attr("BLOCK") = slm_fast::kBlock;
  m.def(
      "kernel_sums",
      [](const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& cols, bool rbf,
         const std::vector<double>& gammas, const at::Tensor& pairs, bool tf32, int64_t variant) {
        return value_errors_to_python([&] { return slm_fast::kernel_sums(rows, cols, rbf, gammas, pairs, tf32, variant); });
      },
      "Kernel sums of L layers over one (rows x cols) block", pybind11::arg("rows"), pybind11::arg("cols"),
      pybind11::arg("rbf"), pybind11::arg("gammas"), pybind11::arg("pairs"), pybind11::arg("tf32"),
      pybind11::arg("variant"));
  m.def(
      "gram_slab",
      [](const at::Tensor& x, const at::Tensor& y, at::Tensor& stage, bool tf32) {
        value_errors_to_python([&] { slm_fast::gram_slab_op(x, y, stage, tf32); });
      },
      "stage[a] = x[a] @ y[a]^T in fp32 by one batched cuBLASLt GEMM", pybind11::arg("x"), pybind11::arg("y"),
      pybind11::arg("stage"), pybind11::arg("tf32"));
  m.def(
      "slab_epilogue",
      [](at::Tensor& stage, const at::Tensor& norm_i, const at::Tensor& norm_j, const at::Tensor& scales,
         const at::Tensor& offsets, int64_t diagonal_shift, bool rbf, bool diagonal, bool col_sums) {
        return value_errors_to_python([&] {
          return slm_fast::slab_epilogue_op(stage, norm_i, norm_j, scales, offsets, diagonal_shift, rbf, diagonal,
                                            col_sums);
        });
      },
      "Kernel values, partial row/column sums and K - offset over a Gram stage", pybind11::arg("stage"),
      pybind11::arg("norm_i"), pybind11::arg("norm_j"), pybind11::arg("scales"), pybind11::arg("offsets"),
      pybind11::arg("diagonal_shift"), pybind11::arg("rbf"), pybind11::arg("diagonal"), pybind11::arg("col_sums"));
}
