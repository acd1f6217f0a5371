#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite with one torch thread. Extra arguments go to
# pytest, e.g. `scripts/test.sh -m slow` for the tests on the real SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export SLM_FAST_THREADS=1 OMP_NUM_THREADS=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
