"""Every CUDA source in csrc/ compiles with plain nvcc for Ampere (sm_80), Hopper (sm_90) and as PTX
(compute_90), and the device code links against cuBLASLt (scripts/check_cuda_compiles.sh); needs nvcc,
torch's headers and cuBLASLt (the toolkit's or the nvidia-cublas wheel of the dev extra), no GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA compile check needs it")
def test_cuda_sources_compile_for_sm80_sm90_and_ptx():
    run = subprocess.run(
        [str(ROOT / "scripts" / "check_cuda_compiles.sh")],
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    compiled = [line for line in run.stdout.splitlines() if line.startswith("nvcc ")]
    sources = sorted(ROOT.glob("csrc/*.cu")) + sorted(ROOT.glob("csrc/*.cpp"))
    assert len(compiled) == len(sources) > 0
    assert "device code links against cuBLASLt" in run.stdout
    assert run.stdout.strip().endswith("all CUDA sources compile for sm_80, sm_90 and compute_90 (PTX)")
