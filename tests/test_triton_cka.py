"""The Triton backend (slm_fast/kernels/triton_cka.py) against the plain-torch oracle of the
kernel-sums contract. Without a GPU the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1) at small sizes with 16-token tiles, so ragged edges and several tiles are cheap."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from kernel_sums_oracle import oracle_kernel_sums, oracle_magnitudes

from slm_fast.errors import InputError
from slm_fast.kernels import load_backend

triton_cka = pytest.importorskip("slm_fast.kernels.triton_cka")
slabs = pytest.importorskip("slm_fast.kernels.slabs")
if triton_cka.unavailable_reason("cuda" if torch.cuda.is_available() else "cpu") is not None:
    pytest.skip("the Triton backend cannot run here", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _uncentred(function):
    """The variant with zero centres: these tests check the kernels' arithmetic on the given values
    (zero-mean data, so nothing is lost), the oracle sees exactly what the tensor cores multiply;
    test_similarity_offsets.py checks the centring on data with offsets."""

    def call(rows, cols, **kwargs):
        kwargs.setdefault("centers", [torch.zeros(x.shape[1], device=x.device) for x in rows])
        return function(rows, cols, **kwargs)

    return call


VARIANTS = {
    "band": _uncentred(triton_cka.band_kernel_sums),
    "persistent": _uncentred(triton_cka.persistent_kernel_sums),
    "slabs": _uncentred(triton_cka.slab_kernel_sums),
    "auto": _uncentred(triton_cka.kernel_sums),
}
ALL_PAIRS = ["persistent", "slabs"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _layers(n_tokens: int, widths: list[int], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n_tokens, d, generator=generator).to(DEVICE, dtype) for d in widths]


def _gammas(widths: list[int]) -> list[float]:
    """About 1 / (mean squared distance) of standard normal rows, so kernel values spread over (0, 1)."""
    return [1.0 / (2.0 * d) for d in widths]


U32 = 2.0**-24  # fp32 unit roundoff
# The slab path's Frobenius products of 16-bit inputs through the bf16 hi / lo split (test_slabs.py).
SPLIT_ERROR = 3 * 2.0**-16


def _assert_matches_oracle(got, rows, cols, kernel, gammas, pairs, *, block=16, split=False):
    """|got - oracle| <= rtol x the magnitude of the terms (oracle_magnitudes: |x||y| per linear entry,
    1 per RBF entry). The oracle sees the same values the kernels multiply (zero centres; bf16/fp16
    products are exact in fp32), so the error is fp32 arithmetic: a d-long dot product ~sqrt(d + 2) u
    of |x||y| (RBF: of the exponent, |x|^2 + |y|^2 - 2 x.y, times gamma ~ 1 / (2 d)), and fp32 partial
    sums of a B x B tile (or B-entry runs) ~B u; independent roundings add like a random walk (Higham
    & Mary). rtol = 8 u (sqrt(d + 2) + B), plus SPLIT_ERROR where the slab path's Frobenius products
    go through the bf16 hi / lo split."""
    host_rows = [r.cpu() for r in rows]
    host_cols = None if cols is None else [c.cpu() for c in cols]
    zeros = [torch.zeros(r.shape[1]) for r in rows]
    options = {"kernel": kernel, "gammas": gammas, "pairs": pairs, "centers": zeros}
    want = oracle_kernel_sums(host_rows, host_cols, **options)
    magnitude = oracle_magnitudes(host_rows, host_cols, **options)
    width = max(r.shape[1] for r in rows)
    rtol = 8 * U32 * ((width + 2) ** 0.5 + block)
    for name, g, w, m in zip(("frob", "row_sums", "col_sums"), got, want, magnitude, strict=True):
        assert g.dtype == torch.float64, name
        assert g.shape == w.shape, name
        bound = rtol * m + (SPLIT_ERROR * m if split and name == "frob" else 0.0)
        error = (g.cpu() - w).abs()
        assert bool((error <= bound).all()), (name, float((error / m).max()), rtol)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
def test_matches_oracle(variant, dtype, kernel, symmetric):
    """Three layers of different widths (none a multiple of the d chunk), ragged token counts over
    several 16-token tiles, self pairs, cross pairs in both orders and a repeated pair."""
    widths = [20, 33, 48]
    rows = _layers(37, widths, dtype, seed=1)
    cols = None if symmetric else _layers(21, widths, dtype, seed=2)
    gammas = _gammas(widths) if kernel == "rbf" else None
    pairs = torch.tensor([[0, 1], [1, 2], [0, 0], [2, 1], [2, 2], [0, 1]])
    got = VARIANTS[variant](rows, cols, kernel=kernel, gammas=gammas, pairs=pairs)
    split = variant == "slabs" and dtype != torch.float32
    _assert_matches_oracle(got, rows, cols, kernel, gammas, pairs, split=split)


@pytest.mark.parametrize("variant", ["band", *ALL_PAIRS])
@pytest.mark.parametrize(
    ("m", "k", "block"),
    [(5, 3, 16), (5, None, 16), (16, None, 16), (17, 40, 32), (1, None, 16)],
    ids=["below-tile", "below-tile-sym", "one-full-tile", "ragged-32", "one-token"],
)
def test_sizes_and_tiles(variant, m, k, block):
    rows = _layers(m, [24], torch.float32, seed=3)
    cols = None if k is None else _layers(k, [24], torch.float32, seed=4)
    pairs = torch.tensor([[0, 0]])
    got = VARIANTS[variant](rows, cols, kernel="rbf", gammas=[0.02], pairs=pairs, block_size=block)
    _assert_matches_oracle(got, rows, cols, "rbf", [0.02], pairs, block=block)


@pytest.mark.parametrize("variant", ["band", *ALL_PAIRS])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
def test_chunked_partials_and_staging(monkeypatch, variant, symmetric):
    """Budgets small enough that every row tile is its own chunk, the staged tiles go in batches
    of three tile pairs, and the slab path's stage takes 16 x 32 tokens (two column chunks of a row
    slab): the float64 reductions across chunks and batches must not change the sums."""
    monkeypatch.setattr(triton_cka, "PARTIALS_BYTES", 1)
    monkeypatch.setattr(triton_cka, "STAGED_TILES_BYTES", 3 * 2 * 16 * 16 * 4)
    monkeypatch.setattr(slabs, "STAGE_BYTES", 2 * 16 * 32 * 4)
    widths = [16, 24]
    rows = _layers(50, widths, torch.float32, seed=5)
    cols = None if symmetric else _layers(35, widths, torch.float32, seed=6)
    pairs = torch.tensor([[0, 1], [1, 1], [0, 0]])
    got = VARIANTS[variant](rows, cols, kernel="rbf", gammas=_gammas(widths), pairs=pairs)
    _assert_matches_oracle(got, rows, cols, "rbf", _gammas(widths), pairs)


@pytest.mark.parametrize("variant", ALL_PAIRS)
def test_many_layers_all_pairs_block(variant):
    """66 layers: the staged products take the layers in two blocks of 64, the second one ragged."""
    n_layers = 66
    widths = [16 + (a % 3) for a in range(n_layers)]
    rows = _layers(20, widths, torch.float16, seed=7)
    pairs = torch.tensor([[a, b] for a in range(n_layers) for b in {a, n_layers - 1 - a, 0}])
    got = VARIANTS[variant](rows, None, kernel="linear", gammas=None, pairs=pairs)
    _assert_matches_oracle(got, rows, None, "linear", None, pairs, split=variant == "slabs")


def test_single_layer_no_pairs_and_no_tokens():
    rows = _layers(9, [16], torch.float32, seed=8)
    no_pairs = torch.zeros(0, 2, dtype=torch.int64)
    got = VARIANTS["auto"](rows, None, kernel="linear", gammas=None, pairs=no_pairs)
    _assert_matches_oracle(got, rows, None, "linear", None, no_pairs)
    empty = triton_cka.kernel_sums(
        _layers(0, [16, 8], torch.float32, seed=9), None, kernel="rbf", gammas=[1.0, 1.0], pairs=torch.tensor([[0, 1]])
    )
    assert empty.frob.tolist() == [0.0] and empty.row_sums.shape == (2, 0) and empty.col_sums.shape == (2, 0)


@pytest.mark.parametrize("width", [40, 72])
def test_all_pairs_variant_follows_the_width(monkeypatch, width):
    """all_pairs_kernel_sums takes the slab path from SLAB_MIN_WIDTH (after padding to 16) on, the
    persistent kernel below it; both give the oracle's sums."""
    monkeypatch.setattr(triton_cka, "SLAB_MIN_WIDTH", 64)
    calls = []
    for name in ("_run_slabs", "_run_persistent"):
        original = getattr(triton_cka, name)
        monkeypatch.setattr(triton_cka, name, lambda p, b, f=original, n=name: calls.append(n) or f(p, b))
    rows = _layers(21, [width, width - 3], torch.float32, seed=11)
    pairs = torch.tensor([[0, 1]])
    got = _uncentred(triton_cka.all_pairs_kernel_sums)(
        rows, None, kernel="rbf", gammas=_gammas([width] * 2), pairs=pairs
    )
    _assert_matches_oracle(got, rows, None, "rbf", _gammas([width] * 2), pairs)
    assert calls == (["_run_slabs"] if width > 64 else ["_run_persistent"])


