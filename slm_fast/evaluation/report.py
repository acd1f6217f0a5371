"""The results of one `slm-fast evaluate` run as a readable table and as a JSON-ready dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slm_fast.evaluation.harness import TaskResult
from slm_fast.evaluation.local_tasks import LOCAL_TASKS
from slm_fast.evaluation.perplexity import PerplexityResult


def average_score(results: list[TaskResult]) -> float | None:
    """Plain mean of the reported metric over the tasks that have one (the papers' average over the
    seven tasks)."""
    scores = [result.score for result in results if result.score is not None]
    return sum(scores) / len(scores) if scores else None


@dataclass
class EvaluationReport:
    model: str
    limit: int | None  # documents per task (None = whole evaluation splits)
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)  # by corpus name
    tasks: list[TaskResult] = field(default_factory=list)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # block loads, peak RSS, seconds

    @property
    def average(self) -> float | None:
        return average_score(self.tasks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "run": self.run,
            "perplexity": {corpus: result.as_dict() for corpus, result in self.perplexity.items()},
            "zero_shot": {
                "limit": self.limit,
                "tasks": {result.task: result.as_dict() for result in self.tasks},
                "groups": self.groups,
                "average": self.average,
                "average_over": [result.task for result in self.tasks if result.score is not None],
            },
        }

    def table(self) -> str:
        sections = []
        if self.perplexity:
            sections.append(self._perplexity_table())
        if self.tasks:
            sections.append(self._task_table())
        if self.run:
            sections.append(self._run_line())
        return "\n\n".join(sections)

    def _perplexity_table(self) -> str:
        width = max(len("corpus"), *(len(c) for c in self.perplexity))
        lines = [
            "Perplexity (the first token of a window is not predicted; with a stride, each window scores "
            "only the tokens the previous one did not)",
            f"{'corpus':<{width}}  {'seq_len':>7}  {'stride':>6}  {'windows':>7}  {'tokens':>8}  "
            f"{'NLL':>7}  {'PPL':>9}",
        ]
        for corpus, r in self.perplexity.items():
            stride = "-" if r.stride is None else str(r.stride)
            lines.append(
                f"{corpus:<{width}}  {r.seq_len:>7}  {stride:>6}  {r.windows:>7}  {r.tokens:>8}  "
                f"{r.mean_nll:>7.4f}  {r.ppl:>9.3f}"
            )
        return "\n".join(lines)

    def _task_table(self) -> str:
        subset = "all documents" if self.limit is None else f"first {self.limit} documents"
        width = max(len("task"), *(len(r.task) for r in self.tasks))
        lines = [
            f"lm-evaluation-harness tasks ({subset}; * = the metric the layer-pruning papers report)",
            f"{'task':<{width}}  {'docs':>5}  metrics",
        ]
        for r in self.tasks:
            shown = "  ".join(
                f"{name} {value:.4f}"
                + ("*" if name == r.paper_metric else "")
                + (f" ± {r.stderr[name]:.4f}" if name in r.stderr else "")
                for name, value in r.metrics.items()
            )
            lines.append(f"{r.task:<{width}}  {r.documents:>5}  {shown}")
        for name, metrics in self.groups.items():
            lines.append(f"{name:<{width}}  group  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        scored = [r for r in self.tasks if r.score is not None]
        if scored:
            names = "the seven tasks" if len(scored) == len(LOCAL_TASKS) else f"{len(scored)} of the seven tasks"
            lines.append(f"average of the reported metrics over {names}: {self.average:.4f}")
        return "\n".join(lines)

    def _run_line(self) -> str:
        r = self.run
        line = (
            f"{r['seconds']:.1f} s; {r['block_loads']} block loads ({r['blocks']} blocks); "
            f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB"
        )
        if r.get("tokens"):
            line += f"; {r['requests']} requests scored on {r['tokens']} tokens"
        if r.get("processes", 1) > 1:
            line += f" (summed over {r['processes']} processes; peak RSS of the largest)"
        if r.get("lm_eval_version"):  # only runs that scored harness tasks used it
            line += f"; lm-eval {r['lm_eval_version']}"
        return line
