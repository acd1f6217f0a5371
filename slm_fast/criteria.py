"""Similarity criteria between the original model's final hidden states and a candidate's.

- cosine: the reference SLM criterion (slm_reference.md 1a): per calibration sample, the cosine
  between the flattened [seq_len x d] final-norm outputs; the score is the mean over samples.
- cka-linear / cka-rbf: CKA between the two models' final-norm token representations, every
  calibration token a point (n = samples x seq_len), through the streaming similarity engine.
- kl: minus the mean, over every calibration token, of KL(original's next-token distribution ||
  candidate's) in nats (EvoPress's fitness). 0 is the original model; higher is more similar.
- ppl: minus the candidate's mean next-token negative log-likelihood on the calibration tokens
  (minus log perplexity; SLEB's criterion). Higher is better.

kl and ppl need the model's head (final-norm output -> logits) and ppl the calibration token ids. The
logits are computed over chunks of tokens so that vocabulary x tokens is never held at once (a 128k
vocabulary over 128 x 2048 tokens would be 134 GB in float32); sums accumulate in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from slm_fast.errors import InputError

CRITERIA = ("cosine", "cka-linear", "cka-rbf", "kl", "ppl")
LOGIT_CRITERIA = ("kl", "ppl")
LOGIT_CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MB in float32): rows = this // vocabulary

Head = Callable[[Tensor], Tensor]


def check_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise InputError(f"unknown criterion {name!r}; choose one of: {', '.join(CRITERIA)}")
    return name


def similarity_to_reference(
    criterion: str,
    reference: Tensor,
    candidate: Tensor,
    *,
    head: Head | None = None,
    input_ids: Tensor | None = None,
) -> float:
    """Score of `candidate` [N, S, d] against `reference` [N, S, d]; higher is more similar.

    `head` maps final-norm outputs to logits (needed by kl and ppl); `input_ids` [N, S] are the tokens
    both were computed on (needed by ppl)."""
    check_criterion(criterion)
    if reference.shape != candidate.shape:
        raise InputError(f"reference {list(reference.shape)} and candidate {list(candidate.shape)} differ in shape")
    if criterion in LOGIT_CRITERIA:
        if head is None:
            raise ValueError(f"criterion {criterion} needs the model's head")
        if criterion == "kl":
            return -mean_kl(head, reference, candidate)
        if input_ids is None:
            raise ValueError("criterion ppl needs the calibration token ids")
        return -mean_nll(head, candidate, input_ids)
    if criterion == "cosine":
        ref = reference.reshape(reference.shape[0], -1).double()
        cand = candidate.reshape(candidate.shape[0], -1).double()
        return torch.nn.functional.cosine_similarity(ref, cand, dim=1).mean().item()
    from slm_fast.similarity import cka_matrix

    tokens = [reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])]
    kernel = criterion.removeprefix("cka-")
    return cka_matrix(tokens, kernel=kernel, pairs=[(0, 1)])[0, 1].item()


def _row_slices(head: Head, rows: Tensor) -> list[slice]:
    """Slices of `rows` small enough that their logits stay under LOGIT_CHUNK_ELEMENTS (the vocabulary
    is read off the head's output for one row)."""
    vocabulary = head(rows[:1]).shape[-1]
    step = max(1, LOGIT_CHUNK_ELEMENTS // vocabulary)
    return [slice(start, start + step) for start in range(0, rows.shape[0], step)]


def _log_probs(head: Head, hidden: Tensor) -> Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1)


@torch.inference_mode()
def mean_kl(head: Head, reference: Tensor, candidate: Tensor) -> float:
    """Mean over tokens of KL(softmax(head(reference)) || softmax(head(candidate))), in nats."""
    ref = reference.reshape(-1, reference.shape[-1])
    cand = candidate.reshape(-1, candidate.shape[-1])
    total = torch.zeros((), dtype=torch.float64)
    for rows in _row_slices(head, ref):
        log_p, log_q = _log_probs(head, ref[rows]), _log_probs(head, cand[rows])
        total += (log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64).cpu()
    return (total / ref.shape[0]).item()


@torch.inference_mode()
def mean_nll(head: Head, hidden: Tensor, input_ids: Tensor) -> float:
    """Mean next-token negative log-likelihood of `input_ids` [N, S] given final-norm outputs `hidden`
    [N, S, d] (position t predicts token t + 1), in nats."""
    if input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"token ids {list(input_ids.shape)} do not match hidden states {list(hidden.shape)}")
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1).to(hidden.device)
    total = torch.zeros((), dtype=torch.float64)
    for rows in _row_slices(head, states):
        picked = _log_probs(head, states[rows]).gather(1, targets[rows, None])
        total -= picked.sum(dtype=torch.float64).cpu()
    return (total / states.shape[0]).item()