def test_slab_sizes():
    """GPU slab sizes: the target case (80 layers, 16k tokens) takes 512-token slabs (3% of the work in
    whole diagonal blocks) and 12800-column chunks (an fp32 stage of 2 GB); the interpreter uses 16."""
    assert slabs.slab_size(80, 16384, True, interpreting=False) == 512
    assert slabs.chunk_size(80, 512) == 12800
    assert slabs.slab_size(80, 4096, True, interpreting=False) == 128
    assert slabs.slab_size(80, 700, False, interpreting=False) == 1024
    assert slabs.slab_size(2, 700, True, interpreting=True) == 16


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rectangular"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tile_sizes_in_the_interpreter(symmetric, dtype):
    """The all-pairs paths at the tile sizes a GPU runs (persistent: 128-token tiles; slabs: the GPU's
    slab and chunk and 32 x 128 epilogue tiles), n = 700 (+ 301 columns), d = 264, in the interpreter."""
    widths = [264, 264, 250]
    rows = _layers(700, widths, dtype, seed=12)
    cols = None if symmetric else _layers(301, widths, dtype, seed=13)
    gammas = _gammas(widths)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 2]])
    split = dtype != torch.float32
    got = VARIANTS["persistent"](rows, cols, kernel="rbf", gammas=gammas, pairs=pairs, block_size=128)
    _assert_matches_oracle(got, rows, cols, "rbf", gammas, pairs, block=128)
    zeros = [torch.zeros(w) for w in widths]
    p = triton_cka._prepare(rows, cols, "rbf", gammas, pairs, zeros)
    # The GPU's slab and epilogue tile (the epilogue kernel still runs in the interpreter)
    slab = slabs.slab_size(len(widths), 700, symmetric, interpreting=False)
    got = slabs.all_pairs_slabs(
        p.rows,
        p.cols,
        p.row_norms,
        p.col_norms,
        p.scales,
        p.pairs,
        p.symmetric,
        slab=slab,
        gram_into=triton_cka.triton_slabs.gram_into,
        epilogue=triton_cka.triton_slabs.epilogue,
    )
    _assert_matches_oracle(got, rows, cols, "rbf", gammas, pairs, block=128, split=split)


