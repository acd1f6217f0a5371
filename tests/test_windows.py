import pytest

from slm_fast.errors import WindowError
from slm_fast.windows import format_windows, output_blocks, parse_windows


def test_parse_and_plan():
    windows = parse_windows("20-23, 10-12,5")
    assert windows == [(20, 23), (10, 12), (5, 5)]
    plan = output_blocks(windows, 25)
    assert plan[:6] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
    assert (10, 12) in plan and (20, 23) in plan and (11, 11) not in plan
    assert len(plan) == 25 - 2 - 3
    assert [lo for lo, _ in plan] == sorted(lo for lo, _ in plan)
    assert format_windows([(1, 2), (5, 9)]) == "1-2,5-9"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3-1", "window 3-1 is reversed"),
        ("0-30", r"out of range: blocks are 0\.\.29"),
        ("-1-2", "not of the form"),
        ("2-5,5-7", "windows 2-5 and 5-7 overlap"),
        ("a-b", "not of the form"),
        (",", "no windows"),
    ],
)
def test_bad_windows(text, message):
    with pytest.raises(WindowError, match=message):
        output_blocks(parse_windows(text), 30)


def test_dropped_blocks():
    assert output_blocks([(2, 4)], 8, dropped=[0, 6]) == [(1, 1), (2, 4), (5, 5), (7, 7)]
    with pytest.raises(WindowError, match="dropped block 3 lies inside a merge window"):
        output_blocks([(2, 4)], 8, dropped=[3])
    with pytest.raises(WindowError, match="dropped block 8 is out of range"):
        output_blocks([], 8, dropped=[8])
    with pytest.raises(WindowError, match="every block would be dropped"):
        output_blocks([], 2, dropped=[0, 1])
