"""Plain-numpy oracle of the merge rules (float64), shared by the rule and checkpoint tests."""

import numpy as np


def is_projection(name: str) -> bool:
    return name.endswith("_proj.weight")


def numpy_oracle(window: list[dict[str, np.ndarray]], rule: str) -> dict[str, np.ndarray]:
    lo, hi = window[0], window[-1]
    out = {}
    for name in lo:
        stack = np.stack([block[name] for block in window]).astype(np.float64)
        if rule == "keep_high":
            out[name] = hi[name]
        elif rule == "keep_low":
            out[name] = lo[name]
        elif rule == "mean":
            out[name] = stack.mean(0)
        elif rule == "sum":
            out[name] = stack.sum(0)
        elif rule == "rdsc":
            out[name] = stack[0] + sum(stack[k] - stack[0] for k in range(1, len(window)))
        elif rule == "keep_high_norms_low":
            out[name] = hi[name] if is_projection(name) else lo[name]
    return out
