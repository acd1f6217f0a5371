"""Benchmark of the streaming similarity engine (a script; every case runs in its own child process, so
that each peak RSS (VmHWM from /proc/self/status) belongs to that case alone).

Suites (`--suite`, repeatable; default all but `large`):
  rbf      exact RBF CKA, all pairs, with the tiled backend: L in {8, 32}, d in {576, 4096}, n from 2k up.
           GFLOP/s on the flops performed = 2 d L (kernel entries computed: tiles J >= I, diagonal
           blocks whole) / time, against torch.mm's GFLOP/s for X X^T ([n, d] @ [d, n], n capped at
           8192) timed in the same process, interleaved repeat by repeat with ours (the machine may be
           shared): medians of both and the median of the per-repeat ratios, from wall time and, in
           parentheses, from the process's CPU time (one thread: the time it actually ran, which
           discounts the time other jobs held the core).
  oracle   the n x n baseline (float64 Gram matrices of every layer, centred, Frobenius products) at the
           same shapes where its predicted peak stays under --oracle-limit-gb; elsewhere the peak is
           predicted from the fitted model. Also the largest n of each within --budget-gb (24 GB).
  linear   StreamingCKA, linear kernel, all pairs, chunks of 2048 tokens: tokens per second (state chosen
           by linear_state="auto", and once forced to feature state).
  keops    pykeops (if it imports) RBF row sums exp(-g |x_i - x_j|^2).sum(j) on the data of one layer,
           against the tiled backend's kernel sums of that layer.
  large    one run with n = 100k tokens (L = 8, d = 576) of exact RBF CKA.
  packages the CKA packages users reach for (pip install -e '.[bench]': pytorch-cka, ckatorch) on the same
           activations with an offset of 30: all-pairs linear unbiased CKA (the estimator both offer), their
           time, peak RSS, error against the float64 oracle next to ours, and their largest n within
           --budget-gb extrapolated from the peaks at two n. (torch-cka works only through forward hooks
           on models and averages minibatch estimates, so it cannot take the same activations.)

Inputs are float32 standard normal activations with a shared latent signal, seeded. Times are medians
over --repeats runs (1 for cases above 20 s). Threads: --threads (default 1). Results: a JSON line per
case on stdout and in --out, and a markdown table at the end.

    .venv/bin/python bench/bench_similarity.py --suite rbf --suite oracle --out /tmp/similarity.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30
BUDGET_BYTES_DEFAULT = 24e9


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_layers(n: int, d: int, layers: int, seed: int = 0) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 16, generator=generator)
    out = torch.empty(layers, n, d)
    for a in range(layers):
        mix = torch.randn(16, d, generator=generator) / 4
        out[a] = latent @ mix
        out[a] += torch.randn(n, d, generator=generator)
    return out


def median_time(run: Any, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if times[-1] > 20:
            break
    return statistics.median(times), times


# --------------------------------------------------------------------------- worker cases


def case_rbf(spec: dict) -> dict:
    """Exact RBF CKA, all pairs, tiled backend, interleaved with the same-shape GEMM: each repeat times
    X X^T ([n, d] @ [d, n], n capped at 8192 so the product fits) and then cka_matrix, so that both see
    the same state of a shared machine; the ratio of each pair's rates is reported with the medians."""
    import torch

    from slm_fast import cka_matrix
    from slm_fast.kernels import tiled

    n, d, layers = spec["n"], spec["d"], spec["L"]
    acts = make_layers(n, d, layers)
    base = rss_bytes("VmRSS")
    sigma = math.sqrt(2 * d)  # about the median distance of these activations
    tile = tiled.default_tile(layers, n, True, torch.device("cpu"))
    performed = 2 * d * layers * tiled.symmetric_entries(n, tile)  # Gram flops of the tiles J >= I
    gemm_n = min(n, 8192)
    x = acts[0, :gemm_n].contiguous()
    out = torch.empty(gemm_n, gemm_n)
    torch.mm(x, x.T, out=out)  # warm-up
    wall: dict[str, list[float]] = {"gemm": [], "ours": []}
    cpu: dict[str, list[float]] = {"gemm": [], "ours": []}

    def timed(name: str, run: Any) -> None:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall[name].append(time.perf_counter() - start_wall)
        cpu[name].append(time.process_time() - start_cpu)

    for _ in range(spec["repeats"]):
        timed("gemm", lambda: torch.mm(x, x.T, out=out))
        timed("ours", lambda: cka_matrix(acts, "rbf", sigma=sigma, backend="tiled"))
    gemm_flops = 2 * gemm_n * gemm_n * d

    def rates(times: dict[str, list[float]]) -> dict:
        ratios = [(performed / t) / (gemm_flops / g) for t, g in zip(times["ours"], times["gemm"], strict=True)]
        return {
            "gflops_performed": performed / statistics.median(times["ours"]) / 1e9,
            "gemm_gflops": gemm_flops / statistics.median(times["gemm"]) / 1e9,
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
        }

    return {
        "seconds": statistics.median(wall["ours"]),
        "times": wall["ours"],
        "gemm_times": wall["gemm"],
        "cpu_times": cpu["ours"],
        "gemm_cpu_times": cpu["gemm"],
        "tile": tile,
        "performed_gflop": performed / 1e9,
        "gemm_n": gemm_n,
        **rates(wall),
        "cpu": rates(cpu),
        "rss_after_inputs": base,
        "baseline_bytes": out.numel() * out.element_size(),  # the GEMM's output, part of this process's peak
    }