def test_symmetric_rbf_diagonal_is_exact():
    """Same token on both sides: distance exactly 0, whatever |x|^2 + |x|^2 - 2 x.x rounds to. Far-apart
    rows with large norms make the rounding residue large and the off-diagonal values 0, so K = I."""
    x = 100 + torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    got = triton_cka.kernel_sums([x.to(DEVICE)], None, kernel="rbf", gammas=[10.0], pairs=torch.tensor([[0, 0]]))
    assert got.frob.item() == 16.0
    assert got.row_sums.tolist() == [[1.0] * 16]


def test_variant_choice():
    items = triton_cka._band_items(4, [(1, 0), (1, 2), (2, 2), (0, 1)])
    assert items == [
        triton_cka._BandItem(0, 1, True, True),
        triton_cka._BandItem(1, 2, False, True),
        triton_cka._BandItem(3, None, True, False),
    ]
    assert triton_cka._band_gemms(items) == 5
    # The sliding search's case (two layers, one pair) is a band; a chain of three layers is not.
    assert triton_cka._band_gemms(triton_cka._band_items(2, [(0, 1)])) <= triton_cka.BAND_MAX_GEMMS_PER_LAYER * 2
    assert triton_cka._band_gemms(triton_cka._band_items(3, [(0, 1), (1, 2)])) > triton_cka.BAND_MAX_GEMMS_PER_LAYER * 3


