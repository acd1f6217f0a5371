"""A plain whole-model reimplementation of the reference SLM loop (slm_reference.md sections 1-3),
the oracle of `--preset reference`: a deepcopy of the whole model per candidate, the in-place merge
update exactly as SLM.py writes it, one calibration sample per forward pass, Hugging Face's
hidden_states[-1] as the representation."""

from __future__ import annotations

import copy

import torch

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
PROJECTIONS += ("mlp.up_proj", "mlp.down_proj")


def merge_layers_return_model(model, lo: int, hi: int):
    """SLM.py 75-103: for k = lo..hi, theta_lo += (theta_k - theta_lo) in place on the copy's
    projection weights; norms untouched; layers lo+1..hi deleted; layer_idx renumbered."""
    merged = copy.deepcopy(model)
    layers = merged.model.layers
    originals = model.model.layers
    with torch.no_grad():
        for k in range(lo, hi + 1):
            for name in PROJECTIONS:
                base = layers[lo].get_submodule(name).weight
                base += originals[k].get_submodule(name).weight - base
    kept = [layer for i, layer in enumerate(layers) if not lo < i <= hi]
    merged.model.layers = torch.nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    merged.config.num_hidden_layers = len(kept)
    return merged


@torch.no_grad()
def final_hidden(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    return [model(ids[None], output_hidden_states=True).hidden_states[-1] for ids in input_ids]


def cal_sim(reference: list[torch.Tensor], model, input_ids: torch.Tensor) -> float:
    sims = [
        torch.nn.functional.cosine_similarity(ref.flatten().double(), out.flatten().double(), dim=0)
        for ref, out in zip(reference, final_hidden(model, input_ids), strict=True)
    ]
    return torch.stack(sims).mean().item()


def reference_slm(model, input_ids: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """SLM.py 180-213; returns the committed windows (source numbering, top first)."""
    reference = final_hidden(model, input_ids)
    hi = model.config.num_hidden_layers - 2
    lo = hi - 1
    current, windows = model, []
    while lo >= 0:
        candidate = merge_layers_return_model(current, lo, hi)
        if cal_sim(reference, candidate, input_ids) > threshold:
            lo -= 1
        elif lo + 1 != hi:
            current = merge_layers_return_model(current, lo + 1, hi)
            windows.append((lo + 1, hi))
            hi = lo
        else:
            hi -= 1
            lo -= 1
    return windows


def reference_laco(model, input_ids: torch.Tensor, threshold: float, merge_layers: int, interval: int = 1):
    """LaCo's notebook loop (reference/peers.md 2.2) on the whole model, in current-layer numbering:
    HIGHEST_LAY = L-1, LOWEST_LAY = 0; returns the final merged model."""
    reference = final_hidden(model, input_ids)
    current = model
    lay = model.config.num_hidden_layers - 1 - merge_layers
    while lay >= 0:
        lay = min(lay, current.config.num_hidden_layers - 1 - merge_layers)
        if lay < 0:
            break
        candidate = merge_layers_return_model(current, lay, lay + merge_layers)
        if cal_sim(reference, candidate, input_ids) > threshold:
            current = candidate
            lay -= interval
        else:
            lay -= 1
    return current
