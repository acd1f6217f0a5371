"""Merge rules against a plain-numpy oracle, on synthetic blocks in fp32 and bf16."""

import numpy as np
import pytest
import torch
from merge_oracle import is_projection, numpy_oracle

from slm_fast.errors import CheckpointError, InputError
from slm_fast.merge import RULES, merge_window

NAMES = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "input_layernorm.weight", "mlp.down_proj.weight")


def make_blocks(count: int, dtype: torch.dtype, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {NAMES[0]: (8, 6), NAMES[1]: (8,), NAMES[2]: (6,), NAMES[3]: (6, 5)}
    return [{n: torch.randn(shapes[n], generator=gen).to(dtype) for n in NAMES} for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (1, 2), (0, 3), (2, 5)])
def test_rule_matches_numpy_oracle(rule, dtype, lo, hi):
    blocks = make_blocks(6, dtype)
    merged = merge_window(lambda i: blocks[i], lo, hi, rule, is_projection=is_projection)
    as_numpy = [{n: t.float().numpy() for n, t in b.items()} for b in blocks[lo : hi + 1]]
    expected = numpy_oracle(as_numpy, rule)
    for name in NAMES:
        assert merged[name].dtype == dtype, name
        want = torch.from_numpy(np.asarray(expected[name], dtype=np.float64))
        if rule.startswith("keep"):  # a selection: bit-identical to the chosen source tensor
            assert torch.equal(merged[name], want.to(dtype)), name
        else:  # float32 math rounded once to the source dtype: within one rounding of the exact value
            tolerance = 1e-5 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(merged[name].double(), want, rtol=tolerance, atol=tolerance)


def test_rules_differ_from_each_other():
    blocks = make_blocks(4, torch.float32)
    results = {r: merge_window(lambda i: blocks[i], 0, 3, r, is_projection=is_projection) for r in RULES}
    for a in RULES:
        for b in RULES:
            if a < b:
                assert any(not torch.equal(results[a][n], results[b][n]) for n in NAMES), (a, b)


def test_reference_degenerate_update_equals_keep_high_norms_low():
    """The reference's in-place loop (x <- x + (theta_k - x) over k = lo..hi on projections only)."""
    blocks = make_blocks(5, torch.float32)
    lo, hi = 1, 4
    merged_ref = {n: t.clone() for n, t in blocks[lo].items()}
    for name in NAMES:
        if is_projection(name):
            for k in range(lo, hi + 1):
                merged_ref[name] += blocks[k][name] - merged_ref[name]
    ours = merge_window(lambda i: blocks[i], lo, hi, "keep_high_norms_low", is_projection=is_projection)
    for name in NAMES:
        torch.testing.assert_close(ours[name], merged_ref[name], rtol=0, atol=1e-6)


def test_out_dtype_casts_after_float32_math():
    blocks = make_blocks(3, torch.float32)
    merged = merge_window(lambda i: blocks[i], 0, 2, "mean", is_projection=is_projection, out_dtype=torch.bfloat16)
    want = (sum(b[NAMES[0]] for b in blocks) / 3).to(torch.bfloat16)
    assert merged[NAMES[0]].dtype == torch.bfloat16
    torch.testing.assert_close(merged[NAMES[0]], want)


def test_bad_inputs():
    blocks = make_blocks(3, torch.float32)
    with pytest.raises(InputError, match="unknown merge rule 'avg'"):
        merge_window(lambda i: blocks[i], 0, 1, "avg", is_projection=is_projection)
    with pytest.raises(InputError, match="reversed"):
        merge_window(lambda i: blocks[i], 2, 1, "mean", is_projection=is_projection)
    blocks[1][NAMES[0]] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"self_attn\.q_proj\.weight.*block 0.*block 1"):
        merge_window(lambda i: blocks[i], 0, 2, "mean", is_projection=is_projection)
    del blocks[1][NAMES[0]]
    with pytest.raises(CheckpointError, match="different tensors"):
        merge_window(lambda i: blocks[i], 0, 2, "sum", is_projection=is_projection)
