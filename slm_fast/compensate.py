"""Training-free compensation of a pruned model (ReplaceMe-style, arXiv 2505.02819): after any method
has chosen what to merge or drop, each output block that now does the work of several source blocks
(a merged window, or the kept block just below a dropped run) gets a linear map T [d x d] on its MLP's
output, fitted so that the block reproduces the original model's hidden state at the top of the span:

    block output = Y + M  ->  Y + M T,    T = argmin ||M T - (h_target - Y)||^2 + lam ||T - I||^2

where Y is the block's residual stream after attention, M its MLP output (both on the pruned model's
own input to that block, so errors of lower spans are seen and corrected), and h_target the original
hidden state at the boundary the next output block expects. The ridge pulls T toward the identity (no
correction), lam = ridge * trace(M^T M) / d. T is folded into the down projection, W' = T^T W, so the
result is a standard checkpoint of the same architecture.

Out of core: one bottom-up sweep over the output blocks (each built once from the reader), one chunk
of calibration samples at a time (the cache's chunks; the pruned model's running state of each chunk is
kept in the cache's tiered store, so it is held, spilled and counted like the calibration states); the
normal equations M^T M and M^T R (d x d) accumulate in float64 and are solved in float64, on the GPU
when the run is on one and its free memory holds them (sums_device: a CPU takes minutes to hours for
d = 8192 over many calibration tokens, a GPU's float64 units seconds). Only
architectures whose block output is `residual + mlp(...)` with an `mlp.down_proj` qualify (not
Gemma's post-feedforward norm).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slm_fast.errors import InputError
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.stream import BlockRunner
from slm_fast.slm import window_block
from slm_fast.windows import Window

COMPENSATIONS = ("none", "linear")
DOWN_PROJ = "mlp.down_proj.weight"
# Chosen on validation text only (bench/quality_protocol.md, SmolLM2, SLEB's 6 blocks, 10 x 128
# calibration tokens): mean validation log-perplexity 4.355 at 0.01, 4.152 at 1, 4.168 at 10. A
# weak ridge over-fits the calibration text's domain (0.01 raises BoolQ-passage perplexity by ~0.5 nats).
DEFAULT_RIDGE = 1.0
TOKENS_PER_CHUNK = 4096


@dataclass
class SpanFit:
    """One compensated output block: where it sits, what it replaces, and how well the fit does on the
    calibration tokens (residual energy relative to ||h_target - Y||^2, without and with T)."""

    position: int
    source: Window
    target_boundary: int
    tokens: int
    relative_error_before: float
    relative_error_after: float


@dataclass
class Compensation:
    maps: dict[int, Tensor]  # output position -> T [d, d] (float32)
    fits: list[SpanFit]
    skipped: list[str]

    def fold(self, position: int, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The output block's tensors with its map folded into the down projection (a block transform
        for export_merged_checkpoint)."""
        if position not in self.maps:
            return tensors
        return {**tensors, DOWN_PROJ: fold_down_proj(tensors[DOWN_PROJ], self.maps[position])}

    def to_json(self) -> dict:
        return {"spans": [asdict(f) for f in self.fits], "skipped": self.skipped}


def check_compensation(name: str) -> str:
    if name not in COMPENSATIONS:
        raise InputError(f"unknown compensation {name!r}; choose one of: {', '.join(COMPENSATIONS)}")
    return name


def carriers(plan: list[Window], num_blocks: int) -> dict[int, int]:
    """Output positions whose block must do more than its own source block's work -> the source
    boundary its output should reproduce (the input of the next output block, or L after the last)."""
    found = {}
    for position, (lo, hi) in enumerate(plan):
        target = plan[position + 1][0] if position + 1 < len(plan) else num_blocks
        if hi != lo or target != lo + 1:
            found[position] = target
    return found


def fold_down_proj(weight: Tensor, transform: Tensor) -> Tensor:
    """W' = T^T W for W [d, ffn] (the MLP output x W^T then becomes x W^T T), in float64, cast back."""
    return (transform.double().T @ weight.double()).to(weight.dtype)


def solve_ridge(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """argmin_T ||M T - R||^2 + lam ||T - I||^2 from M^T M and M^T R (float64), lam = ridge * tr / d."""
    d = gram.shape[0]
    lam = ridge * gram.diagonal().sum() / d
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross + lam * eye)