def test_launch_options(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_cka._launch_options(torch.bfloat16)["UPCAST"] is True
    assert triton_cka._launch_options(torch.float16)["UPCAST"] is False
    assert triton_cka._input_precision(torch.float16) is None
    for setting, precision in [("tf32", "tf32"), ("ieee", "ieee"), ("none", "ieee")]:
        monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(fp32_precision=setting))
        assert triton_cka._input_precision(torch.float32) == precision


def test_unavailable_reason(monkeypatch):
    if torch.cuda.is_available():
        assert triton_cka.unavailable_reason("cuda") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_cka.unavailable_reason("cpu") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "interpreter" in triton_cka.unavailable_reason("cpu")
    with pytest.raises(InputError, match="cannot run"):
        load_backend("triton", "cpu")
    assert "CUDA device" in triton_cka.unavailable_reason("meta")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kernel": "laplace"}, "unknown kernel"),
        ({"gammas": None}, "one gamma per layer"),
        ({"gammas": [1.0, -1.0]}, "positive and finite"),
        ({"kernel": "linear"}, "takes no gammas"),
        ({"pairs": torch.tensor([[0, 2]])}, "index layers"),
        ({"pairs": torch.tensor([0, 1])}, r"\[P, 2\]"),
        ({"block_size": 48}, "token tile"),
        ({"cols": [torch.zeros(3, 16), torch.zeros(3, 9)]}, r"cols\[1\] has shape \(3, 9\); expected \[3, 8\]"),
        ({"cols": [torch.zeros(3, 16)]}, "rows hold 2 layers but cols hold 1"),
        ({"rows": []}, "at least one layer"),
        ({"rows": [torch.zeros(4, 16, dtype=torch.int32)] * 2}, "takes float32, bfloat16, float16$"),
    ],
)
def test_input_errors(change, message):
    args = {
        "rows": [torch.zeros(4, 16), torch.zeros(4, 8)],
        "cols": None,
        "kernel": "rbf",
        "gammas": [1.0, 1.0],
        "pairs": torch.tensor([[0, 1]]),
        "block_size": None,
    } | change
    rows = [r.to(DEVICE) for r in args.pop("rows")]
    cols = None if args["cols"] is None else [c.to(DEVICE) for c in args.pop("cols")]
    args.pop("cols", None)
    with pytest.raises(InputError, match=message):
        triton_cka.kernel_sums(rows, cols, **args)


