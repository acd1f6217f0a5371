"""Choosing the compensation's settings on validation text only: for one pruned selection (read from a
`slm-fast prune` report), fit `--compensate linear` at several ridges and calibration sizes and score
each on the validation corpora of bench/quality_protocol.py (never the held-out ones).

    PYTHONPATH=. python bench/compensation_sweep.py --model /work/wt/smollm2 --report OUT/slm_report.json \
        --ridges 1e-3 1e-2 1e-1 --samples 10 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from quality_protocol import VALIDATION, window_nlls

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.compensate import fit_linear
from slm_fast.export import export_merged_checkpoint
from slm_fast.prune import PruneOptions, calibration_ids
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.windows import output_blocks


def validation(model: Path, windows: int) -> float:
    return statistics.fmean(statistics.fmean(window_nlls(model, corpus, windows)) for corpus in VALIDATION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True, help="slm_report.json of the selection")
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--samples", type=int, nargs="+", default=[10])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--results", type=Path, default=Path("bench/compensation_sweep.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = json.loads(args.report.read_text())
    reader = CheckpointReader(args.model)
    plan = output_blocks([tuple(w) for w in report["windows"]], reader.num_blocks, report["dropped"])
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    key = f"{report['method']} {report['windows']} drop {report['dropped']}"
    rows = results.setdefault(key, {})
    with tempfile.TemporaryDirectory() as scratch:
        if "none" not in rows:
            export_merged_checkpoint(reader, Path(scratch) / "plain", [tuple(w) for w in report["windows"]],
                                     dropped=report["dropped"], rule=report["rule"], progress=False)  # fmt: skip
            rows["none"] = {"validation": validation(Path(scratch) / "plain", args.windows)}
        for samples in args.samples:
            options = replace(PruneOptions(remove=0), n_samples=samples)
            ids = calibration_ids(reader.folder, options)
            runner, cache = BlockRunner(reader, block_budget_bytes=10**9), HiddenStateCache()
            calibrate(runner, ids, cache, progress=False)
            for ridge in args.ridges:
                name = f"samples {samples} ridge {ridge:g}"
                if name in rows:
                    continue
                tick = time.perf_counter()
                fitted = fit_linear(runner, cache, plan, rule=report["rule"], ridge=ridge, progress=False)
                seconds = time.perf_counter() - tick
                out = Path(scratch) / name.replace(" ", "_")
                export_merged_checkpoint(reader, out, [tuple(w) for w in report["windows"]], dropped=report["dropped"],
                                         rule=report["rule"], progress=False, block_transform=fitted.fold)  # fmt: skip
                rows[name] = {"validation": validation(out, args.windows), "fit_seconds": seconds,
                              "fits": fitted.to_json()["spans"]}  # fmt: skip
                print(f"{name}: validation {rows[name]['validation']:.4f} (none: {rows['none']['validation']:.4f})",
                      flush=True)  # fmt: skip
                args.results.write_text(json.dumps(results, indent=1) + "\n")
            cache.close()
    args.results.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
