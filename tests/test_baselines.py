"""Peer baselines against direct computations on the whole model's hidden states."""

import pytest
import torch
from reference_slm import final_hidden, reference_laco
from tiny_models import save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus
from transformers import AutoModelForCausalLM

from slm_fast import baselines
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.errors import InputError
from slm_fast.export import export_merged_checkpoint
from slm_fast.prune import PruneOptions, prune
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner, calibrate
from slm_fast.slm import CandidateScorer

IDS = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "m", "llama", num_layers=8)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    last_output = []
    hook = model.model.layers[-1].register_forward_hook(lambda module, args, output: last_output.append(output))
    with torch.no_grad():
        states = model(IDS, output_hidden_states=True).hidden_states
    hook.remove()
    # HF's last hidden state is the final norm's output; the baselines compare residual-stream states.
    states = (*states[:-1], last_output[0])
    runner = BlockRunner(CheckpointReader(folder), block_budget_bytes=10**9)
    cache = HiddenStateCache()
    reference = calibrate(runner, IDS, cache, progress=False)
    return folder, model, states, runner, cache, reference


def test_shortgpt_block_influence(setup):
    _, _, states, _, cache, _ = setup
    scores = baselines.shortgpt_scores(cache, 8)
    for i, score in enumerate(scores):
        cos = torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)
        assert score == pytest.approx((1 - cos).mean().item(), abs=1e-9)
    chosen = baselines.shortgpt_blocks(scores, 3)
    assert chosen == sorted(sorted(range(8), key=lambda i: scores[i])[:3])
    assert max(scores[i] for i in chosen) <= min(scores[i] for i in range(8) if i not in chosen)


def test_gromov_angular_distance(setup):
    _, _, states, _, cache, _ = setup
    distances = baselines.gromov_distances(cache, 8, 3)
    assert len(distances) == 6
    for l, distance in enumerate(distances):
        a, b = states[l][:, -1].double(), states[l + 3][:, -1].double()
        expected = torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / torch.pi
        assert distance == pytest.approx(expected.mean().item(), abs=1e-9)
    best = min(range(6), key=distances.__getitem__)
    assert baselines.gromov_blocks(distances, 3) == [best, best + 1, best + 2]


def test_last_n_and_counts():
    assert baselines.last_n_blocks(8, 3) == [4, 5, 6]
    with pytest.raises(InputError, match="cannot remove 8 blocks"):
        baselines.last_n_blocks(8, 8)
    assert baselines.blocks_for_ratio(1000, 100, 0.25) == 3  # 2.5 rounds half up


@pytest.mark.parametrize(("threshold", "merge_layers"), [(0.3, 2), (0.6, 1), (0.2, 3)])
def test_laco_matches_the_whole_model_loop(setup, tmp_path, threshold, merge_layers):
    folder, model, _, runner, cache, reference = setup
    scorer = CandidateScorer(runner, cache, reference, criterion="cosine", rule=baselines.LACO_RULE)
    result = baselines.laco_search(scorer, 8, threshold, merge_layers=merge_layers)
    expected = reference_laco(model, IDS, threshold, merge_layers)
    assert 8 - result.blocks_removed == expected.config.num_hidden_layers
    export_merged_checkpoint(folder, tmp_path / "out", result.windows, rule=baselines.LACO_RULE, progress=False)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for a, b in zip(final_hidden(ours, IDS), final_hidden(expected, IDS), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["shortgpt", "gromov", "last-n", "laco"])
def test_prune_with_each_baseline(tmp_path, method):
    folder = save_tiny_checkpoint(tmp_path / "src", "llama", num_layers=8)
    save_tiny_tokenizer(folder)
    calib = write_word_corpus(tmp_path / "calib.txt")
    options = PruneOptions(remove=2, method=method, calib=str(calib), n_samples=3, seq_len=16, progress=False)
    report = prune(folder, tmp_path / "out", options)
    if method == "laco":  # LaCo removes MERGE_LAYERS blocks per merge: 2 here, exactly the target
        assert report.windows and not report.dropped
    else:
        assert len(report.dropped) == 2 and not report.windows
    assert report.blocks_after == 6 and report.similarity is not None
    assert CheckpointReader(tmp_path / "out").num_blocks == 6


def test_ranking_methods_refuse_a_threshold(tmp_path):
    with pytest.raises(InputError, match="give --remove or --ratio"):
        prune(tmp_path, tmp_path / "out", PruneOptions(threshold=0.5, method="shortgpt"))
    with pytest.raises(InputError, match="it would override --method laco"):
        prune(tmp_path, tmp_path / "out", PruneOptions(threshold=0.5, method="laco", preset="reference"))
