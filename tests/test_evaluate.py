"""Evaluation: block-streamed perplexity (non-overlapping and strided) and token-level scoring against
whole-model transformers computations on tiny random models; the CLI's perplexity path and errors.
The harness path (tasks) is tested in test_harness_eval.py. The `slow` test scores the real SmolLM2
against the figure in shared/assets.md."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.cli import main
from slm_fast.errors import InputError
from slm_fast.evaluation import TokenRequest, loglikelihoods, perplexity, strided_windows, token_request
from slm_fast.evaluation.streaming import plan_groups
from slm_fast.runtime.stream import BlockRunner

LAYERS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_layers=LAYERS)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(tiny: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    return AutoTokenizer.from_pretrained(tiny)


def hand_loglikelihood(model: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation[k] | context + continuation[:k]) from one whole-model forward."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = model(ids).logits[0].double().log_softmax(-1)
    start = len(context) - 1
    return sum(float(log_probs[start + k, token]) for k, token in enumerate(continuation))


# --- perplexity -----------------------------------------------------------------------------------


def test_perplexity_equals_the_full_model(tiny: Path, hf_model: torch.nn.Module) -> None:
    windows = torch.randint(0, 128, (5, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = math.exp(float(hf_model(windows, labels=windows).loss))
    runner = BlockRunner(CheckpointReader(tiny))  # block budget 0: every group reads every block
    window_bytes = 33 * 64 * 4
    result = perplexity(
        runner, windows, hidden_budget_bytes=2 * window_bytes, batch_tokens=33, head_rows=7, progress=False
    )
    assert result.ppl == pytest.approx(expected, rel=1e-6)
    assert result.mean_nll == pytest.approx(math.log(expected), rel=1e-6)
    assert (result.tokens, result.windows, result.seq_len) == (5 * 32, 5, 33)
    assert runner.blocks_loaded == 3 * LAYERS  # groups of 2 + 2 + 1 windows, each block once per group


def test_strided_perplexity_is_hugging_faces_protocol(tiny: Path, hf_model: torch.nn.Module) -> None:
    """The loop of HF's perplexity guide (labels -100 on the tokens a previous window scored),
    restricted to whole windows, against block-streamed windows from `strided_windows`."""
    ids = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    seq_len, stride = 20, 8
    nll_sum, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids) - seq_len + 1, stride):
        end = begin + seq_len
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : seq_len - (end - previous_end)] = -100
        with torch.no_grad():
            loss = float(hf_model(window, labels=labels).loss)
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * scored
        count += scored
        previous_end = end
    windows = strided_windows(ids, seq_len, stride)
    assert windows.shape == (7, seq_len) and windows[1, 0] == ids[stride]
    result = perplexity(BlockRunner(CheckpointReader(tiny)), windows, stride=stride, batch_tokens=45, progress=False)
    assert (result.tokens, result.stride) == (count, stride) == (19 + 6 * 8, 8)
    assert result.mean_nll == pytest.approx(nll_sum / count, rel=1e-6)
    with pytest.raises(InputError, match="shorter than one window"):
        strided_windows(ids[:10], seq_len, stride)


def test_perplexity_rejects_bad_windows(tiny: Path) -> None:
    runner = BlockRunner(CheckpointReader(tiny))
    with pytest.raises(InputError, match="shape"):
        perplexity(runner, torch.zeros(3, 1, dtype=torch.long), progress=False)


def test_groups_fit_the_budget() -> None:
    assert plan_groups([10, 10, 30, 5, 5], bytes_per_token=2, budget_bytes=40) == [[0, 1], [2], [3, 4]]


# --- scoring ----------------------------------------------------------------------------------------


def test_token_request_is_truncated_from_the_left() -> None:
    assert token_request([5, 6], [7, 8], max_length=256) == TokenRequest((5, 6, 7, 8), 2)
    assert token_request([1, 2, 3, 4], [5], max_length=3) == TokenRequest((2, 3, 4, 5), 1)  # as the harness
    with pytest.raises(InputError, match="continuation"):
        token_request([], [5], max_length=3)
    with pytest.raises(InputError, match="continuation"):
        token_request([1], [5, 6, 7, 8], max_length=3)


def test_loglikelihoods_equal_hand_computation(tiny: Path, hf_model: torch.nn.Module) -> None:
    pairs = [
        ([5, 6], [7, 8]),  # multi-token continuation
        ([5, 6], [9]),
        ([5, 6], [10]),  # same input as the next one: one row serves both
        ([5, 6, 10], [3]),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12, 13]),  # longest: pads the others in its batch
        ([5, 6], [7, 8]),  # a duplicate request
        ([40], [41]),
    ]
    requests = [token_request(context, continuation, 256) for context, continuation in pairs]
    runner = BlockRunner(CheckpointReader(tiny))
    got = loglikelihoods(
        runner, requests, hidden_budget_bytes=12 * 64 * 4, batch_tokens=24, head_rows=3, progress=False
    )
    expected = [hand_loglikelihood(hf_model, context, continuation) for context, continuation in pairs]
    assert got.loglikelihood.dtype == torch.float64
    assert got.loglikelihood.tolist() == pytest.approx(expected, abs=1e-5)
    assert float(got.loglikelihood[0]) == pytest.approx(
        float(got.loglikelihood[5]), abs=1e-6
    )  # one row, two head chunks
    assert got.rows == 5  # 7 requests, two sharing with others
    assert got.tokens == 16  # of 20 in the rows: (5, 6) runs once for (5, 6), (5, 6, 7) and (5, 6, 10)
    with torch.no_grad():
        greedy = [
            hf_model(torch.tensor([c + k[:-1]])).logits[0, len(c) - 1 :].argmax(-1).tolist() == k for c, k in pairs
        ]
    assert got.greedy.tolist() == greedy


# --- command line -------------------------------------------------------------------------------------


def test_cli_perplexity(tiny: Path, hf_model: torch.nn.Module, tmp_path: Path, capsys) -> None:
    corpus = write_word_corpus(tmp_path / "words.txt")
    out = tmp_path / "out.json"
    argv = ["evaluate", str(tiny), "--ppl", str(corpus), "--seq-len", "24", "--max-windows", "3"]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(corpus) in printed and "block loads" in printed
    results = json.loads(out.read_text())
    tokens = AutoTokenizer.from_pretrained(tiny)("\n\n".join(corpus.read_text().split("\n\n")))["input_ids"]
    windows = torch.tensor(tokens[: 3 * 24]).view(3, 24)
    with torch.no_grad():
        expected = math.exp(float(hf_model(windows, labels=windows).loss))
    assert results["perplexity"][str(corpus)]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert results["run"]["block_loads"] == LAYERS  # the blocks fit the default budget: read once
    assert results["run"]["peak_rss_bytes"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to evaluate"),
        (["--ppl", "CORPUS", "--stride", "0"], "--stride must be >= 1"),
        (["--ppl", "no_such_corpus"], "dataset 'no_such_corpus' could not be loaded from the local datasets cache"),
        (["--ppl", "CORPUS", "--seq-len", "5000"], "corpus '.*words.txt': the corpus is shorter than one window"),
    ],
)
def test_cli_errors_name_the_culprit(tiny: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    corpus = write_word_corpus(tmp_path / "words.txt")
    extra = [str(corpus) if arg == "CORPUS" else arg for arg in extra]
    assert main(["evaluate", str(tiny), *extra, "--no-progress"]) == 2
    assert re.search(message, capsys.readouterr().err)


# --- the real SmolLM2 (slow) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slm_fast.assets import build_smollm2

    return build_smollm2(tmp_path_factory.mktemp("smollm2") / "model").path


@pytest.mark.slow
def test_smollm2_perplexity_on_pride_and_prejudice(smollm2: Path) -> None:
    """assets.md: 26.8 on 16 windows of 512 tokens; the block-streamed runtime is bit-identical to
    transformers, so only the rounding of that figure is allowed for."""
    from slm_fast.data import evaluation_windows, load_corpus
    from slm_fast.errors import AssetError

    try:
        novel = load_corpus("austen:pride_and_prejudice")
    except AssetError:
        pytest.skip("the Austen novels are not installed (`slm-fast assets text`)")
    windows = evaluation_windows(AutoTokenizer.from_pretrained(smollm2), novel, 512, 16)
    result = perplexity(BlockRunner(CheckpointReader(smollm2)), windows, progress=False)
    assert result.ppl == pytest.approx(26.8, abs=0.05)
