#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 10 minutes on an H100/H200, printing the figures:
#   1. the GPU tests (pytest -m gpu);
#   2. an end-to-end prune of SmolLM2 on CUDA whose decisions must equal the CPU run's: fp32 with
#      room to spare, fp32 with a budget so small that most hidden states go to pinned host memory
#      (the path where a state from another tier meets states on the GPU), and bf16 compute
#      (--compute-dtype) of the fp32 checkpoint, which may differ (its windows are printed, not required);
#   3. the dry run beside the measured CUDA run (the cost model's time on a GPU);
#   4. the kernel benchmark in its quick mode.
# Usage: scripts/gpu_check.sh   (PYTHON, SMOLLM2 (checkpoint folder) and OUT_DIR override the defaults)
# PYTHON must see a CUDA build of torch with slm_fast importable: by default the first of .venv/bin/python
# (which scripts/setup.sh fills with the CPU wheel) and python3 whose torch sees a GPU.
# Exit status: 0 when every step passed and the CUDA decisions equal the CPU's, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    for candidate in .venv/bin/python python3; do
        if "$candidate" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
            PYTHON=$candidate
            break
        fi
    done
    PYTHON=${PYTHON:-python3}
fi
SMOLLM2=${SMOLLM2:-runs/smollm2}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t slm_fast_gpu_check.XXXXXX)}
failed=()

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)" || exit 1

echo "== 1/4 GPU tests"
if ! "$PYTHON" -c "import slm_fast._cuda" 2>/dev/null && command -v nvcc >/dev/null; then
    echo "-- building the CUDA extension in place for this GPU (its tests skip when this fails)"
    timeout 300 "$PYTHON" setup.py -q build_ext --inplace || echo "CUDA extension not built"
fi
timeout 420 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider || failed+=("pytest -m gpu")

echo "== 2/4 SmolLM2 prune on CUDA against the CPU"
if [ ! -f "$SMOLLM2/config.json" ]; then
    "$PYTHON" -m slm_fast assets smollm2 "$SMOLLM2" || { echo "cannot build SmolLM2 into $SMOLLM2"; exit 1; }
fi
common=(--remove 2 --samples 16 --seq-len 256 --micro-batch 4 --no-progress --overwrite)
run() {  # name, extra arguments...
    local name=$1; shift
    echo "-- $name"
    timeout 300 "$PYTHON" -m slm_fast prune "$SMOLLM2" "$OUT_DIR/$name" "${common[@]}" "$@" || failed+=("prune $name")
}
run cpu --device cpu
run cuda --device cuda
run cuda-tiers --device cuda --memory-budget 400MB
run cuda-bf16 --device cuda --compute-dtype bf16
"$PYTHON" - "$OUT_DIR" <<'PY' || failed+=("CUDA decisions differ from the CPU's")
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
reports = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/slm_report.json")}
for name, r in sorted(reports.items()):
    cost, mem = r["cost"], r["memory"]
    print(f"{name:11s} windows {r['windows']} similarity {r['similarity']:.6f} dtype {r['compute_dtype']} "
          f"calibrate {r['timings_s']['calibrate']:.1f} s search {r['timings_s']['search']:.1f} s "
          f"predicted/measured time {cost['predicted_over_measured']['seconds']:.2f} "
          f"spilled {cost['measured']['state_bytes_written'] / 1e9:.2f} GB peak tiers {cost['measured']['peak_state_bytes']} "
          f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB")
cpu = reports["cpu"]
bad = [n for n in ("cuda", "cuda-tiers") if reports[n]["windows"] != cpu["windows"]]
for n in ("cuda", "cuda-tiers", "cuda-bf16"):
    gap = max(abs(a["similarity"] - b["similarity"]) for a, b in zip(cpu["search"]["candidates"], reports[n]["search"]["candidates"]))
    print(f"{n}: largest |similarity - CPU's| over the candidates {gap:.2e}")
if bad:
    sys.exit(f"windows differ from the CPU run's: {bad}")
print("CUDA decisions equal the CPU's")
PY

echo "== 3/4 dry run (cost model) for the CUDA run above"
timeout 120 "$PYTHON" -m slm_fast prune "$SMOLLM2" "$OUT_DIR/dry" "${common[@]}" --device cuda --dry-run || failed+=("dry run")

echo "== 4/4 kernel benchmark (quick)"
timeout 240 "$PYTHON" bench/bench_gpu_kernels.py --quick || failed+=("kernel benchmark")

rm -rf "$OUT_DIR"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed"