def oracle_cka(acts: Any, gamma: float) -> Any:
    """The n x n way: float64 RBF Gram matrix per layer, centred in place, Frobenius products."""
    import torch

    grams = []
    for x in acts:
        x = x.double()
        norms = x.square().sum(1)
        k = torch.addmm(norms[:, None] + norms[None, :], x, x.T, alpha=-2.0)
        k.clamp_(min=0).mul_(-gamma).exp_()
        k -= k.mean(0, keepdim=True)
        k -= k.mean(1, keepdim=True)
        grams.append(k)
    count = len(grams)
    hsic = torch.empty(count, count, dtype=torch.float64)
    for a in range(count):
        for b in range(a, count):
            hsic[a, b] = hsic[b, a] = torch.dot(grams[a].view(-1), grams[b].view(-1))
    scale = hsic.diagonal().sqrt()
    return hsic / (scale[:, None] * scale[None, :])


def case_oracle(spec: dict) -> dict:
    acts = make_layers(spec["n"], spec["d"], spec["L"])
    base = rss_bytes("VmRSS")
    gamma = 1 / (4 * spec["d"])
    median, times = median_time(lambda: oracle_cka(acts, gamma), spec["repeats"])
    return {"seconds": median, "times": times, "rss_after_inputs": base}


def case_linear_stream(spec: dict) -> dict:
    from slm_fast import StreamingCKA

    acts = make_layers(spec["n"], spec["d"], spec["L"])
    base = rss_bytes("VmRSS")

    states = []

    def run() -> None:
        stream = StreamingCKA(spec["L"], kernel="linear", backend="tiled", linear_state=spec.get("state", "auto"))
        for start in range(0, spec["n"], 2048):
            stream.update(acts[:, start : start + 2048])
        stream.compute()
        states.append(stream.state)

    median, times = median_time(run, spec["repeats"])
    state = states[-1]
    return {
        "seconds": median,
        "times": times,
        "tokens_per_s": spec["n"] / median,
        "state": state,
        "rss_after_inputs": base,
    }


def case_keops(spec: dict) -> dict:
    import torch

    from slm_fast.kernels import tiled

    x = make_layers(spec["n"], spec["d"], 1)[0].contiguous()
    gamma = 1 / (4 * spec["d"])
    result: dict[str, Any] = {}
    ours, ours_times = median_time(
        lambda: tiled.kernel_sums([x], None, kernel="rbf", gammas=[gamma], pairs=torch.tensor([[0, 0]])),
        spec["repeats"],
    )
    result.update(tiled_seconds=ours, tiled_times=ours_times)
    try:
        from pykeops.torch import LazyTensor
    except Exception as exc:  # report whatever stops pykeops from importing
        return {**result, "keops": f"import failed: {type(exc).__name__}: {exc}"}

    def keops_row_sums() -> Any:
        xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
        return (-gamma * ((xi - xj) ** 2).sum(-1)).exp().sum(dim=1)

    start = time.perf_counter()
    try:
        first = keops_row_sums()
    except Exception as exc:
        return {**result, "keops": f"first call failed: {type(exc).__name__}: {str(exc)[:400]}"}
    result["keops_first_call_seconds"] = time.perf_counter() - start  # includes the C++ compilation
    median, times = median_time(keops_row_sums, spec["repeats"])
    reference = tiled.kernel_sums([x], None, kernel="rbf", gammas=[gamma], pairs=torch.tensor([[0, 0]])).row_sums[0]
    error = float((first.double().view(-1) - reference).abs().max() / reference.abs().max())
    return {**result, "keops_seconds": median, "keops_times": times, "keops_rel_error": error}


