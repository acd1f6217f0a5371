"""GPU benchmark of the kernel-sums backends (tiled torch, Triton, CUDA C++) for streaming RBF CKA.

Every figure is a rate on the flops actually performed: the Gram flops 2 d L of each kernel entry
computed, and the symmetric pass computes only the tiles J >= I (diagonal tiles whole, so
tiled.symmetric_entries(n, tile) entries per layer, with the tile each backend uses). Each rate is set
against torch's bf16 GEMM rate for X X^T of the same [n, d] shape, measured in the same run.

1. throughput: the fused RBF kernel sums of L = 2 bf16 layers (the sliding search's case: one cross
   pair, symmetric) at d = 8192 (--quick: 4096). The target is at least half of the GEMM rate.
2. largest n at d = 8192 (Llama-70B width), L = 2: n doubles from --start-n until the device runs out
   of memory or the next run would exceed --max-seconds (predicted as 4x the last one).
3. all pairs of 80 layers at n = 16384 tokens, d = 8192 (the issue's target: >= 50% of the bf16 peak
   on the flops performed; --quick: n = 2048, tiled left out), with the same-run GEMM rate and the
   device's bf16 peak.

    python bench/bench_gpu_kernels.py [--quick] [--backends tiled triton cuda] [--json out.json]

--quick finishes in about three minutes on an H100/H200 (Triton's autotuning included). On a machine
without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from slm_fast.kernels import BACKEND_MODULES, slabs, tiled

TFLOP = 1e12


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up run (compilation, autotuning)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layers(n_layers: int, n: int, d: int) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(n_layers)]


def _rbf_call(module, layers: list[torch.Tensor], pairs: torch.Tensor) -> Callable[[], object]:
    gammas = [1.0 / (2.0 * x.shape[1]) for x in layers]
    return lambda: module.kernel_sums(layers, None, kernel="rbf", gammas=gammas, pairs=pairs)


def _backends(names: list[str]) -> dict[str, object]:
    modules = {}
    for name in names:
        try:
            module = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as exc:
            print(f"  {name}: not importable ({exc})")
            continue
        reason = module.unavailable_reason("cuda")
        if reason is None:
            modules[name] = module
        else:
            print(f"  {name}: skipped ({reason})")
    return modules


def _free_memory() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _tile(name: str, module: object, n_layers: int, n: int, d: int, band: bool) -> int:
    """The token tile the backend uses for this symmetric bf16 call (see each backend's kernel_sums):
    for the all-pairs variants of Triton and CUDA from SLAB_MIN_WIDTH on, the row slab of the GEMM path."""
    if name == "tiled":
        return tiled.default_tile(n_layers, n, True, torch.device("cuda"), element_bytes=4)
    if not band and d >= module.SLAB_MIN_WIDTH:
        return slabs.slab_size(n_layers, n, True, interpreting=False)
    if name == "triton":
        return module.BAND_BLOCK_GPU if band else module.DEFAULT_BLOCK_GPU
    return module.BLOCK


# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), TFLOP/s, by device-name substring.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.5, "A100": 312.0}


def _bf16_peak() -> float | None:
    name = torch.cuda.get_device_name()
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def _performed_flops(d: int, n_layers: int, n: int, tile: int) -> float:
    return 2.0 * d * n_layers * tiled.symmetric_entries(n, tile)


def _gemm_tflops(n: int, d: int, repeats: int) -> float:
    """bf16 X X^T of the [n, d] shape (n capped at 32768 so the product fits), TFLOP/s."""
    n = min(n, 32768)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    seconds = _seconds(lambda: x @ x.T, repeats)
    x.resize_(0)  # free the operand before the next measurement
    _free_memory()
    return 2 * n * n * d / seconds / TFLOP


def throughput(backends: dict[str, object], sizes: list[int], d: int, repeats: int) -> list[dict]:
    results = []
    for n in sizes:
        gemm = _gemm_tflops(n, d, repeats)
        layers = _layers(2, n, d)
        row = {"n": n, "d": d, "layers": 2, "gemm_bf16_tflops": gemm, "backends": {}}
        for name, module in backends.items():
            _free_memory()
            seconds = _seconds(_rbf_call(module, layers, torch.tensor([[0, 1]])), repeats)
            tile = _tile(name, module, 2, n, d, band=True)
            rate = _performed_flops(d, 2, n, tile) / seconds / TFLOP
            row["backends"][name] = {
                "seconds": seconds,
                "tile": tile,
                "tflops_performed": rate,
                "fraction_of_gemm": rate / gemm,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
            print(
                f"  n={n:>7} d={d}: {name:>6} {seconds * 1e3:9.2f} ms  {rate:7.1f} TFLOP/s performed"
                f"  = {rate / gemm:5.2f} x GEMM bf16 ({gemm:.1f} TFLOP/s)"
            )
        results.append(row)
        del layers
        _free_memory()
    return results


def largest_n(backends: dict[str, object], d: int, start_n: int, max_seconds: float) -> dict[str, dict]:
    results = {}
    for name, module in backends.items():
        n, best = start_n, None
        while True:
            try:
                _free_memory()
                layers = _layers(2, n, d)
                seconds = _seconds(_rbf_call(module, layers, torch.tensor([[0, 1]])), repeats=1)
            except torch.cuda.OutOfMemoryError:
                print(f"  {name:>6}: out of memory at n={n}")
                break
            finally:
                layers = None
            tile = _tile(name, module, 2, n, d, band=True)
            best = {"n": n, "seconds": seconds, "tflops_performed": _performed_flops(d, 2, n, tile) / seconds / TFLOP}
            print(f"  {name:>6}: n={n:>8} d={d} in {seconds:8.2f} s")
            if 4 * seconds > max_seconds:
                break
            n *= 2
        results[name] = best
        _free_memory()
    return results


def all_pairs(backends: dict[str, object], n_layers: int, n: int, d: int) -> dict[str, dict]:
    """RBF CKA sums of all n_layers (n_layers + 1) / 2 pairs, symmetric, bf16: the rate on the Gram
    flops performed, against the same-run cuBLAS bf16 GEMM and the device's bf16 peak. The L x L
    Frobenius products and the epilogue are not counted as flops (they are the overhead measured)."""
    peak = _bf16_peak()
    results = {"gemm_bf16_tflops": _gemm_tflops(n, d, 3), "bf16_peak_tflops": peak}
    print(f"  same-run GEMM bf16 {results['gemm_bf16_tflops']:.1f} TFLOP/s; device bf16 peak {peak} TFLOP/s")
    layers = _layers(n_layers, n, d)
    pairs = torch.tensor([[a, b] for a in range(n_layers) for b in range(a, n_layers)])
    for name, module in backends.items():
        try:
            _free_memory()
            seconds = _seconds(_rbf_call(module, layers, pairs), repeats=1)
        except torch.cuda.OutOfMemoryError:
            print(f"  {name:>6}: out of memory")
            continue
        tile = _tile(name, module, n_layers, n, d, band=False)
        flops = _performed_flops(d, n_layers, n, tile)
        rate = flops / seconds / TFLOP
        results[name] = {
            "seconds": seconds,
            "tile": tile,
            "flops_performed": flops,
            "tflops_performed": rate,
            "fraction_of_gemm": rate / results["gemm_bf16_tflops"],
            "fraction_of_peak": None if peak is None else rate / peak,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        of_peak = "" if peak is None else f" = {100 * rate / peak:.1f}% of bf16 peak"
        print(
            f"  {name:>6}: {n_layers} layers, {len(pairs)} pairs, n={n} d={d} in {seconds:.2f} s, "
            f"{flops / 1e15:.1f} PFLOP performed, {rate:.1f} TFLOP/s = "
            f"{rate / results['gemm_bf16_tflops']:.2f} x GEMM bf16{of_peak}"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKEND_MODULES), choices=list(BACKEND_MODULES))
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test of the benchmark")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time cap of one run in the n sweep")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu_kernels: no CUDA device is visible to torch; this benchmark needs a GPU (nothing run)")
        return 0
    d = 4096 if args.quick else 8192
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    backends = _backends(args.backends)
    if not backends:
        print("no backend can run on this device")
        return 1
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "d": d}
    print("1. throughput (RBF, 2 layers, 1 cross pair, bf16)")
    report["throughput"] = throughput(backends, [8192, 16384] if args.quick else [8192, 16384, 32768], d, args.repeats)
    print("2. largest n")
    report["largest_n"] = largest_n(backends, d, 32768, 10.0 if args.quick else args.max_seconds)
    # The target case: 80 layers, d = 8192, n = 16384 (about 176 PFLOP performed, minutes a backend);
    # --quick keeps L and d at n = 2048 and leaves out tiled (fp32 GEMMs on CUDA cores).
    n_layers, n, d_all = (80, 2048, 8192) if args.quick else (80, 16384, 8192)
    print(f"3. all pairs (L = {n_layers}, n = {n}, d = {d_all}, bf16)")
    chosen = {k: v for k, v in backends.items() if not (args.quick and k == "tiled")}
    report["all_pairs"] = all_pairs(chosen, n_layers, n, d_all)
    report["all_pairs_shape"] = {"layers": n_layers, "n": n, "d": d_all}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
