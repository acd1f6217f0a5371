"""`slm-fast similarity`: both activation layouts, the JSON report, the heat map and named errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from slm_fast import cka_matrix
from slm_fast.cli import main
from slm_fast.similarity import resolve_sigmas


def layers(n: int = 60, count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(n, 8, generator=generator)
    return [
        base @ torch.randn(8, 16, generator=generator) + (a + 1) * torch.randn(n, 16, generator=generator)
        for a in range(count)
    ]


def test_numbered_layers_rbf_with_plot(tmp_path) -> None:
    acts = layers()
    save_file({f"layers.{i}": x.bfloat16() for i, x in enumerate(acts)}, tmp_path / "acts.safetensors")
    out, plot = tmp_path / "sim.json", tmp_path / "heat.png"
    status = main(
        ["similarity", str(tmp_path / "acts.safetensors"), "--kernel", "rbf", "--out", str(out), "--plot", str(plot)]
    )
    assert status == 0
    report = json.loads(out.read_text())
    stored = [x.bfloat16() for x in acts]
    assert report["layout"] == "layers.{i}" and report["num_layers"] == 4 and report["num_tokens"] == 60
    assert report["sigma"] == pytest.approx(resolve_sigmas(stored), rel=1e-12)
    assert torch.allclose(torch.tensor(report["cka"], dtype=torch.float64), cka_matrix(stored, "rbf"), atol=1e-12)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_stacked_tensor_with_band_and_sigmas(tmp_path) -> None:
    save_file({"activations": torch.stack(layers())}, tmp_path / "acts.safetensors")
    out = tmp_path / "sim.json"
    argv = ["similarity", str(tmp_path / "acts.safetensors"), "--kernel", "rbf", "--sigma", "9,9,10,12"]
    assert main([*argv, "--band", "1", "--unbiased", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["layout"] == "activations" and report["pairs"] == {"band": 1} and report["sigma_rule"] == "given"
    cka = report["cka"]
    assert cka[0][2] is None and cka[3][0] is None and cka[1][2] is not None and cka[2][2] == 1.0
    want = cka_matrix(layers(), "rbf", [9.0, 9.0, 10.0, 12.0], unbiased=True)
    assert math.isclose(cka[0][1], float(want[0, 1]), abs_tol=1e-12)


def write(path, tensors: dict) -> str:
    save_file(tensors, path)
    return str(path)


@pytest.mark.parametrize(
    ("tensors", "extra", "message"),
    [
        ({"layers.0": torch.ones(5, 2), "layers.2": torch.ones(5, 2)}, [], "missing layers.1"),
        ({"layers.0": torch.ones(5, 2), "tokens": torch.ones(5)}, [], "unexpected tensor names ['tokens']"),
        ({"activations": torch.ones(5, 2)}, [], "'activations' has shape (5, 2), expected [L, n, d]"),
        ({"activations": torch.ones(1, 5, 2), "layers.0": torch.ones(5, 2)}, [], "use one layout only"),
        ({"layers.0": torch.ones(5, 2, 1)}, [], "'layers.0' has shape (5, 2, 1), expected [n, d]"),
        ({"layers.0": torch.randn(5, 2), "layers.1": torch.randn(4, 2)}, [], "layer 1 holds 4 tokens"),
        ({"layers.0": torch.randn(5, 2).index_fill(0, torch.tensor([3]), math.nan)}, [], "layer 0 holds NaN"),
        ({"layers.0": torch.randn(5, 2)}, ["--kernel", "rbf", "--sigma", "x"], "--sigma must be a float"),
        ({"layers.0": torch.randn(5, 2)}, ["--sigma", "1.0", "--kernel", "linear"], "apply to --kernel rbf only"),
        ({"layers.0": torch.randn(5, 2)}, ["--band", "-1"], "--band must be >= 0"),
    ],
)
def test_errors_name_the_file_and_tensor(tmp_path, capsys, tensors: dict, extra: list, message: str) -> None:
    path = write(tmp_path / "acts.safetensors", tensors)
    assert main(["similarity", path, "--out", str(tmp_path / "o.json"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_and_unreadable_files(tmp_path, capsys) -> None:
    assert main(["similarity", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o.json")]) == 2
    assert "none.safetensors: no such activations file" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    assert main(["similarity", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "o.json")]) == 2
    assert "junk.safetensors: not a readable safetensors file" in capsys.readouterr().err
