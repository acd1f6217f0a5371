"""Process-wide settings. The torch thread count matters on small machines: with 2 cores, torch on 2
threads becomes 5-25x slower whenever another process uses a core, so it is explicit here."""

from __future__ import annotations

import os

import torch

THREADS_ENV = "SLM_FAST_THREADS"


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count from `threads`, else $SLM_FAST_THREADS, else leave torch's
    default. Returns the count in effect."""
    if threads is None and os.environ.get(THREADS_ENV):
        threads = int(os.environ[THREADS_ENV])
    if threads is not None:
        if threads < 1:
            raise ValueError(f"thread count must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