def oracle_linear_unbiased(acts: Any) -> Any:
    """The n x n way in float64: unbiased linear HSIC (Song et al. 2012) of every pair, then CKA."""
    import torch

    grams = []
    for x in acts:
        x = x.double()
        k = x @ x.T
        k.fill_diagonal_(0)
        grams.append(k)
    n = grams[0].shape[0]
    sums = [k.sum() for k in grams]
    rows = [k.sum(1) for k in grams]
    count = len(grams)
    hsic = torch.empty(count, count, dtype=torch.float64)
    for a in range(count):
        for b in range(a, count):
            value = (
                (grams[a] * grams[b]).sum() + sums[a] * sums[b] / ((n - 1) * (n - 2)) - 2 * rows[a] @ rows[b] / (n - 2)
            )
            hsic[a, b] = hsic[b, a] = value / (n * (n - 3))
    scale = hsic.diagonal().sqrt()
    return hsic / (scale[:, None] * scale[None, :])


def package_cka(package: str) -> Any:
    """A function acts -> [L, L] linear unbiased CKA of all layer pairs by one of the CKA packages users
    reach for (imported here, outside the timed call)."""
    import torch

    if package == "pytorch-cka":
        from cka import cka_from_features

        return lambda acts: cka_from_features(acts, acts)
    if package == "ckatorch":
        from ckatorch.core import cka_base

        def all_pairs(acts: Any) -> Any:
            count = acts.shape[0]
            out = torch.empty(count, count, dtype=torch.float64)
            for a in range(count):
                for b in range(a, count):
                    out[a, b] = out[b, a] = cka_base(acts[a], acts[b], kernel="linear", unbiased=True)
            return out

        return all_pairs
    raise ValueError(package)


def case_package(spec: dict) -> dict:
    """One package's all-pairs linear unbiased CKA (the one estimator both packages offer) on activations
    with a shared offset of 30, as residual streams carry: its time and peak RSS (read before anything
    else runs in this process), then ours (tiled) and the float64 n x n oracle on the same values."""
    from slm_fast import cka_matrix

    acts = make_layers(spec["n"], spec["d"], spec["L"]) + 30.0
    base = rss_bytes("VmRSS")
    try:
        run = package_cka(spec["package"])
    except ImportError as exc:
        return {"package_error": f"not installed ({exc}); pip install -e '.[bench]'"}
    start = time.perf_counter()
    theirs = run(acts)
    seconds = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    start = time.perf_counter()
    ours = cka_matrix(acts, "linear", unbiased=True, backend="tiled")
    ours_seconds = time.perf_counter() - start
    want = oracle_linear_unbiased(acts)
    return {
        "seconds": seconds,
        "package_peak_rss": peak,
        "rss_after_inputs": base,
        "ours_seconds": ours_seconds,
        "package_max_error": float((theirs.double() - want).abs().max()),
        "ours_max_error": float((ours - want).abs().max()),
        "oracle_cka_0_1": float(want[0, 1]),
    }


def package_largest_n(results: list[dict], package: str, layers: int, d: int, budget: float) -> dict:
    """Largest n of a package within `budget`, extrapolated from its two measured peaks: the inputs
    (4 n d L bytes) plus a fixed part plus a part quadratic in n (its n x n Gram matrices)."""
    runs = sorted(
        (r for r in results if r.get("case") == "package" and r.get("package") == package and "package_peak_rss" in r),
        key=lambda r: r["n"],
    )
    if len(runs) < 2:
        return {"case": "largest_n_package", "package": package, "n": None}
    small, big = runs[0], runs[-1]
    extra = [r["package_peak_rss"] - 4 * r["n"] * d * layers for r in (small, big)]
    per_square = max(1e-9, (extra[1] - extra[0]) / (big["n"] ** 2 - small["n"] ** 2))
    fixed = extra[1] - per_square * big["n"] ** 2
    n = largest_n(lambda n: fixed + per_square * n * n + 4 * n * d * layers, budget)
    return {"case": "largest_n_package", "package": package, "L": layers, "d": d, "n": n, "bytes_per_n2": per_square}


