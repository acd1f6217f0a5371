"""cosine, angular_distance and block_influence: the cosine-based scores of SLM, Gromov et al. and
ShortGPT."""

from __future__ import annotations

import math

import pytest
import torch

from slm_fast import angular_distance, block_influence, cosine
from slm_fast.errors import InputError


def test_cosine_flattens_and_uses_float64() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    y = torch.tensor([[2.0, 0.0], [1.0, -1.0]])
    assert cosine(x, y.bfloat16()) == pytest.approx((2 + 0 + 3 - 4) / (math.sqrt(30) * math.sqrt(6)), rel=1e-12)
    big = torch.randn(3, 7, 11)
    assert cosine(big, big) == pytest.approx(1.0, abs=1e-12)
    assert cosine(big, -2 * big) == pytest.approx(-1.0, abs=1e-12)


def test_cosine_of_zero_is_nan_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match="zero vector"):
        assert math.isnan(cosine(torch.zeros(4), torch.ones(4)))


def test_angular_distance_per_token_and_last_token() -> None:
    e0, e1 = torch.eye(2)
    x = torch.stack([e0, e0, e0])[None]  # [1 sample, 3 tokens, 2]
    y = torch.stack([e0, e1, -e0])[None]
    assert angular_distance(x, y, token=None)[0].tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-7)
    assert angular_distance(x, y).tolist() == pytest.approx([1.0])
    assert angular_distance(x, y, token=1).shape == (1,)


def test_block_influence_reductions() -> None:
    e0, e1 = torch.eye(2)
    x_in = torch.stack([e0, e0, e0, e0])
    x_out = torch.stack([e0, e1, -e0, e0 + e1])  # 1 - cos: 0, 1, 2, 1 - 1/sqrt(2)
    per_token = [0.0, 1.0, 2.0, 1 - 1 / math.sqrt(2)]
    assert block_influence(x_in, x_out, "none").tolist() == pytest.approx(per_token)
    assert float(block_influence(x_in, x_out)) == pytest.approx(sum(per_token) / 4)
    assert float(block_influence(x_in[None], x_out[None], "sum")) == pytest.approx(sum(per_token))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cosine(torch.ones(3), torch.ones(4)), "one shape"),
        (lambda: cosine(torch.tensor([1.0, math.nan]), torch.ones(2)), "cosine: x holds NaN"),
        (lambda: angular_distance(torch.ones(3), torch.ones(3)), r"\[\.\.\., tokens, d\]"),
        (lambda: block_influence(torch.ones(2, 3), torch.ones(2, 3), "max"), "reduction must be"),
        (lambda: block_influence(torch.ones(2, 3), torch.full((2, 3), math.inf)), "second input holds NaN or Inf"),
    ],
)
def test_bad_input(call, message: str) -> None:
    with pytest.raises(InputError, match=message):
        call()
