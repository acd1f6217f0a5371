"""Host build of the CUDA kernels' tile math (csrc/cka_tile_math.h): csrc/tests/test_tile_math.cpp is
compiled with g++ and run; it checks the epilogue, the tile reductions and the launch planning
against straightforward loops over full kernel matrices."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed: the host test of csrc/ needs it")
def test_tile_math_on_the_host(tmp_path):
    binary = tmp_path / "test_tile_math"
    build = subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            str(CSRC / "tests" / "test_tile_math.cpp"),
            "-o",
            str(binary),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")
