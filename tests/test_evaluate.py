"""Evaluation: block-streamed perplexity and zero-shot scoring against whole-model transformers
computations on tiny random models; the task loaders on the real Arrow files; the CLI. The `slow`
ones score the real SmolLM2 against the figures in shared/assets.md."""

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
from slm_fast.evaluation import (
    EvaluationReport,
    TokenRequest,
    encode_requests,
    evaluate_task,
    load_documents,
    loglikelihoods,
    parse_tasks,
    perplexity,
)
from slm_fast.evaluation.streaming import plan_groups
from slm_fast.evaluation.tasks import Choice, Document, hellaswag_preprocess, multiple_choice, winogrande
from slm_fast.evaluation.zeroshot import choice_scores
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


def test_perplexity_rejects_bad_windows(tiny: Path) -> None:
    runner = BlockRunner(CheckpointReader(tiny))
    with pytest.raises(InputError, match="shape"):
        perplexity(runner, torch.zeros(3, 1, dtype=torch.long), progress=False)


def test_groups_fit_the_budget() -> None:
    assert plan_groups([10, 10, 30, 5, 5], bytes_per_token=2, budget_bytes=40) == [[0, 1], [2], [3, 4]]


# --- scoring ----------------------------------------------------------------------------------------


def test_harness_split_moves_trailing_space_into_the_continuation(tokenizer) -> None:
    (request,) = encode_requests(tokenizer, [("w5 w6 ", "w7 w8")], max_length=256)
    assert request == TokenRequest((5, 6, 7, 8), 2)
    (truncated,) = encode_requests(tokenizer, [("w1 w2 w3 w4", " w5")], max_length=3)
    assert truncated == TokenRequest((2, 3, 4, 5), 1)  # left-truncated to max_length + 1, as the harness


