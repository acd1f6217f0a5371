"""The sliding-window search: reference parity against a whole-model reimplementation of SLM.py, the
fixed edge cases of the default mode, speculation, and the threshold search."""

import itertools

import pytest
import torch
from reference_slm import final_hidden, reference_slm
from test_export import merge_in_memory
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.cache import HiddenStateCache, TieredStore
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.slm import (
    CandidateScorer,
    SearchResult,
    _growths,
    best_first_search,
    search_threshold,
    sliding_search,
    sweep_schedule,
)
from slm_fast.windows import output_blocks

IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
# Per architecture: thresholds that exercise different decisions on the tiny random model below, and
# the most windows one of those scans commits.
THRESHOLDS = {"llama": ((0.2, 0.4, 0.5, 0.65, 0.8), 2), "qwen3": ((0.05, 0.1, 0.4, 0.7, 0.9), 1)}


def make_scorer(folder, rule="keep_high_norms_low", criterion="cosine", budget=10**9):
    runner = BlockRunner(CheckpointReader(folder), block_budget_bytes=budget)
    cache = HiddenStateCache()
    reference = calibrate(runner, IDS, cache, progress=False)
    return CandidateScorer(runner, cache, reference, criterion=criterion, rule=rule)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoint(request, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, num_layers=10)


