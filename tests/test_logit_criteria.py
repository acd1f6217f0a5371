"""The kl and ppl criteria and SLEB against whole-model computations on a tiny model."""

import pytest
import torch
from reference_quality import reference_sleb, whole_kl, whole_nll, without_blocks
from tiny_models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

from slm_fast import baselines, criteria
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.slm import CandidateScorer, best_first_search
from slm_fast.windows import output_blocks

IDS = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
# float32 forward passes of a 64-wide model: per-token log-probabilities agree to ~1e-6 between the
# block-streamed and the whole-model pass (different batch shapes, same arithmetic), so means do too.
TOL = 2e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "m", "llama", num_layers=8)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    runner = BlockRunner(CheckpointReader(folder), block_budget_bytes=10**9)
    cache = HiddenStateCache()
    reference = calibrate(runner, IDS, cache, progress=False)
    return model, runner, cache, reference


def scorer_for(setup, criterion):
    _, runner, cache, reference = setup
    return CandidateScorer(runner, cache, reference, criterion=criterion, rule="keep_high", input_ids=IDS)


@pytest.mark.parametrize("chunk", [criteria.LOGIT_CHUNK_ELEMENTS, 128 * 5])  # whole, and 5-token chunks
def test_kl_and_ppl_match_the_whole_model(setup, monkeypatch, chunk):
    monkeypatch.setattr(criteria, "LOGIT_CHUNK_ELEMENTS", chunk)
    model = setup[0]
    for dropped in ([3], [1, 5], [2, 3, 6]):
        plan = output_blocks([], 8, dropped)
        candidate = without_blocks(model, dropped)
        kl = -scorer_for(setup, "kl").score_plans([plan])[0]
        assert kl == pytest.approx(whole_kl(model, candidate, IDS), abs=TOL)
        assert kl > 100 * TOL  # the check means something
        nll = -scorer_for(setup, "ppl").score_plans([plan])[0]
        assert nll == pytest.approx(whole_nll(candidate, IDS), abs=TOL)


def test_kl_of_the_original_is_zero(setup):
    _, runner, _, reference = setup
    assert criteria.mean_kl(runner.logits, reference, reference) == pytest.approx(0, abs=1e-9)


def test_logit_criteria_need_the_head(setup):
    reference = setup[3]
    with pytest.raises(ValueError, match="head"):
        criteria.similarity_to_reference("kl", reference, reference)
    with pytest.raises(ValueError, match="token ids"):
        criteria.similarity_to_reference("ppl", reference, reference, head=setup[1].logits)


@pytest.mark.parametrize("criterion", ["kl", "ppl"])
def test_best_first_with_logit_criteria(setup, criterion):
    """Every growth's score is the whole-model value of that candidate; the taken one is the best."""
    model = setup[0]
    result = best_first_search(scorer_for(setup, criterion), 8, target_blocks=2)
    assert result.blocks_removed == 2
    first = [c for c in result.candidates if c.note.startswith("step 1")]
    for c in first:
        candidate = without_blocks(model, [c.lo])  # keep_high of [lo, lo + 1] is block lo + 1: lo is gone
        whole = whole_kl(model, candidate, IDS) if criterion == "kl" else whole_nll(candidate, IDS)
        assert -c.similarity == pytest.approx(whole, abs=TOL)
    assert max(first, key=lambda c: c.similarity).passed


def test_sleb_matches_the_whole_model_loop(setup):
    model = setup[0]
    result = baselines.sleb_search(scorer_for(setup, "ppl"), 8, 4)
    order = [lo for lo, _ in result.windows]
    assert order == reference_sleb(model, IDS, 4)
    assert 0 not in order and 7 not in order
    assert -result.similarity == pytest.approx(whole_nll(without_blocks(model, order), IDS), abs=TOL)


def test_sleb_runs_are_nested(setup):
    """The quality protocol derives SLEB at k blocks from a run to n > k: the greedy steps must agree."""
    short, long = (baselines.sleb_search(scorer_for(setup, "ppl"), 8, n) for n in (2, 4))
    assert long.windows[:2] == short.windows
    assert len(long.step_seconds) == 4 and long.step_seconds == sorted(long.step_seconds)
    assert long.to_json()["step_seconds"] == long.step_seconds


def test_sleb_needs_the_ppl_scorer(setup):
    with pytest.raises(ValueError, match="perplexity"):
        baselines.sleb_search(scorer_for(setup, "cosine"), 8, 2)


def test_threshold_search_refuses_logit_criteria():
    from slm_fast.errors import InputError
    from slm_fast.prune import PruneOptions

    with pytest.raises(InputError, match="best-first"):
        PruneOptions(method="slm", remove=2, search="sliding", criterion="kl").validated()
    PruneOptions(method="slm", threshold=-0.5, search="sliding", criterion="kl").validated()
    PruneOptions(method="slm", remove=2, criterion="ppl").validated()
