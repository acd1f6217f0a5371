"""Zero-shot multiple-choice accuracy: acc (argmax of the summed log-likelihood) and acc_norm
(argmax of the log-likelihood per character of the choice text), as lm-eval-harness computes them."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.evaluation.scoring import encode_requests, loglikelihoods
from slm_fast.evaluation.tasks import TASKS, Document, load_documents
from slm_fast.runtime.stream import BlockRunner

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when the config names no context length


@dataclass(frozen=True)
class TaskResult:
    task: str
    documents: int
    requests: int
    acc: float
    acc_norm: float | None  # None for tasks where the harness reports acc only
    metric: str  # which of the two the papers report
    seconds: float

    @property
    def score(self) -> float:
        """The reported metric's value."""
        value = self.acc if self.metric == "acc" else self.acc_norm
        assert value is not None
        return value

    @property
    def stderr(self) -> float:
        """Standard error of `score` over the documents (the harness's sample formula)."""
        n = self.documents
        return math.sqrt(self.score * (1 - self.score) / (n - 1)) if n > 1 else float("nan")

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"score": self.score, "stderr": self.stderr}


def choice_scores(documents: Sequence[Document], loglik: Tensor) -> tuple[float, float]:
    """(acc, acc_norm) of `documents` given the log-likelihood of each of their choices, in order.
    Ties go to the first choice, as numpy's argmax does in the harness."""
    correct = correct_norm = 0
    start = 0
    for doc in documents:
        lls = loglik[start : start + len(doc.choices)]
        start += len(doc.choices)
        chars = torch.tensor([choice.norm_chars for choice in doc.choices], dtype=torch.float64)
        correct += int(_first_argmax(lls) == doc.gold)
        correct_norm += int(_first_argmax(lls / chars) == doc.gold)
    return correct / len(documents), correct_norm / len(documents)


def _first_argmax(values: Tensor) -> int:
    return int((values == values.max()).nonzero()[0])


def evaluate_task(
    runner: BlockRunner,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    *,
    limit: int | None = None,
    hidden_budget_bytes: int = 2 * 10**9,
    batch_tokens: int = 4096,
    head_rows: int = 512,
    progress: bool = True,
) -> TaskResult:
    """Score the first `limit` documents (all when None) of task `name`."""
    started = time.perf_counter()
    documents = load_documents(name, limit)
    task = TASKS[name]
    max_length = getattr(runner.parts.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    pairs = [(choice.context, choice.continuation) for doc in documents for choice in doc.choices]
    try:
        requests = encode_requests(tokenizer, pairs, max_length)
    except InputError as exc:
        raise InputError(f"task {name}: {exc}") from exc
    loglik = loglikelihoods(
        runner,
        requests,
        hidden_budget_bytes=hidden_budget_bytes,
        batch_tokens=batch_tokens,
        head_rows=head_rows,
        progress=progress,
        desc=name,
    )
    acc, acc_norm = choice_scores(documents, loglik)
    return TaskResult(
        task=name,
        documents=len(documents),
        requests=len(requests),
        acc=acc,
        acc_norm=acc_norm if task.has_acc_norm else None,
        metric=task.metric,
        seconds=time.perf_counter() - started,
    )


def average_score(results: Sequence[TaskResult]) -> float:
    """Plain mean of the reported metric over the tasks (the papers' average over the seven)."""
    return sum(result.score for result in results) / len(results)
