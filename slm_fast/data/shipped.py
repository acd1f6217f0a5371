"""Text shipped inside the package, so that calibration works right after `pip install` with no
network and no system package manager.

`texts/emma.jsonl.gz` is Jane Austen's *Emma* (1815, public domain), one chapter per JSON line
(`{"text": ...}`), exactly as `slm_fast.data.austen.read_austen` reads it from the janeaustenr data
(about 0.9 MB of text, 0.3 MB compressed). *Pride and Prejudice* is not shipped: it is the held-out
perplexity text.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

SHIPPED_TEXTS = {"emma": "emma.jsonl.gz"}


def read_shipped(title: str) -> list[str]:
    """The chapters of a shipped novel (a key of SHIPPED_TEXTS)."""
    data = resources.files("slm_fast.data").joinpath("texts", SHIPPED_TEXTS[title]).read_bytes()
    return [json.loads(line)["text"] for line in gzip.decompress(data).decode("utf-8").splitlines()]