CASES = {
    "rbf": case_rbf,
    "oracle": case_oracle,
    "linear": case_linear_stream,
    "keops": case_keops,
    "package": case_package,
}


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    result = CASES[spec["case"]](spec)
    result.update(spec)
    result["peak_rss"] = rss_bytes("VmHWM")
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- driver


def run_case(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "SLM_FAST_THREADS": str(spec["threads"]), "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {**spec, "error": (done.stderr or done.stdout)[-800:]}


def oracle_bytes(n: int, layers: int) -> float:
    """Peak model of the n x n oracle: L float64 n x n Gram matrices plus two n x n temporaries."""
    return (layers + 2) * n * n * 8.0


def largest_n(bytes_at: Any, budget: float) -> int:
    low, high = 1, 1
    while bytes_at(high) <= budget:
        high *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if bytes_at(middle) <= budget else (low, middle)
    return low


def ours_largest_n(results: list[dict], layers: int, d: int, budget: float) -> dict:
    """Largest n of the tiled engine within `budget`, from its measured peaks: the fp32 inputs (4 d L
    bytes a token) plus the measured growth of the rest per token, plus its fixed part (process baseline
    and tile workspace)."""
    runs = sorted(
        (r for r in results if r.get("case") == "rbf" and (r["L"], r["d"]) == (layers, d) and "peak_rss" in r),
        key=lambda r: r["n"],
    )
    if len(runs) < 2:
        return {"case": "largest_n_ours", "L": layers, "d": d, "ours": None}
    small, big = runs[0], runs[-1]
    # peak less the inputs and less the baseline GEMM's output, which the same process held
    extra = [r["peak_rss"] - r.get("baseline_bytes", 0) - 4 * r["n"] * d * layers for r in (small, big)]
    per_token = max(0.0, (extra[1] - extra[0]) / (big["n"] - small["n"]))
    fixed = extra[1] - per_token * big["n"]
    ours = int((budget - fixed) / (4 * d * layers + per_token))
    return {"case": "largest_n_ours", "L": layers, "d": d, "ours": ours, "bytes_per_token": 4 * d * layers + per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--suite", action="append", choices=["rbf", "oracle", "linear", "keops", "large", "packages"])
    parser.add_argument("--sizes", default="2048,4096,8192", help="token counts n of the rbf and oracle suites")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32], help="layer counts L of rbf and oracle")
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 4096], help="widths d of rbf and oracle")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--oracle-limit-gb", type=float, default=5.0, help="run the oracle only below this peak")
    parser.add_argument("--budget-gb", type=float, default=24.0, help="memory budget of the largest-n figures")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    suites = args.suite or ["rbf", "oracle", "linear", "keops"]
    sizes = [int(s) for s in args.sizes.split(",")]
    common = {"threads": args.threads, "repeats": args.repeats}
    results = []

    def record(spec: dict) -> dict:
        result = run_case({**common, **spec}, args.timeout)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
        return result

    shapes = [(layers, d) for layers in args.layers for d in args.widths]
    if "rbf" in suites:
        for layers, d in shapes:
            for n in sizes:
                record({"case": "rbf", "n": n, "d": d, "L": layers})
    if "oracle" in suites:
        for layers, d in shapes:
            for n in sizes:
                predicted = oracle_bytes(n, layers)
                if predicted <= args.oracle_limit_gb * 1e9:
                    record({"case": "oracle", "n": n, "d": d, "L": layers, "predicted_bytes": predicted})
                else:
                    results.append({"case": "oracle", "n": n, "d": d, "L": layers, "predicted_bytes": predicted})
            budget = args.budget_gb * 1e9
            results.append(
                {
                    "case": "largest_n",
                    "L": layers,
                    "d": d,
                    "oracle": largest_n(lambda n, L=layers: oracle_bytes(n, L), budget),
                }
            )
    if "rbf" in suites:
        for layers, d in shapes:
            results.append(ours_largest_n(results, layers, d, args.budget_gb * 1e9))
    if "linear" in suites:
        record({"case": "linear", "n": 16384, "d": 576, "L": 32})
        record({"case": "linear", "n": 16384, "d": 576, "L": 32, "state": "features"})
        record({"case": "linear", "n": 8192, "d": 4096, "L": 8})
        record({"case": "linear", "n": 65536, "d": 576, "L": 8})
    if "packages" in suites:
        for package, sizes_of_package in (("pytorch-cka", (1024, 2048)), ("ckatorch", (512, 1024))):
            for n in sizes_of_package:
                record({"case": "package", "package": package, "n": n, "d": 576, "L": 8, "repeats": 1})
            results.append(package_largest_n(results, package, 8, 576, args.budget_gb * 1e9))
    if "keops" in suites:
        for d in (576, 4096):
            record({"case": "keops", "n": 4096, "d": d, "L": 1})
    if "large" in suites:
        record({"case": "rbf", "n": 100_000, "d": 576, "L": 8, "repeats": 1})
    print_table(results)


