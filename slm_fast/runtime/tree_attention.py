"""Several token sequences that share prefixes, run as one row: tree attention.

Sequences with a common prefix (a question followed by each of its answers) form a prefix tree; laid
out in one row, each shared token is computed once. A token attends only to its ancestors and
itself (the tokens before it in its own sequences) and is rotated as if at its depth, so its hidden
state is the one it has when its sequence runs alone. The layout is generic: the runner is told, for
every row of a batch, each token's position and which tokens it may see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

# Attention implementations whose masks are built from mask functions and tested with trees (flash
# attention takes no mask functions; flex attention is untested).
MASKABLE_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class TreeLayout:
    """positions: long [B, S], each token's position (its depth in its tree).
    visible: bool [B, S, S], visible[b, q, k] = token q of row b may attend to token k; must hold on
    the diagonal (a padding token sees itself) and only for k <= q (the layout is causal)."""

    positions: Tensor
    visible: Tensor

    def rows(self, start: int, stop: int) -> TreeLayout:
        return TreeLayout(self.positions[start:stop], self.visible[start:stop])

    def to(self, device) -> TreeLayout:
        return TreeLayout(self.positions.to(device), self.visible.to(device))

    def mask_function(self) -> Callable:
        """The `and_mask_function` transformers' mask builders combine with the causal mask."""
        visible = self.visible

        def tree_mask(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return visible[batch_idx, q_idx, kv_idx]

        return tree_mask
