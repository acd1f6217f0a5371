"""lm-evaluation-harness through the block-streamed model: `StreamedLM` against the harness's own `hf`
model on the same documents (per-request log-likelihoods, greedy flags, acc and acc_norm), on a tiny
random Llama with a real BPE tokenizer; the offline configs of the seven tasks; rolling
log-likelihood; the CLI. The `slow` test repeats the parity on the real SmolLM2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from eval_models import save_text_model
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import AutoTokenizer

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.cli import main
from slm_fast.evaluation.harness import harness_run, task_manager
from slm_fast.evaluation.harness_lm import StreamedLM
from slm_fast.evaluation.local_tasks import LOCAL_TASKS, harness_tasks_dir
from slm_fast.runtime.stream import BlockRunner

LAYERS = 3
VALIDATION_SIZES = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 570,
    "arc_challenge": 299,
    "openbookqa": 500,
}


def first_rows(name: str, count: int) -> list[dict]:
    with pa.memory_map(str(LOCAL_TASKS[name].arrow_path)) as source:
        return pa.ipc.open_stream(source).read_next_batch().slice(0, count).to_pylist()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [str(row) for name in LOCAL_TASKS for row in first_rows(name, 30)]
    return save_text_model(tmp_path_factory.mktemp("text_model"), texts, num_layers=LAYERS)


@pytest.fixture(scope="module")
def rolling_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a rolling log-likelihood task over BoolQ passages joined into texts of ~700-2000
    BPE tokens (so that the 512-token context needs several windows), and generative tasks (greedy,
    left-truncated contexts; sampled)."""
    folder = tmp_path_factory.mktemp("rolling")
    passages = [row["passage"] for row in first_rows("boolq", 12)]
    texts = [" ".join(passages[i : i + 3]) for i in range(0, 12, 3)]
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "texts.jsonl")}}}
    rolling = common | {
        "task": "tiny_rolling",
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    }
    generative = common | {
        "task": "tiny_generate",
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{text}}",
        "doc_to_target": "{{text}}",
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 8},
        "metric_list": [{"metric": "exact_match"}],
    }
    sampled = generative | {"task": "tiny_sample", "generation_kwargs": {"do_sample": True, "temperature": 0.7}}
    for config in (rolling, generative, sampled):
        (folder / f"{config['task']}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return folder


@pytest.fixture(scope="module")
def manager(rolling_tasks: Path, tmp_path_factory: pytest.TempPathFactory) -> TaskManager:
    """The harness's tasks, the seven local ones and the test tasks (indexing takes seconds: once)."""
    return task_manager(local=True, include_path=[rolling_tasks], workdir=tmp_path_factory.mktemp("tasks"))


def run_both(model: Path, tasks: list[str], limit: int, manager: TaskManager, lm: StreamedLM) -> tuple[dict, dict]:
    """The harness on `tasks` with our LM and with its own `hf` model (float32, CPU)."""
    common = dict(tasks=tasks, task_manager=manager, limit=limit, log_samples=True, verbosity="ERROR")
    ours = simple_evaluate(model=lm, **common)
    hf_args = {"pretrained": str(model), "dtype": "float32", "device": "cpu"}
    theirs = simple_evaluate(model="hf", model_args=hf_args, batch_size=16, **common)
    return ours, theirs


# Our streamed runner and the harness's hf model compute in float32 with different batch shapes, so
# every matmul sums in another order: ~sqrt(K) * 2^-24 relative each (K <= 1536 terms: 2.3e-6), adding
# up over SmolLM2's 30 blocks to ~7e-5 in the final states and so in the log-likelihoods. (1e-5, the
# bound before, failed by 7% on an AMD EPYC with AVX2: a 15.7-nat request differed by 1.7e-4.)
LOGLIKELIHOOD_RTOL = 1e-4


def assert_same_responses(ours: dict, theirs: dict, task: str) -> None:
    """Per document and request: the same log-likelihood (to LOGLIKELIHOOD_RTOL) and, for loglikelihood
    requests, the same greedy flag; the same generated text."""
    for mine, hf in zip(ours["samples"][task], theirs["samples"][task], strict=True):
        assert mine["doc_id"] == hf["doc_id"] and mine["arguments"] == hf["arguments"]
        for a, b in zip(mine["resps"], hf["resps"], strict=True):
            a, b = a[0], b[0]
            if isinstance(a, str):
                assert a == b
            elif isinstance(a, tuple | list):
                assert a[0] == pytest.approx(b[0], rel=LOGLIKELIHOOD_RTOL, abs=1e-4)
                assert a[1] == b[1]
            else:
                assert a == pytest.approx(b, rel=LOGLIKELIHOOD_RTOL, abs=1e-4)


def test_seven_tasks_equal_the_harness_hf_model(text_model: Path, manager: TaskManager) -> None:
    runner = BlockRunner(CheckpointReader(text_model))
    lm = StreamedLM(runner, AutoTokenizer.from_pretrained(text_model), progress=False)
    ours, theirs = run_both(text_model, list(LOCAL_TASKS), 10, manager, lm)
    for task in LOCAL_TASKS:
        assert_same_responses(ours, theirs, task)
    mine, hf = harness_run(ours), harness_run(theirs)
    assert [(r.task, r.documents, r.metrics) for r in mine.tasks] == [
        (r.task, r.documents, r.metrics) for r in hf.tasks
    ]
    assert {r.task for r in mine.tasks} == set(LOCAL_TASKS)
    assert all("acc" in r.metrics for r in mine.tasks) and "acc_norm" in mine.tasks[1].metrics  # piqa
    # One scoring call for all seven tasks, whose hidden states fit one group: with no block kept
    # resident (block budget 0), every block is read exactly once for the whole run.
    assert lm.calls == 1 and lm.requests_scored == sum(len(s["resps"]) for t in LOCAL_TASKS for s in ours["samples"][t])
    assert runner.blocks_loaded == LAYERS


def test_rolling_loglikelihood_equals_the_harness_hf_model(
    text_model: Path, rolling_tasks: Path, manager: TaskManager
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    runner = BlockRunner(CheckpointReader(text_model))
    lm = StreamedLM(runner, tokenizer, progress=False, hidden_budget_bytes=300 * 64 * 4, batch_tokens=1024)
    ours, theirs = run_both(text_model, ["tiny_rolling"], 4, manager, lm)
    assert_same_responses(ours, theirs, "tiny_rolling")
    mine, hf = harness_run(ours).tasks[0].metrics, harness_run(theirs).tasks[0].metrics
    assert set(mine) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert mine == pytest.approx(hf, rel=1e-5)
    lines = (rolling_tasks / "texts.jsonl").read_text().splitlines()
    longest = max(len(tokenizer(json.loads(line)["text"])["input_ids"]) for line in lines)
    assert longest > 2 * 512  # several windows per text
    assert lm.calls == 1 and runner.blocks_loaded > LAYERS  # a small hidden budget: several groups


def test_greedy_generation_equals_the_harness_hf_model(text_model: Path, manager: TaskManager) -> None:
    runner = BlockRunner(CheckpointReader(text_model))
    lm = StreamedLM(runner, AutoTokenizer.from_pretrained(text_model), progress=False)
    ours, theirs = run_both(text_model, ["tiny_generate"], 4, manager, lm)
    assert_same_responses(ours, theirs, "tiny_generate")
    texts = [sample["resps"][0][0] for sample in ours["samples"]["tiny_generate"]]
    assert any(texts) and all("\n" not in text and "." not in text for text in texts)
    assert 4 <= lm.generated_tokens <= 4 * 8
    steps = max(1, lm.generated_tokens // 4)
    assert runner.blocks_loaded >= LAYERS * steps  # every step streams every block (budget 0)


def test_local_configs_are_the_harness_configs_with_local_data(manager: TaskManager) -> None:
    """Each local task includes the harness's config of the same name; only the data source differs."""
    for name in LOCAL_TASKS:
        harness = load_yaml(harness_tasks_dir() / LOCAL_TASKS[name].harness_config, resolve_func=False)
        local = load_yaml(manager.task_index[name].yaml_path, resolve_func=False)
        assert harness["task"] == local["task"] == name
        changed = {key for key in local if local[key] != harness.get(key)}
        assert changed <= {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "test_split",
                           "tag", "process_docs", "metadata"}  # fmt: skip
        assert local["doc_to_text"] == harness["doc_to_text"]
    loaded = manager.load(list(LOCAL_TASKS))["tasks"]
    assert {name: len(task.eval_docs) for name, task in loaded.items()} == VALIDATION_SIZES
    boolq = loaded["boolq"]
    doc = boolq.eval_docs[0]
    assert boolq.doc_to_text(doc).endswith("Question: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.doc_to_target(doc) == 0  # answer False -> "no"
    assert manager.load(["ai2_arc"])["tasks"].keys() == {"arc_easy", "arc_challenge"}  # the harness's tag


def test_cli_runs_harness_tasks(text_model: Path, rolling_tasks: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "result.json"
    argv = ["evaluate", str(text_model), "--tasks", "arc_easy,winogrande,tiny_rolling", "--limit", "3"]
    argv += ["--include-path", str(rolling_tasks), "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "word_perplexity" in printed and "lm-eval 0.4.13" in printed
    result = json.loads(out.read_text())
    tasks = result["zero_shot"]["tasks"]
    assert set(tasks) == {"arc_easy", "winogrande", "tiny_rolling"}
    assert tasks["arc_easy"]["metric"] == "acc" and tasks["arc_easy"]["score"] == tasks["arc_easy"]["acc"]
    assert tasks["arc_easy"]["documents"] == 3 and tasks["tiny_rolling"]["score"] is None
    assert result["zero_shot"]["average"] == pytest.approx((tasks["arc_easy"]["acc"] + tasks["winogrande"]["acc"]) / 2)
    assert result["settings"]["lm_eval_version"] == result["run"]["lm_eval_version"] == "0.4.13"
    assert result["run"]["block_loads"] == LAYERS  # one stream for the three tasks, blocks resident
    assert result["settings"]["shared_prefixes"] and "tokens" in printed
    unshared = tmp_path / "unshared.json"
    assert main([*argv[:-3], "--json", str(unshared), "--no-progress", "--no-shared-prefixes"]) == 0
    alone = json.loads(unshared.read_text())
    assert not alone["settings"]["shared_prefixes"] and alone["run"]["tokens"] > result["run"]["tokens"]
    for task, record in alone["zero_shot"]["tasks"].items():
        assert record["metrics"] == pytest.approx(tasks[task]["metrics"], rel=1e-6), task


def test_lm_reports_row_by_row_scoring_where_trees_are_not_supported(text_model: Path) -> None:
    runner = BlockRunner(CheckpointReader(text_model))
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    assert StreamedLM(runner, tokenizer, progress=False).shares_prefixes
    assert not StreamedLM(runner, tokenizer, share_prefixes=False, progress=False).shares_prefixes
    runner.parts.config._attn_implementation = "flash_attention_2"  # takes no mask functions
    assert not StreamedLM(runner, tokenizer, progress=False).shares_prefixes


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ("arc_easyy", r"unknown harness task\(s\) 'arc_easyy' \(close: arc_easy"),
        ("tiny_sample", "tiny_sample sample their generations"),
    ],
)
def test_cli_task_errors(text_model: Path, rolling_tasks: Path, capsys, tasks: str, message: str) -> None:
    argv = ["evaluate", str(text_model), "--tasks", tasks, "--include-path", str(rolling_tasks), "--no-progress"]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_smollm2_seven_tasks_equal_the_harness_hf_model(smollm2: Path, manager: TaskManager) -> None:
    """The real model, 20 documents of each of the seven tasks."""
    lm = StreamedLM(BlockRunner(CheckpointReader(smollm2)), AutoTokenizer.from_pretrained(smollm2), progress=False)
    ours, theirs = run_both(smollm2, list(LOCAL_TASKS), 20, manager, lm)
    for task in LOCAL_TASKS:
        assert_same_responses(ours, theirs, task)
    mine, hf = harness_run(ours), harness_run(theirs)
    assert [(r.task, r.metrics) for r in mine.tasks] == [(r.task, r.metrics) for r in hf.tasks]
