"""The results of one `slm-fast evaluate` run as a readable table and as a JSON-ready dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slm_fast.evaluation.perplexity import PerplexityResult
from slm_fast.evaluation.tasks import TASKS
from slm_fast.evaluation.zeroshot import TaskResult, average_score


@dataclass
class EvaluationReport:
    model: str
    limit: int | None  # documents per task (None = whole validation splits)
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)  # by corpus name
    tasks: list[TaskResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float | None:
        return average_score(self.tasks) if self.tasks else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "perplexity": {corpus: result.as_dict() for corpus, result in self.perplexity.items()},
            "zero_shot": {
                "limit": self.limit,
                "tasks": {result.task: result.as_dict() for result in self.tasks},
                "average": self.average,
                "average_over": [result.task for result in self.tasks],
            },
        }

    def table(self) -> str:
        sections = []
        if self.perplexity:
            sections.append(self._perplexity_table())
        if self.tasks:
            sections.append(self._task_table())
        return "\n\n".join(sections)

    def _perplexity_table(self) -> str:
        width = max(len("corpus"), *(len(c) for c in self.perplexity))
        lines = [
            "Perplexity (each window scored on its own; the first token of a window is not predicted)",
            f"{'corpus':<{width}}  {'seq_len':>7}  {'windows':>7}  {'tokens':>8}  {'NLL':>7}  {'PPL':>9}",
        ]
        for corpus, r in self.perplexity.items():
            lines.append(
                f"{corpus:<{width}}  {r.seq_len:>7}  {r.windows:>7}  {r.tokens:>8}  {r.mean_nll:>7.4f}  {r.ppl:>9.3f}"
            )
        return "\n".join(lines)

    def _task_table(self) -> str:
        subset = "all documents" if self.limit is None else f"first {self.limit} documents"
        lines = [
            f"Zero-shot accuracy ({subset} of each validation split; * = the metric the papers report)",
            f"{'task':<11} {'docs':>5}  {'acc':<7}   {'acc_norm':<8}  reported",
        ]
        for r in self.tasks:
            acc = f"{r.acc:.4f}" + ("*" if r.metric == "acc" else " ")
            norm = "-" if r.acc_norm is None else f"{r.acc_norm:.4f}" + ("*" if r.metric == "acc_norm" else " ")
            reported = f"{r.score:.4f} ± {r.stderr:.4f}"
            lines.append(f"{TASKS[r.task].label:<11} {r.documents:>5}  {acc:<8}  {norm:<8}  {reported}")
        names = "the seven tasks" if len(self.tasks) == len(TASKS) else f"{len(self.tasks)} of the seven tasks"
        lines.append(f"average of the reported metrics over {names}: {self.average:.4f}")
        return "\n".join(lines)
