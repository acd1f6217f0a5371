"""Streaming state of the linear kernel in feature space: d_a x d_b accumulators, no token kept.

For the linear kernel K_a = X_a X_a^T every HSIC reduction is a sum over tokens of small products:
    T_ab = |C_ab|_F^2 with C_ab = X_a^T X_b,    r_a . r_b = s_a^T C_ab s_b with s_a = X_a^T 1,
    1 . r_a = |s_a|^2,    r_a . delta_b = s_a . (X_a^T q_b),    delta_a . delta_b = q_a . q_b,
where q_a = (|x_ai|^2)_i is the diagonal of K_a. Tokens are shifted by the first chunk's mean before
anything is accumulated: linear HSIC, biased and unbiased, is invariant to translating a layer, and the
shift keeps the float32 chunk products free of the cancellation that large activation means cause.
Chunk products are float32 (float64 for float64 input) and accumulate into float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slm_fast.similarity.estimators import PairStats

CHUNK_TOKENS = 4096


def feature_state_bytes(widths: Sequence[int], pairs: Tensor) -> int:
    """Memory of the float64 accumulators of LinearFeatureState for these widths and pairs."""
    cross = sum(widths[a] * widths[b] for a, b in pairs.tolist())
    return 8 * (cross + sum(widths) * (len(widths) + 1) + len(widths) ** 2)


class LinearFeatureState:
    """Additive float64 sums over tokens from which PairStats of the linear kernel follow exactly.

    `pairs`: [P, 2] int64 layer pairs, including (a, a) for every layer named.
    """

    def __init__(self, widths: Sequence[int], pairs: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self.pairs = pairs
        self.num_tokens = 0
        self._dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._shift: list[Tensor] | None = None
        num_layers = len(widths)
        f64 = {"dtype": torch.float64, "device": device}
        self._cross = [torch.zeros(widths[a], widths[b], **f64) for a, b in pairs.tolist()]
        self._sums = [torch.zeros(w, **f64) for w in widths]
        self._sums_by_norms = [torch.zeros(w, num_layers, **f64) for w in widths]  # X_a^T [q_0 .. q_L-1]
        self._norm_products = torch.zeros(num_layers, num_layers, **f64)  # q_a . q_b
        self._norm_totals = torch.zeros(num_layers, **f64)

    def update(self, layers: Sequence[Tensor]) -> None:
        if self._shift is None:
            self._shift = [x.to(self._dtype).mean(0) for x in layers]
        for s in range(0, layers[0].shape[0], CHUNK_TOKENS):
            shifted = [x[s : s + CHUNK_TOKENS].to(self._dtype) - mu for x, mu in zip(layers, self._shift, strict=True)]
            norms = torch.stack([x.square().sum(1) for x in shifted], 1)  # [m, L]
            for acc, (a, b) in zip(self._cross, self.pairs.tolist(), strict=True):
                acc += (shifted[a].T @ shifted[b]).double()
            for a, x in enumerate(shifted):
                self._sums[a] += x.sum(0).double()
                self._sums_by_norms[a] += (x.T @ norms).double()
            wide = norms.double()
            self._norm_products += wide.T @ wide
            self._norm_totals += wide.sum(0)
        self.num_tokens += layers[0].shape[0]

    def stats(self) -> PairStats:
        pairs = self.pairs.tolist()
        sums = self._sums
        frob = torch.stack([(c * c).sum() for c in self._cross])
        row_dot = torch.stack([sums[a] @ c @ sums[b] for c, (a, b) in zip(self._cross, pairs, strict=True)])
        row_diag = torch.stack([sums[a] @ self._sums_by_norms[a][:, b] for a, b in pairs])
        diag_row = torch.stack([sums[b] @ self._sums_by_norms[b][:, a] for a, b in pairs])
        a, b = self.pairs[:, 0], self.pairs[:, 1]
        return PairStats(
            num_tokens=self.num_tokens,
            pairs=self.pairs,
            frob=frob,
            row_dot=row_dot,
            row_diag=row_diag,
            diag_row=diag_row,
            diag_dot=self._norm_products[a, b],
            totals=torch.stack([s @ s for s in sums]),
            diag_totals=self._norm_totals,
        )