# Compiles every autotuned configuration of every launch kind ahead of time for Ampere (sm_80) and
# Hopper (sm_90a) with Triton's own ptxas, no GPU needed, and fails on register spills (ptxas -v):
# catches what the interpreter accepts but the compiler does not, and configurations the autotuner
# could pick that would spill. Runs in child processes because the interpreter flag must be unset
# before triton is imported. Pointers, strides and widths are declared 16-aligned, as the backend's
# centred copies are (widths padded to 16).
_AOT_SCRIPT = """
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from slm_fast.kernels import triton_cka as T
from slm_fast.kernels import triton_slabs as S

arch = int(sys.argv[1])

def compile_kernel(fn, types, constexprs, num_warps, num_stages):
    names = fn.arg_names
    signature = {n: types(n) for n in names} | {n: "constexpr" for n in constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n.endswith("_ptr") or (n.startswith("stride") and "norm" not in n) or n in ("d", "d_a", "d_b")}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)

def spilled_bytes(compiled):
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        run = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True)
    log = run.stdout + run.stderr
    return sum(int(b) for b in re.findall(r"(\\d+) bytes spill (?:stores|loads)", log)), log

def tile_types(dtype):
    def types(name):
        if name in ("tile_i_ptr", "tile_j_ptr"):
            return "*i32"
        if name in ("xa_ptr", "ya_ptr", "xb_ptr", "yb_ptr", "x_ptr", "y_ptr"):
            return "*" + dtype
        if name.endswith("_ptr"):
            return "*fp32"
        if name.startswith("gamma") or name.startswith("scale"):
            return "fp32"
        return "i64" if name.startswith("stride") else "i32"
    return types

def check(what, kernel):
    global compiled
    spilled, log = spilled_bytes(kernel)
    assert spilled == 0, f"sm_{arch} {what}: {spilled} bytes spilled\\n{log}"
    compiled += 1

compiled = 0
# Band items (two layers, and one layer at the larger all-pairs tile); bf16 RBF symmetric is the
# heaviest of each (linear and rectangular tiles hold fewer values); fp32 (64-token tiles, its own
# configurations) with ieee and tf32 dots, one layer and two.
cases = [(c, "bf16", True, T.BAND_BLOCK_GPU, None) for c in T.TWO_LAYER_CONFIGS]
cases += [(T.ONE_LAYER_CONFIGS[0], "bf16", False, T.DEFAULT_BLOCK_GPU, None)]
cases += [(c, "fp32", two, T.FP32_BLOCK_GPU, precision)
          for c in T.FP32_CONFIGS for two in (False, True) for precision in ("ieee", "tf32")]
for config, dtype, two, block, precision in cases:
    constexprs = dict(RBF=True, SYMMETRIC=True, TWO_LAYERS=two, SUMS_A=True, SUMS_B=two, FROB=True,
                      BLOCK=block, INPUT_PRECISION=precision, UPCAST=False, **config.kwargs)
    kernel = compile_kernel(T._tile_pairs_kernel, tile_types(dtype), constexprs, config.num_warps, config.num_stages)
    check(f"band {dtype} two_layers={two} {config}", kernel)
# The persistent all-pairs kernel: bf16 at 128-token tiles, fp32 at 64 (ieee and tf32).
persistent = [(c, "bf16", T.DEFAULT_BLOCK_GPU, None) for c in T.ONE_LAYER_CONFIGS]
persistent += [(c, "fp32", T.FP32_BLOCK_GPU, p) for c in T.FP32_CONFIGS for p in ("ieee", "tf32")]
for config, dtype, block, precision in persistent:
    constexprs = dict(RBF=True, SYMMETRIC=True, BLOCK=block, INPUT_PRECISION=precision, UPCAST=False, **config.kwargs)
    kernel = compile_kernel(T._persistent_kernel, tile_types(dtype), constexprs, config.num_warps, config.num_stages)
    check(f"persistent {dtype} {config}", kernel)
# The slab path's epilogue (fp32 stage), its heaviest form, at the GPU's tile.
epilogue_types = lambda n: "*fp32" if n.endswith("_ptr") else "i32"
constexprs = dict(RBF=True, DIAGONAL=True, COL_SUMS=True, BLOCK_I=S.EPILOGUE_BLOCK_I, BLOCK_J=S.EPILOGUE_BLOCK_J)
check("epilogue", compile_kernel(S._epilogue_kernel, epilogue_types, constexprs, S.EPILOGUE_WARPS, 1))
frob_types = lambda n: {"n_layers": "i32"}.get(n, "*i32" if n.startswith("tile_") else "*fp32")
options = T._staged_frob_options(80)
check("staged frob", compile_kernel(T._staged_frob_kernel, frob_types,
                                    dict(TILE_ELEMS=128 * 128, SYMMETRIC=True, **options), 4, 3))
print("compiled without spills", compiled)
"""


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="this Triton has no NVIDIA backend"
)
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_without_spills(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", _AOT_SCRIPT, str(arch)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    band = len(triton_cka.TWO_LAYER_CONFIGS) + 1 + 4 * len(triton_cka.FP32_CONFIGS)
    persistent = len(triton_cka.ONE_LAYER_CONFIGS) + 2 * len(triton_cka.FP32_CONFIGS)
    expected = band + persistent + 2  # and the slab epilogue and the staged Frobenius kernel
    assert run.stdout.strip().endswith(f"compiled without spills {expected}")
