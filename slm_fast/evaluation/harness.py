"""Running lm-evaluation-harness tasks on the block-streamed model: task lookup (the seven local
tasks override the harness's hub-backed ones unless told otherwise), checks that fail before any
long work, the harness's `simple_evaluate`, and its results as `TaskResult`s."""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slm_fast.errors import InputError
from slm_fast.evaluation.local_tasks import LOCAL_TASKS, write_local_configs

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

SUPPORTED_LM_EVAL = "==0.4.13"  # the version tested here; keep in step with pyproject's `eval` extra


def lm_eval_version() -> str:
    """The installed lm-eval version, or a clear error naming the extra to install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise InputError(
            f"--tasks needs lm-evaluation-harness: pip install 'slm-fast[eval]' (lm-eval{SUPPORTED_LM_EVAL})"
        ) from None


def parse_tasks(text: str) -> list[str]:
    """'all' (the seven tasks of the layer-pruning papers) or comma-separated harness task, group or
    tag names (or YAML paths)."""
    if text.strip() == "all":
        return list(LOCAL_TASKS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError(f"--tasks {text!r} names no task")
    return names


def task_manager(*, local: bool, include_path: Sequence[Path] = (), workdir: Path) -> TaskManager:
    """The harness's TaskManager over its own tasks, the user's `include_path` folders and (when
    `local`) the local configs of the seven tasks written into `workdir`."""
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not folder.is_dir():
            raise InputError(f"--include-path {folder}: not a folder")
    paths = [str(folder) for folder in include_path]
    if local:
        paths.append(str(write_local_configs(workdir / "local_tasks")))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns for each overridden task
    return TaskManager(include_path=paths or None)


def check_task_names(manager: TaskManager, names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in unknown}
        described = "; ".join(f"{name!r} (close: {', '.join(close) or 'none'})" for name, close in hints.items())
        raise InputError(f"--tasks: unknown harness task(s) {described}")


def check_tasks_load(manager: TaskManager, names: Sequence[str], *, limit: int | None, processes: int) -> None:
    """Load the tasks (which reads their data) and refuse sampled generation, before any scoring; with
    several processes, every task needs a document for each (the harness splits documents among them
    and fails on a process with none)."""
    try:
        loaded = manager.load(list(names))
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as exc:
        raise InputError(
            f"--tasks: the harness could not load {', '.join(names)}: {exc} (offline, the local tasks are "
            f"{', '.join(LOCAL_TASKS)})"
        ) from exc
    sampled = sorted(name for name, task in loaded["tasks"].items() if _samples(task.get_config("generation_kwargs")))
    if sampled:
        raise InputError(
            f"--tasks: {', '.join(sampled)} sample their generations (do_sample / temperature > 0); the "
            "block-streamed model generates greedily only"
        )
    if processes > 1:
        short = {
            name: count
            for name, task in loaded["tasks"].items()
            if (count := min(len(task.eval_docs), limit or len(task.eval_docs))) < processes
        }
        if short:
            raise InputError(
                f"--tasks: {', '.join(f'{name} ({count} documents)' for name, count in sorted(short.items()))} "
                f"cannot be split among {processes} processes; raise --limit or run fewer processes"
            )


def _samples(generation_kwargs: dict[str, Any] | None) -> bool:
    kwargs = generation_kwargs or {}
    return bool(kwargs.get("do_sample")) or float(kwargs.get("temperature") or 0.0) > 0


@dataclass(frozen=True)
class TaskResult:
    """One harness task's metrics (filter "none" keys without the suffix) on `documents` documents."""

    task: str
    documents: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    paper_metric: str | None = None  # for the seven tasks: the metric the papers report

    @property
    def score(self) -> float | None:
        return self.metrics.get(self.paper_metric) if self.paper_metric else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "documents": self.documents,
            "acc": self.metrics.get("acc"),
            "acc_norm": self.metrics.get("acc_norm"),
            "metric": self.paper_metric,
            "score": self.score,
            "stderr": self.stderr.get(self.paper_metric) if self.paper_metric else None,
            "metrics": self.metrics,
            "metrics_stderr": self.stderr,
        }


@dataclass
class HarnessRun:
    tasks: list[TaskResult]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)  # task versions, as the harness reports them


def prepare_tasks(
    names: Sequence[str],
    *,
    workdir: Path,
    local: bool = True,
    include_path: Sequence[Path] = (),
    limit: int | None = None,
    processes: int = 1,
) -> TaskManager:
    """The task manager for `names`, checked: every name known, every task's data loadable, no sampled
    generation, enough documents (after `limit`) for `processes` processes. Cheap next to scoring, so a
    bad --tasks fails before the model is touched."""
    manager = task_manager(local=local, include_path=include_path, workdir=workdir)
    check_task_names(manager, names)
    check_tasks_load(manager, names, limit=limit, processes=processes)
    return manager


def evaluate_tasks(lm: LM, names: Sequence[str], *, limit: int | None, manager: TaskManager) -> HarnessRun | None:
    """Run harness tasks `names` on `lm` (zero-shot unless a task's config says otherwise) on the first
    `limit` documents of each (all when None); `manager` from `prepare_tasks` (whose workdir must
    still exist). With an LM on several processes, every rank calls this; rank 0 gets the results of
    all documents, the others None."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=False, verbosity="ERROR"
    )
    return None if results is None else harness_run(results)


def harness_run(results: dict[str, Any]) -> HarnessRun:
    """Our view of the harness's results dict."""
    groups = set(results.get("groups", {}))
    tasks = []
    for name, values in results["results"].items():
        if name in groups:
            continue
        metrics, stderr = _metrics(values)
        documents = int(results["n-samples"][name]["effective"])
        paper_metric = LOCAL_TASKS[name].paper_metric if name in LOCAL_TASKS else None
        tasks.append(TaskResult(name, documents, metrics, stderr, paper_metric))
    return HarnessRun(
        tasks=tasks,
        groups={name: _metrics(results["groups"][name])[0] for name in groups},
        versions=dict(results.get("versions", {})),
    )


def _metrics(values: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """{'acc,none': x, 'acc_stderr,none': s, 'alias': ...} -> ({'acc': x}, {'acc': s}); a filter other
    than 'none' stays in the name ('exact_match,strict')."""
    metrics, stderr = {}, {}
    for key, value in values.items():
        if "," not in key or not isinstance(value, int | float):
            continue
        metric, filter_name = key.split(",", 1)
        value = float(value) if value is not None else math.nan
        if metric.endswith("_stderr"):
            stderr[_named(metric.removesuffix("_stderr"), filter_name)] = value
        else:
            metrics[_named(metric, filter_name)] = value
    return metrics, stderr


def _named(metric: str, filter_name: str) -> str:
    return metric if filter_name == "none" else f"{metric},{filter_name}"