def test_harness_split_with_a_byte_level_bpe() -> None:
    """Whitespace belongs to the following token in GPT-2-style BPE: encoding the concatenation gives
    'Ġyes', where encoding the pieces apart would give 'Ġ' + 'yes'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = ["Question: is it?\nAnswer: yes", "Answer: no", "yes no yes no"] * 20
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend)
    (request,) = encode_requests(bpe, [("Question: is it?\nAnswer: ", "yes")], max_length=512)
    whole = bpe("Question: is it?\nAnswer: yes", add_special_tokens=False)["input_ids"]
    assert request.tokens == tuple(whole)
    assert request.continuation_length == 1
    assert bpe.convert_ids_to_tokens(whole[-1]) == "Ġyes"


def test_empty_context_is_rejected(tokenizer) -> None:
    with pytest.raises(InputError, match="empty context"):
        encode_requests(tokenizer, [("  ", "w1")], max_length=256)


def test_loglikelihoods_equal_hand_computation(tiny: Path, hf_model: torch.nn.Module, tokenizer) -> None:
    pairs = [
        ("w5 w6", " w7 w8"),  # multi-token continuation
        ("w5 w6", " w9"),
        ("w5 w6", " w10"),  # same input as the next one: one row serves both
        ("w5 w6 w10", " w3"),
        ("w1 w2 w3 w4 w5 w6 w7 w8 w9", " w11 w12 w13"),  # longest: pads the others in its batch
        ("w5 w6", " w7 w8"),  # a duplicate request
        ("w40", " w41"),
    ]
    requests = encode_requests(tokenizer, pairs, max_length=256)
    runner = BlockRunner(CheckpointReader(tiny))
    got = loglikelihoods(
        runner, requests, hidden_budget_bytes=12 * 64 * 4, batch_tokens=24, head_rows=3, progress=False
    )
    expected = [hand_loglikelihood(hf_model, tokenizer(c)["input_ids"], tokenizer(k)["input_ids"]) for c, k in pairs]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got[0] == got[5]


def test_acc_and_acc_norm() -> None:
    """acc takes the largest log-likelihood, acc_norm the largest per character of the choice text."""
    doc = multiple_choice("ctx", ["a", "bbbbbbbbbb"], gold=1)
    assert [c.continuation for c in doc.choices] == [" a", " bbbbbbbbbb"]
    assert [c.norm_chars for c in doc.choices] == [1, 10]
    assert choice_scores([doc], torch.tensor([-3.0, -10.0], dtype=torch.float64)) == (0.0, 1.0)
    assert choice_scores([doc], torch.tensor([-30.0, -10.0], dtype=torch.float64)) == (1.0, 1.0)
    tie = Document((Choice("c", " x", 1), Choice("c", " y", 1)), gold=1)
    assert choice_scores([doc, tie], torch.tensor([-3.0, -10.0, -2.0, -2.0], dtype=torch.float64)) == (0.0, 0.5)


def test_winogrande_partial_scoring(tiny: Path, hf_model: torch.nn.Module, tokenizer) -> None:
    """The option goes into the context; both choices score the same continuation after the blank."""
    row = {"sentence": "w1 w2 _ w3 w4.", "option1": "w5", "option2": "w6", "answer": "2"}
    doc = winogrande(row)
    assert [(c.context, c.continuation) for c in doc.choices] == [("w1 w2 w5", " w3 w4."), ("w1 w2 w6", " w3 w4.")]
    assert doc.gold == 1
    row["sentence"] = "w1 w2 _ w3 w4"  # the tiny vocabulary has no "w4."
    doc = winogrande(row)
    requests = encode_requests(tokenizer, [(c.context, c.continuation) for c in doc.choices], max_length=256)
    scores = loglikelihoods(BlockRunner(CheckpointReader(tiny)), requests, progress=False)
    by_hand = [hand_loglikelihood(hf_model, [1, 2, option], [3, 4]) for option in (5, 6)]
    assert scores.tolist() == pytest.approx(by_hand, abs=1e-5)
    acc, _ = choice_scores([doc], scores)
    assert acc == float(by_hand[1] > by_hand[0])


# --- tasks ------------------------------------------------------------------------------------------

COUNTS = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 570,
    "arc_challenge": 299,
    "openbookqa": 500,
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_task_sizes(name: str) -> None:
    assert len(load_documents(name)) == COUNTS[name]


def requests_of(name: str, index: int) -> tuple[list[tuple[str, str]], int]:
    doc = load_documents(name, index + 1)[index]
    return [(c.context, c.continuation) for c in doc.choices], doc.gold


def test_boolq_prompt() -> None:
    pairs, gold = requests_of("boolq", 0)
    context = pairs[0][0]
    assert context.startswith("All biomass goes through at least some of these steps:")
    assert context.endswith(
        "uses much less petroleum than producing gasoline.\n"
        "Question: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert [k for _, k in pairs] == [" no", " yes"] and gold == 0


def test_piqa_prompt() -> None:
    pairs, gold = requests_of("piqa", 0)
    assert pairs[0] == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
        "you will also need to supply it with a water bottle and a food dish.",
    )
    assert pairs[1][1].startswith(
        " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans"
    )
    assert gold == 0


def test_arc_prompts_with_letter_and_digit_keys() -> None:
    pairs, gold = requests_of("arc_easy", 0)
    assert pairs == [
        ("Question: Which technology was developed most recently?\nAnswer:", f" {text}")
        for text in ("cellular telephone", "television", "refrigerator", "airplane")
    ]
    assert gold == 0
    pairs, gold = requests_of("arc_easy", 8)  # labels 1-4, answerKey "1"
    assert pairs[0] == (
        "Question: A green plant absorbs light. A frog eats flies. These are both examples of how organisms\nAnswer:",
        " obtain energy",
    )
    assert gold == 0
    pairs, gold = requests_of("arc_challenge", 0)
    assert pairs[0][0].startswith("Question: Juan and LaKeisha roll a few objects down a ramp.")
    assert pairs[3][1] == " Record the details of the investigation." and gold == 3
    _, gold = requests_of("arc_challenge", 89)  # labels 1-4, answerKey "2"
    assert gold == 1


def test_openbookqa_prompt() -> None:
    pairs, gold = requests_of("openbookqa", 0)
    stem = "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as"
    assert pairs == [(stem, f" {text}") for text in ("Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals")]
    assert gold == 0


def test_hellaswag_prompt_and_preprocessing() -> None:
    pairs, gold = requests_of("hellaswag", 0)
    assert pairs[0] == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " is using wrap to wrap a pair of skis.",
    )
    assert pairs[3][1] == " starts pulling up roofing on a roof." and gold == 3
    pairs, gold = requests_of("hellaswag", 3243)  # WikiHow: [header], [title], [step], [substeps]
    assert pairs[0][0].startswith(
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. "
        "This job requires"
    )
    assert pairs[3][1] == (
        "  Earn a bachelor's degree in a fashion-related field. Degrees for the fashion industry include art, "
        "fashion merchandising, and marketing."
    )  # the harness's quirk: a removed leading bracket leaves its space
    assert hellaswag_preprocess(" a [title] b [x]  c ") == "a. b  c"  # one pass of "  " -> " "


def test_winogrande_prompt() -> None:
    pairs, gold = requests_of("winogrande", 0)
    head = "Sarah was a much better surgeon than Maria so "
    assert pairs == [
        (head + "Sarah", " always got the easier cases."),
        (head + "Maria", " always got the easier cases."),
    ]
    assert gold == 1


def test_task_names_and_errors() -> None:
    assert parse_tasks("all") == list(COUNTS)
    assert parse_tasks("piqa, boolq") == ["boolq", "piqa"]  # table order
    with pytest.raises(InputError, match=r"unknown task\(s\) \['mmlu'\]"):
        parse_tasks("piqa,mmlu")
    with pytest.raises(InputError, match="task piqa: limit"):
        load_documents("piqa", 0)
    assert len(load_documents("openbookqa", 7)) == 7


def test_evaluate_task_on_a_tiny_model(tiny: Path, tokenizer) -> None:
    """End to end on real WinoGrande rows (unknown words are w0 for the tiny tokenizer)."""
    result = evaluate_task(BlockRunner(CheckpointReader(tiny)), tokenizer, "winogrande", limit=6, progress=False)
    assert (result.documents, result.requests, result.metric, result.acc_norm) == (6, 12, "acc", None)
    assert result.score == result.acc and result.acc * 6 == round(result.acc * 6)
    report = EvaluationReport(model="tiny", limit=6, tasks=[result])
    assert report.as_dict()["zero_shot"]["average"] == result.acc
    assert "WinoGrande" in report.table() and "1 of the seven tasks" in report.table()


# --- command line -------------------------------------------------------------------------------------


def test_cli_perplexity_and_tasks(tiny: Path, hf_model: torch.nn.Module, tmp_path: Path, capsys) -> None:
    corpus = write_word_corpus(tmp_path / "words.txt")
    out = tmp_path / "out.json"
    argv = ["evaluate", str(tiny), "--ppl", str(corpus), "--seq-len", "24", "--max-windows", "3"]
    argv += ["--tasks", "arc_easy,openbookqa", "--limit", "3", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ARC-e" in printed and "OBQA" in printed and str(corpus) in printed
    results = json.loads(out.read_text())
    tokens = AutoTokenizer.from_pretrained(tiny)("\n\n".join(corpus.read_text().split("\n\n")))["input_ids"]
    windows = torch.tensor(tokens[: 3 * 24]).view(3, 24)
    with torch.no_grad():
        expected = math.exp(float(hf_model(windows, labels=windows).loss))
    assert results["perplexity"][str(corpus)]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert set(results["zero_shot"]["tasks"]) == {"arc_easy", "openbookqa"}
    assert results["zero_shot"]["limit"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to evaluate"),
        (["--tasks", "arc_e"], r"unknown task\(s\) \['arc_e'\]"),
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


# (task, acc, acc_norm, acc_norm_with_space) on the first 200 documents. acc_norm divides by the
# choice text's characters, as the harness does; acc_norm_with_space divides by the continuation's
# characters, leading space included, the convention behind the figures in assets.md.
SMOLLM2_FIRST_200 = [("winogrande", 0.515, None, None), ("openbookqa", 0.170, 0.300, 0.285)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "acc", "acc_norm", "acc_norm_with_space"), SMOLLM2_FIRST_200)
def test_smollm2_matches_the_assets_figures(
    smollm2: Path, name: str, acc: float, acc_norm: float | None, acc_norm_with_space: float | None
) -> None:
    """The same 200 documents and the same model as assets.md, so the figures agree to one document
    (0.005), the allowance for float rounding deciding a near-tie differently on another machine."""
    documents = load_documents(name, 200)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    pairs = [(c.context, c.continuation) for doc in documents for c in doc.choices]
    scores = loglikelihoods(
        BlockRunner(CheckpointReader(smollm2)), encode_requests(tokenizer, pairs, 8192), progress=False
    )
    got_acc, got_norm = choice_scores(documents, scores)
    assert got_acc == pytest.approx(acc, abs=0.0051)
    if acc_norm is not None:
        with_space = [
            Document(tuple(Choice(c.context, c.continuation, len(c.continuation)) for c in doc.choices), doc.gold)
            for doc in documents
        ]
        assert got_norm == pytest.approx(acc_norm, abs=0.0051)
        assert choice_scores(with_space, scores)[1] == pytest.approx(acc_norm_with_space, abs=0.0051)
