"""Test set-up: one torch thread, and Triton in interpreter mode when no GPU is present (the variable
must be set before the first `import triton`)."""

import os

os.environ.setdefault("SLM_FAST_THREADS", "1")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ["SLM_FAST_THREADS"]))