def test_reference_preset_commits_what_the_reference_loop_commits(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    scorer = make_scorer(checkpoint)
    thresholds, most_windows = THRESHOLDS[model.config.model_type]
    outcomes = []
    for threshold in thresholds:
        ours = sliding_search(scorer, 10, threshold, parity=True)
        assert ours.windows == reference_slm(model, IDS, threshold), threshold
        outcomes.append(tuple(ours.windows))
    assert len(set(outcomes)) >= 4, outcomes
    assert max(len(o) for o in outcomes) == most_windows, outcomes


def test_reference_candidates_follow_the_loop(checkpoint):
    result = sliding_search(make_scorer(checkpoint), 10, 0.5, parity=True)
    first = result.candidates[0]
    assert (first.lo, first.hi) == (7, 8)  # hi starts at L-2, lo at L-3
    for before, after in itertools.pairwise(result.candidates):
        if after.note == "no-op":  # follows every commit: the committed model re-evaluated
            assert not before.passed and after.passed and after.lo == after.hi == before.lo
    assert all(w[0] >= 1 for w in result.windows)  # layer 0 is never merged by the reference


def test_default_mode_commits_the_window_pending_at_the_bottom(checkpoint):
    scorer = make_scorer(checkpoint)
    everything_passes = -2.0
    assert sliding_search(scorer, 10, everything_passes, parity=True).windows == []  # the reference's bug
    fixed = sliding_search(scorer, 10, everything_passes)
    assert fixed.windows == [(0, 8)] and fixed.blocks_removed == 8
    assert sliding_search(scorer, 10, everything_passes, protect_bottom=2, protect_top=2).windows == [(2, 7)]


def test_speculation_loads_upper_blocks_once_for_several_extents(checkpoint):
    """Out of core (no resident blocks), scanning below 5 protected top blocks: every candidate runs
    the 5 blocks above its window; speculating 4 extents runs them once for 4 candidates."""
    loads = {}
    for speculate in (1, 4):
        scorer = make_scorer(checkpoint, budget=0)
        before = scorer.runner.blocks_loaded
        results = [sliding_search(scorer, 10, t, speculate=speculate, protect_top=5) for t in (0.2, 0.65)]
        loads[speculate] = (scorer.runner.blocks_loaded - before, results)
    for plain, speculative in zip(loads[1][1], loads[4][1], strict=True):
        assert plain.windows == speculative.windows
        for x, y in zip(plain.candidates, speculative.candidates, strict=True):
            assert (x.lo, x.hi, x.passed) == (y.lo, y.hi, y.passed)
            assert x.similarity == pytest.approx(y.similarity, abs=1e-9)
    assert loads[4][0] < loads[1][0]


@pytest.mark.parametrize("criterion", ["cka-linear", "cka-rbf"])
def test_cka_criteria_run_the_same_scan(checkpoint, criterion):
    scorer = make_scorer(checkpoint, rule="mean", criterion=criterion)
    result = sliding_search(scorer, 10, 0.9)
    assert all(0.0 <= c.similarity <= 1.0 + 1e-9 for c in result.candidates)
    assert [c.passed for c in result.candidates] == [c.similarity > 0.9 for c in result.candidates]


def test_threshold_search_hits_the_target(checkpoint):
    scorer = make_scorer(checkpoint)
    for parity in (False, True):
        for target in (1, 3, 5):
            outcome = search_threshold(lambda t, p=parity: sliding_search(scorer, 10, t, parity=p), target)
            if outcome.exact:
                assert outcome.result.blocks_removed == target
            else:  # only when removal jumps over the target; the reason names both sides
                assert "jumps from" in outcome.reason
                assert abs(outcome.result.blocks_removed - target) <= min(abs(r - target) for _, r in outcome.tried)
    too_many = search_threshold(lambda t: sliding_search(scorer, 10, t), 9, low=-2.0)
    assert not too_many.exact and too_many.result.blocks_removed == 8 and "at most 8" in too_many.reason


def scan_removing(removal_by_threshold):
    """A stand-in scan whose removal is a step function of the threshold."""

    def run(threshold):
        removed = next(r for limit, r in removal_by_threshold if threshold < limit)
        return SearchResult(threshold, [(0, removed)] if removed else [])

    return run


def test_threshold_search_survives_the_reference_quirk():
    """With the reference's dropped pending window, very low thresholds remove nothing again."""
    run = scan_removing([(0.15, 0), (0.45, 4), (0.75, 2), (2.0, 0)])
    four = search_threshold(run, 4)
    assert four.exact and four.result.blocks_removed == 4 and four.result.threshold == pytest.approx(0.4)
    two = search_threshold(run, 2)
    assert two.exact and two.result.threshold == pytest.approx(0.7)  # the highest grid threshold that hits
    three = search_threshold(run, 3)
    assert not three.exact and three.result.blocks_removed == 2  # the tie goes to the smaller removal
    assert "removal jumps from 4" in three.reason and "to 2" in three.reason
    assert abs([t for t, r in three.tried if r == 4][-1] - 0.45) < 1e-6  # bisected down to the jump


def whole_model_similarity(folder, windows, rule):
    """Oracle: the model with `windows` merged, built in memory, scored like the reference criterion."""
    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    merged = merge_in_memory(AutoModelForCausalLM.from_pretrained(folder).eval(), windows, rule)
    return (
        torch.stack(
            [
                torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
                for a, b in zip(final_hidden(original, IDS), final_hidden(merged, IDS), strict=True)
            ]
        )
        .mean()
        .item()
    )


def test_best_first_takes_the_growth_the_whole_model_oracle_prefers(checkpoint):
    scorer = make_scorer(checkpoint, rule="keep_high")
    result = best_first_search(scorer, 10, target_blocks=3)
    assert sum(hi - lo for lo, hi in result.windows) == 3
    windows = []
    for step in (1, 2, 3):
        candidates = [c for c in result.candidates if c.note.startswith(f"step {step}")]
        for c in candidates:  # every growth's score is the merged model's, computed independently
            grown = sorted([w for w in windows if not (c.lo <= w[0] and w[1] <= c.hi)] + [(c.lo, c.hi)])
            assert c.similarity == pytest.approx(whole_model_similarity(checkpoint, grown, "keep_high"), abs=1e-6)
        best = max(candidates, key=lambda c: c.similarity)
        assert best.passed and sum(c.passed for c in candidates) == 1
        windows = sorted([w for w in windows if not (best.lo <= w[0] and w[1] <= best.hi)] + [(best.lo, best.hi)])
    assert windows == result.windows
    assert result.similarity == pytest.approx(
        max(c.similarity for c in result.candidates if c.note.startswith("step 3"))
    )


def test_best_first_threshold_and_one_sweep_per_step(checkpoint):
    scorer = make_scorer(checkpoint, rule="mean", budget=0)
    before = scorer.runner.blocks_loaded
    result = best_first_search(scorer, 10, threshold=0.5, protect_top=1, protect_bottom=1)
    steps = {c.note.split(",")[0] for c in result.candidates}
    # Out of core, each step reads every block at most once per distinct block it runs, merges aside.
    merged_reads = sum(c.hi - c.lo + 1 for c in result.candidates)
    assert scorer.runner.blocks_loaded - before <= len(steps) * 10 + merged_reads
    assert all(lo >= 1 and hi <= 8 for lo, hi in result.windows)
    taken = [c for c in result.candidates if c.passed]
    assert all(c.similarity > 0.5 for c in taken)
    last_step = [c for c in result.candidates if c.note.startswith(f"step {len(steps)}")]
    if len(taken) < len(steps):  # stopped because the best growth fell to the threshold
        assert max(c.similarity for c in last_step) <= 0.5
    else:  # or because no growth was left inside the protected range
        assert _growths(result.windows, 1, 8) == []
    with pytest.raises(ValueError, match="exactly one"):
        best_first_search(scorer, 10)


def _window_sets(lowest, highest):
    """Every set of disjoint windows of two or more blocks inside [lowest, highest] (brute force)."""
    if highest - lowest < 1:
        return [[]]
    sets = _window_sets(lowest + 1, highest)  # block `lowest` untouched
    for hi in range(lowest + 1, highest + 1):
        sets += [[(lowest, hi), *rest] for rest in _window_sets(hi + 1, highest)]
    return sets


@pytest.mark.parametrize("windows", [[], [(2, 3)], [(1, 2), (3, 5)], [(0, 1), (2, 3), (4, 7)], [(3, 4), (6, 7)]])
def test_growths_are_every_way_to_remove_one_more_block(windows):
    """The growths of a window set are exactly the window sets that remove one block more and keep each
    current window inside one of theirs (adjacent windows fused included)."""
    lowest, highest = 0, 7
    removed = sum(hi - lo for lo, hi in windows)
    expected = [
        candidate
        for candidate in _window_sets(lowest, highest)
        if sum(hi - lo for lo, hi in candidate) == removed + 1
        and all(any(lo <= w_lo and w_hi <= hi for lo, hi in candidate) for w_lo, w_hi in windows)
    ]
    growths = _growths(windows, lowest, highest)
    assert sorted(grown for grown, _ in growths) == sorted(expected)
    for grown, changed in growths:
        assert changed in grown


def tiered_scorer(folder, *, micro_batch, block_budget, host_budget, spill_dir):
    """A scorer whose boundary cache and plan states share one store with a host budget (the rest on disk)."""
    runner = BlockRunner(CheckpointReader(folder), micro_batch=micro_batch, block_budget_bytes=block_budget)
    store = TieredStore("cpu", host_budget_bytes=host_budget, spill_dir=spill_dir)
    cache = HiddenStateCache(store=store)
    reference = calibrate(runner, IDS, cache, progress=False)
    return CandidateScorer(runner, cache, reference, criterion="cosine", rule="mean")


def test_every_tier_gives_the_unbounded_decisions_bit_for_bit(checkpoint, tmp_path):
    """States in memory, half on disk, all on disk; blocks all resident, one, none: the same arithmetic
    (one micro-batch size) gives the same similarities to the last bit, and the sweeps leave no plan
    state behind. Another micro-batch size changes only the rounding."""
    reader = CheckpointReader(checkpoint)
    one_block, one_state = reader.block_nbytes(0), IDS.numel() * 64 * 4
    results = []
    for block_budget, host_budget in ((10**9, 10**9), (one_block, 6 * one_state), (0, 0)):
        scorer = tiered_scorer(
            checkpoint, micro_batch=2, block_budget=block_budget, host_budget=host_budget, spill_dir=tmp_path
        )
        result = best_first_search(scorer, 10, target_blocks=3)
        ledger = scorer.cache.store.ledger
        assert not [k for k in ledger._entries if k[0] == "state"]  # every plan state released
        results.append(([(c.lo, c.hi, c.similarity) for c in result.candidates], result.windows, ledger.stats()))
        scorer.cache.close()
    assert results[0][:2] == results[1][:2] == results[2][:2]
    assert results[0][2]["disk_bytes_written"] == 0 < results[1][2]["disk_bytes_written"]
    assert results[2][2]["peak_bytes"]["host"] == 0
    other = best_first_search(
        tiered_scorer(checkpoint, micro_batch=None, block_budget=0, host_budget=0, spill_dir=tmp_path),
        10,
        target_blocks=3,
    )
    assert other.windows == results[0][1]
    assert [c.similarity for c in other.candidates] == pytest.approx([c[2] for c in results[0][0]], abs=1e-6)


def test_sweep_schedule_runs_each_block_once_per_window():
    plans = [((0, 0), (1, 2), (3, 3)), ((0, 1), (2, 2), (3, 3)), ((0, 0), (1, 1), (2, 2), (3, 3))]
    schedule = sweep_schedule(plans, 4)
    assert schedule == [
        (0, [((0, 1), [1])]),  # plan 0 departs at 1, the identity plan 2 never departs
        (1, [((1, 2), [0])]),
        (2, [((2, 2), [1])]),
        (3, [((3, 3), [0, 1])]),
    ]


def test_plans_with_a_common_history_share_its_computation(checkpoint):
    """Two plans that merge the same low window and differ higher up run that window once in a joint
    sweep, and score exactly what each scores alone."""
    plans = [
        output_blocks([(1, 2), (5, 6)], 10),
        output_blocks([(1, 2), (6, 7)], 10),
        output_blocks([(1, 2)], 10),
    ]
    alone, forwards_alone = [], 0
    for plan in plans:
        scorer = make_scorer(checkpoint, rule="keep_high")
        before = scorer.runner.token_forwards
        alone += scorer.score_plans([plan])
        forwards_alone += scorer.runner.token_forwards - before
    scorer = make_scorer(checkpoint, rule="keep_high")
    before = scorer.runner.token_forwards
    assert scorer.score_plans(plans) == alone
    per_block = IDS.numel()
    # Alone: 7 + 7 + 8 block runs from block 1 up. Together: the shared history (1-2, 3, 4) runs once;
    # at 5 the first plan runs 5-6 and the other two share 5; at 6 they split (6-7 / 6); then 2, 3, 3.
    assert forwards_alone == 22 * per_block
    assert scorer.runner.token_forwards - before == (3 + 2 + 2 + 2 + 3 + 3) * per_block


def test_plans_that_drop_blocks_enter_below_their_first_kept_block(checkpoint):
    """A plan whose first change is a dropped block starts from the original state at its departure
    (the boundary below the dropped block), not at the input of the block it runs next: scored in one
    sweep, plans dropping {3}, {2, 3} and the last block score what the whole model without those
    blocks scores (as merges: keep_high of [3, 4] is block 4 alone; keep_low of [8, 9] is block 8)."""
    drops = [[3], [2, 3], [9]]
    scores = make_scorer(checkpoint, rule="keep_high").score_plans([output_blocks([], 10, d) for d in drops])
    oracles = [
        whole_model_similarity(checkpoint, [(3, 4)], "keep_high"),
        whole_model_similarity(checkpoint, [(2, 4)], "keep_high"),
        whole_model_similarity(checkpoint, [(8, 9)], "keep_low"),
    ]
    assert scores == pytest.approx(oracles, abs=1e-5)
    assert len(set(scores)) == 3
