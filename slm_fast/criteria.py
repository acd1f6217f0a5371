"""Similarity criteria between the original model's final hidden states and a candidate's.

- cosine: the reference SLM criterion (slm_reference.md 1a): per calibration sample, the cosine
  between the flattened [seq_len x d] final-norm outputs; the score is the mean over samples.
- cka-linear / cka-rbf: CKA between the two models' final-norm token representations, every
  calibration token a point (n = samples x seq_len), through the streaming similarity engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slm_fast.errors import InputError

CRITERIA = ("cosine", "cka-linear", "cka-rbf")


def check_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise InputError(f"unknown criterion {name!r}; choose one of: {', '.join(CRITERIA)}")
    return name


def similarity_to_reference(criterion: str, reference: Tensor, candidate: Tensor) -> float:
    """Score of `candidate` [N, S, d] against `reference` [N, S, d]; higher is more similar."""
    check_criterion(criterion)
    if reference.shape != candidate.shape:
        raise InputError(f"reference {list(reference.shape)} and candidate {list(candidate.shape)} differ in shape")
    if criterion == "cosine":
        ref = reference.reshape(reference.shape[0], -1).double()
        cand = candidate.reshape(candidate.shape[0], -1).double()
        return torch.nn.functional.cosine_similarity(ref, cand, dim=1).mean().item()
    from slm_fast.similarity import cka_matrix

    tokens = [reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])]
    kernel = criterion.removeprefix("cka-")
    return cka_matrix(tokens, kernel=kernel, pairs=[(0, 1)])[0, 1].item()
