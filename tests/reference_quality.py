"""Whole-model oracles for the logit criteria and SLEB: a deepcopy of the whole Hugging Face model per
candidate, every logit of every token at once, float64 arithmetic."""

from __future__ import annotations

import copy

import torch


def without_blocks(model, dropped):
    """A copy of `model` with the decoder blocks in `dropped` deleted (layer_idx renumbered)."""
    pruned = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(pruned.model.layers) if i not in set(dropped)]
    pruned.model.layers = torch.nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    pruned.config.num_hidden_layers = len(kept)
    return pruned


@torch.no_grad()
def log_probs(model, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids).logits.double(), dim=-1)


def whole_kl(original, candidate, input_ids: torch.Tensor) -> float:
    log_p, log_q = log_probs(original, input_ids), log_probs(candidate, input_ids)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def whole_nll(model, input_ids: torch.Tensor) -> float:
    log_q = log_probs(model, input_ids)[:, :-1]
    return -log_q.gather(-1, input_ids[:, 1:, None]).mean().item()


def reference_sleb(model, input_ids: torch.Tensor, remove: int) -> list[int]:
    """SLEB's loop on the whole model: remove, one at a time, the block (never the first or the last)
    whose removal gives the lowest calibration perplexity; returns the blocks in removal order."""
    num_blocks = model.config.num_hidden_layers
    dropped: list[int] = []
    for _ in range(remove):
        candidates = [b for b in range(1, num_blocks - 1) if b not in dropped]
        nlls = [whole_nll(without_blocks(model, [*dropped, b]), input_ids) for b in candidates]
        dropped.append(candidates[min(range(len(candidates)), key=nlls.__getitem__)])
    return dropped
