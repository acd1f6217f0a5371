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

    def token_sum(self) -> list[Tensor]:
        """float64 sum over the tokens of each layer (unshifted): what a global mean is built from."""
        shift = self._shift or [torch.zeros_like(s) for s in self._sums]
        return [s + self.num_tokens * mu.double() for s, mu in zip(self._sums, shift, strict=True)]

    def recentred(self, centers: Sequence[Tensor]) -> LinearFeatureState:
        """A copy whose accumulators are those of the tokens shifted by `centers` instead of this state's
        own shift, so that the states of several token shards, recentred on one common centre, add up
        (distributed.py all-reduces them). Exact algebra in float64, with delta = shift - centre and
        x - centre = x' + delta; q'-terms expand as |x' + delta|^2 = q' + 2 delta.x' + |delta|^2. Only
        the entries that stats() reads for the requested pairs are defined; the others of the L x L
        norm tables are NaN (they would need the cross products of pairs not accumulated)."""
        m = self.num_tokens
        shift = self._shift or [c.to(self._dtype) for c in centers]
        delta = [mu.double() - c.double() for mu, c in zip(shift, centers, strict=True)]
        sums, by_norms = self._sums, self._sums_by_norms
        cross = {(a, b): c for (a, b), c in zip(self.pairs.tolist(), self._cross, strict=True)}
        out = LinearFeatureState([len(s) for s in sums], self.pairs, self._dtype, sums[0].device)
        out.num_tokens = m
        out._shift = [c.to(self._dtype) for c in centers]
        squares = torch.stack([d @ d for d in delta])
        delta_dot_sum = torch.stack([d @ s for d, s in zip(delta, sums, strict=True)])
        g_totals = 2 * delta_dot_sum + m * squares  # sum over tokens of 2 delta.x' + |delta|^2
        for acc, (a, b) in zip(out._cross, self.pairs.tolist(), strict=True):
            acc += cross[a, b] + torch.outer(sums[a], delta[b]) + torch.outer(delta[a], sums[b])
            acc += m * torch.outer(delta[a], delta[b])
        for a, s in enumerate(sums):
            out._sums[a] += s + m * delta[a]
        out._norm_totals += self._norm_totals + g_totals
        for table in out._sums_by_norms:
            table.fill_(float("nan"))
        out._norm_products.fill_(float("nan"))
        for a, b in self.pairs.tolist():
            for x, y in ((a, b), (b, a)):
                c_xy = cross[x, y] if (x, y) in cross else cross[y, x].T
                # X_x^T q_y = X'_x^T q'_y + X'_x^T g_y + delta_x (Q'_y + sum g_y)
                out._sums_by_norms[x][:, y] = (
                    by_norms[x][:, y]
                    + 2 * c_xy @ delta[y]
                    + squares[y] * sums[x]
                    + delta[x] * (self._norm_totals[y] + g_totals[y])
                )
            # q_a . q_b = q'_a.q'_b + q'_a.g_b + g_a.q'_b + g_a.g_b
            q_g = 2 * delta[b] @ by_norms[b][:, a] + squares[b] * self._norm_totals[a]
            g_q = 2 * delta[a] @ by_norms[a][:, b] + squares[a] * self._norm_totals[b]
            g_g = (
                4 * delta[a] @ cross[a, b] @ delta[b]
                + 2 * squares[b] * delta_dot_sum[a]
                + 2 * squares[a] * delta_dot_sum[b]
                + m * squares[a] * squares[b]
            )
            value = self._norm_products[a, b] + q_g + g_q + g_g
            out._norm_products[a, b] = out._norm_products[b, a] = value
        return out

    def accumulators(self) -> list[Tensor]:
        """Every additive float64 accumulator, in place (an all-reduce of them sums token shards)."""
        return [*self._cross, *self._sums, *self._sums_by_norms, self._norm_products, self._norm_totals]