def print_table(results: list[dict]) -> None:
    mib = 2**20
    print(
        "\n| case | L | d | n | median s | GFLOP/s performed | GEMM GFLOP/s (same run) | ratio (median of pairs) "
        "| peak RSS MiB | above inputs MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("case") not in ("rbf", "oracle", "linear", "keops") or "L" not in r:
            continue
        if "error" in r:
            print(f"| {r['case']} | {r['L']} | {r['d']} | {r['n']} | error: {r['error'][:80]} |")
            continue
        if "seconds" not in r and "tiled_seconds" not in r:
            predicted = r["predicted_bytes"] / mib
            print(f"| {r['case']} | {r['L']} | {r['d']} | {r['n']} | not run | | | | predicted {predicted:.0f} | |")
            continue
        seconds = r.get("seconds", r.get("tiled_seconds"))
        if r["case"] == "rbf":
            on_cpu = r["cpu"]
            rates = (
                f"{r['gflops_performed']:.1f} ({on_cpu['gflops_performed']:.1f}) | {r['gemm_gflops']:.1f} "
                f"({on_cpu['gemm_gflops']:.1f}) | {r['ratio_median']:.2f} ({on_cpu['ratio_median']:.2f})"
            )
        else:
            rates = " | | "
        above = (r["peak_rss"] - r["rss_after_inputs"]) / mib if "rss_after_inputs" in r else float("nan")
        print(
            f"| {r['case']} | {r['L']} | {r['d']} | {r['n']} | {seconds:.3f} | {rates} | "
            f"{r['peak_rss'] / mib:.0f} | {above:.0f} |"
        )
    for r in results:
        if r.get("case") == "largest_n":
            print(f"largest n within budget, n x n oracle (model), L={r['L']} d={r['d']}: {r['oracle']}")
        if r.get("case") == "largest_n_ours":
            print(f"largest n within budget, tiled fp32 inputs (measured fit), L={r['L']} d={r['d']}: {r['ours']}")
        if r.get("case") == "linear" and "tokens_per_s" in r:
            print(
                f"linear stream L={r['L']} d={r['d']} n={r['n']}: {r['tokens_per_s']:.0f} tokens/s ({r['state']} state)"
            )
        if r.get("case") == "package" and "seconds" in r:
            print(
                f"{r['package']} L={r['L']} d={r['d']} n={r['n']}: {r['seconds']:.2f} s, peak RSS "
                f"{r['package_peak_rss'] / mib:.0f} MiB; max |CKA - oracle| {r['package_max_error']:.1e} (ours "
                f"{r['ours_max_error']:.1e} in {r['ours_seconds']:.2f} s)"
            )
        if r.get("case") == "largest_n_package":
            print(f"largest n within budget, {r['package']} (extrapolated from two measured peaks): {r['n']}")
        if r.get("case") == "keops":
            figures = {k: v for k, v in r.items() if "keops" in k or "tiled" in k}
            print(f"keops d={r['d']} n={r['n']}: {json.dumps(figures)}")


if __name__ == "__main__":
    main()
