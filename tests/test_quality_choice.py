"""bench/quality_choice.py: one configuration chosen over every (model, removal) cell, on validation only."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_choice as choice
from quality_protocol import HELD_OUT, VALIDATION


def row(validation: list[float], held_out: float = 0.0, **extra) -> dict:
    """A protocol row whose validation corpora both have these window NLLs."""
    return {"nll": {c: validation for c in VALIDATION} | {c: [held_out] * len(validation) for c in HELD_OUT}} | extra


def test_the_choice_is_lowest_on_average_over_cells_not_per_cell():
    # a wins the first model's cell by a little, b the second's by a lot: b is the choice
    first = {"dense": row([1, 1]), "4/a": row([2.0, 2.2]), "4/b": row([2.1, 2.3]), "4/c": row([9, 9])}
    second = {"dense": row([1, 1]), "4/a": row([3.0, 3.2]), "4/b": row([2.5, 2.6]), "6/a": row([4, 4])}
    assert choice.choose({"m1": first, "m2": second})["ranked"] == ["a"]  # the only one in every cell
    result = choice.choose({"m1": first, "m2": second}, candidates=["a", "b"])
    assert result["chosen"] == "b" and result["ranked"] == ["b", "a"] and result["skipped"] == [("m2", 6)]
    assert result["cell_winners"] == {("m1", 4): "a", ("m2", 4): "b"}
    mean, se = result["margins"]["a"]
    assert mean == pytest.approx((-0.1 - 0.1 + 0.5 + 0.6) / 4) and se > 0
    text = choice.markdown(result, {"m1": first, "m2": second})
    assert "**chosen**" in text and "Not used" in text and "- m1 -4, vs a: " in text


def test_the_overview_reports_held_out_perplexity_in_validation_order():
    tables = {
        "m": {
            "dense": row([1, 1], held_out=1.0),
            "4/a": row([2.0, 2.0], held_out=2.0, prune={"seconds": 12.4}),
            "4/b": row([3.0, 3.0], held_out=12.0, prune={"seconds": 3.0}),
        }
    }
    lines = choice.overview(tables, choice.choose(tables))
    assert lines[0] == "| configuration | m -4 |"
    assert lines[2] == "| dense | 2.7 / 2.7 |"
    assert lines[3] == "| **a** | 7.4 / 7.4 (12 s) |"
    assert lines[4] == "| b | 1.6e5 / 1.6e5 (3 s) |"


def test_held_out_and_healed_rows_play_no_part():
    results = {
        "4/a": row([2.0, 2.0], held_out=9.0),
        "4/b": row([2.1, 2.1], held_out=0.0),
        "4/a+lora": row([0.5, 0.5], heal={"mode": "lora"}),
    }
    assert choice.choose({"m": results})["chosen"] == "a"


def test_no_common_configuration_is_an_error():
    with pytest.raises(SystemExit, match="every cell"):
        choice.choose({"m1": {"4/a": row([1, 1])}, "m2": {"4/b": row([1, 1])}})