def fit_linear(
    runner: BlockRunner,
    cache: HiddenStateCache,
    plan: list[Window],
    *,
    rule: str,
    average_settings: str = "low",
    ridge: float = DEFAULT_RIDGE,
    progress: bool = True,
) -> Compensation:
    """Fit T for every carrier of `plan` (the source window of every output block), bottom-up on the
    pruned model's own hidden states; `cache` holds the original states of the calibration tokens."""
    targets = carriers(plan, runner.num_blocks)
    maps: dict[int, Tensor] = {}
    fits: list[SpanFit] = []
    skipped: list[str] = []
    if plan[0][0] != 0:
        skipped.append(f"blocks 0..{plan[0][0] - 1} dropped: no block below them carries a correction")
    if not targets:
        return Compensation(maps, fits, skipped)
    start = min(targets)
    states = _PrunedStates(cache, plan[start][0])
    specs = [window_block(window, rule, runner.reader, average_settings) for window in plan[start : max(targets) + 1]]
    runner.plan(specs)  # one pass up: residency and prefetch follow it (cost.Replay.compensation replays it)
    bar = tqdm(total=len(targets), desc="compensating", unit="span", disable=not progress)
    try:
        for position, spec in enumerate(specs, start=start):
            window = plan[position]
            block = runner.block(spec)
            if position in targets:
                _check_block(block, window)
                transform, fit = _fit_block(runner, block, spec.layer_index, states, cache, targets[position], ridge)
                maps[position] = transform.float().cpu()
                fits.append(SpanFit(position, window, targets[position], **fit))
                block = copy.deepcopy(block)
                with torch.no_grad():
                    weight = block.mlp.down_proj.weight
                    weight.copy_(fold_down_proj(weight, transform.to(weight.device)))
                bar.update()
            for chunk in states.chunks:
                states.put(chunk, runner.apply(block, spec.layer_index, states.get(chunk)))
    finally:
        states.close()
        bar.close()
    return Compensation(maps, fits, skipped)


class _PrunedStates:
    """The pruned model's hidden state per chunk of calibration samples as the sweep climbs: at first
    the cached original boundary it starts from, then each chunk's own output, kept in the cache's
    tiered store (under keys of its own) so that it never needs all chunks at once."""

    def __init__(self, cache: HiddenStateCache, boundary: int):
        self.cache, self.boundary = cache, boundary
        self.chunks = range(max(1, len(cache.chunks)))
        self._own: set[int] = set()

    def get(self, chunk: int) -> Tensor:
        if chunk in self._own:
            return self.cache.store.get(("compensate", chunk))
        return self.cache.get_chunk(self.boundary, chunk)

    def put(self, chunk: int, hidden: Tensor) -> None:
        self.cache.store.put(("compensate", chunk), hidden)
        self._own.add(chunk)

    def close(self) -> None:
        for chunk in self._own:
            self.cache.store.discard(("compensate", chunk))


def sums_device(device: torch.device, d: int, piece_tokens: int) -> torch.device:
    """Where a fit's float64 sums live: `device` if it is a GPU whose free memory holds them twice over
    (M^T M, M^T R, and a piece's M, R and block output in float64), else the CPU. Bits differ between
    the two only by summation order."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = (2 * d * d + 4 * piece_tokens * d) * 8
    free, _ = torch.cuda.mem_get_info(device)
    return device if free > 2 * need else torch.device("cpu")


def _check_block(block: nn.Module, window: Window) -> None:
    mlp = getattr(block, "mlp", None)
    if mlp is None or not hasattr(mlp, "down_proj") or hasattr(block, "post_feedforward_layernorm"):
        raise InputError(
            f"--compensate linear folds into mlp.down_proj of a block whose output is residual + mlp; "
            f"{type(block).__name__} (block {window[0]}) is not of that form"
        )


def _fit_block(
    runner: BlockRunner,
    block: nn.Module,
    source_index: int,
    states: _PrunedStates,
    cache: HiddenStateCache,
    target_boundary: int,
    ridge: float,
) -> tuple[Tensor, dict]:
    """Accumulate M^T M, M^T R over the chunks (each in pieces of TOKENS_PER_CHUNK tokens) and solve
    for T (float64, on sums_device; T is returned there)."""
    gram = cross = energy = untouched = None  # energy ||R||^2, untouched ||R - M||^2 (T = I)
    tokens = 0
    mlp_outputs: list[Tensor] = []
    hook = block.mlp.register_forward_hook(lambda module, args, output: mlp_outputs.append(output))
    try:
        for chunk in states.chunks:
            hidden, target = states.get(chunk), cache.get_chunk(target_boundary, chunk)
            d = hidden.shape[-1]
            step = max(1, TOKENS_PER_CHUNK // hidden.shape[1])
            if gram is None:
                sums = sums_device(runner.device, d, step * hidden.shape[1])
                gram, cross = (torch.zeros(d, d, dtype=torch.float64, device=sums) for _ in range(2))
                energy, untouched = (torch.zeros((), dtype=torch.float64, device=sums) for _ in range(2))
            for start in range(0, hidden.shape[0], step):
                mlp_outputs.clear()
                output = runner.apply(block, source_index, hidden[start : start + step])
                m = torch.cat(mlp_outputs).reshape(-1, d).to(sums, torch.float64)
                residual = target[start : start + step].reshape(-1, d).to(sums, torch.float64) - (
                    output.reshape(-1, d).to(sums, torch.float64) - m
                )
                gram += m.T @ m
                cross += m.T @ residual
                energy += residual.square().sum()
                untouched += (residual - m).square().sum()
            tokens += hidden.shape[0] * hidden.shape[1]
    finally:
        hook.remove()
    transform = solve_ridge(gram, cross, ridge)
    # ||R - M T||^2 = ||R||^2 - 2 tr(T^T M^T R) + tr(T^T M^T M T), from the accumulated sums
    after = energy - 2 * (transform * cross).sum() + (transform * (gram @ transform)).sum()
    fit = {
        "tokens": tokens,
        "relative_error_before": (untouched / energy).item(),
        "relative_error_after": (after / energy).item(),
    }
    return transform, fit
