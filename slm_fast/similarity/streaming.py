"""StreamingCKA: exact CKA over calibration tokens that arrive in chunks of any size.

Token state (RBF always; linear while few tokens have arrived). Every token is kept in a token store
(memory or disk) and each new block of tokens is paired once with all earlier ones through the kernel
backend, adding to the running Frobenius sums and to the row sums of earlier tokens (kept in float64,
8 L bytes a token). Pairing runs whenever `flush_tokens` unpaired tokens have gathered, and at compute().
Memory: the stored activations (n x sum(d) values in their own dtype, or on disk) plus one tile
workspace; never n x n.

Feature state (linear kernel): d_a x d_b float64 accumulators per pair (linear_features.py), no tokens
kept. linear_state="auto" starts with token state and moves to feature state, replaying the stored
tokens once, when n reaches the break-even point n* = 2 sum_p d_a d_b / (c (sum_a d_a + L_p^2)), where the
cumulative token-pairing cost c n^2 (sum_a d_a + L_p^2) overtakes the feature cost 2 n sum_p d_a d_b
(c = TOKEN_PAIRING_COST, the measured cost of a pairing flop against a feature flop), provided the
accumulators fit in `state_bytes`.

Centring. The backends centre every token on one vector per layer (slm_fast/kernels/__init__.py):
here the mean of the tokens present at the first pairing, fixed from then on. HSIC is invariant to the
choice; being near the mean is what keeps the float32 products precise.

sigma for RBF must be known before tokens are paired: explicit sigmas are used as given; with
sigma=None it is the median heuristic (similarity/sigma.py) over the first `sigma_tokens` tokens to
arrive. Pairing waits until that many tokens are stored (or until compute(), which then uses all of
them), so a stream of n <= sigma_tokens tokens gives exactly the one-shot cka_matrix result.

Distributed (process_group=...): each rank feeds its own tokens. update() stays local (it only stores
them; ranks may call it different numbers of times) and compute() is a collective that every rank
calls. In token state it pairs all stored tokens across the ranks exactly (similarity/distributed.py:
global centres, exchange of token shards, all-reduced statistics; every compute() pairs all tokens
again, with the rank's tokens read into memory); in feature state (linear) each rank recentres its
d_a x d_b accumulators on the global mean and they are all-reduced. It returns, on every rank, the CKA
of the streams concatenated in rank order; the median heuristic takes the first `sigma_tokens` tokens
of that order. linear_state="auto" switches each rank at the break-even point of its own token count;
at compute() a rank still in token state follows any rank that has switched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType

import torch
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.kernels import layer_centers, load_backend
from slm_fast.similarity import distributed
from slm_fast.similarity.checks import (
    as_layers,
    check_finite,
    check_kernel,
    min_tokens,
    normalize_pairs,
    squared_norms,
    with_diagonal,
)
from slm_fast.similarity.estimators import PairStats, similarity_matrices, stats_from_row_sums
from slm_fast.similarity.linear_features import LinearFeatureState, feature_state_bytes
from slm_fast.similarity.sigma import (
    DEFAULT_MEDIAN_PAIRS,
    SigmaSpec,
    check_sigma_spec,
    gammas_from_sigmas,
    median_heuristic_sigmas,
)
from slm_fast.similarity.token_store import TokenStore, open_store

LINEAR_STATES = ("auto", "features", "tokens")
# Measured cost of a token-pairing flop against a feature-state flop (epilogue, Frobenius GEMM, smaller
# GEMMs): 1.8x at L = 8, d = 576 and about 2x at L = 32, d = 576 on the development CPU.
TOKEN_PAIRING_COST = 2.0


class StreamingCKA:
    """Exact linear or RBF CKA between L layers over tokens fed in chunks; see the module docstring.

    update(chunk) takes a [L, m, d] tensor or a sequence of L [m, d_a] tensors (widths, dtype and device
    fixed by the first chunk); compute() returns the [L, L] float64 CKA matrix (NaN policy of
    cka_matrix) and may be called again after more updates. Use as a context manager, or call close(),
    to delete a disk store promptly.
    """

    def __init__(
        self,
        num_layers: int,
        *,
        kernel: str = "linear",
        sigma: SigmaSpec = None,
        unbiased: bool = False,
        pairs: Sequence[Sequence[int]] | Tensor | None = None,
        store: str = "memory",
        store_dir: str | Path | None = None,
        backend: str = "auto",
        sigma_scale: float = 1.0,
        sigma_tokens: int = 4096,
        median_diagonal: bool = False,
        median_pairs: int = DEFAULT_MEDIAN_PAIRS,
        seed: int = 0,
        linear_state: str = "auto",
        state_bytes: int = 2 * 2**30,
        block_size: int | None = None,
        flush_tokens: int = 4096,
        process_group: object | None = None,
    ) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise InputError(f"num_layers must be a positive integer, got {num_layers!r}")
        check_kernel(kernel)
        if store not in ("memory", "disk"):
            raise InputError(f"store must be 'memory' or 'disk', got {store!r}")
        if linear_state not in LINEAR_STATES:
            raise InputError(f"linear_state must be one of {LINEAR_STATES}, got {linear_state!r}")
        if sigma_tokens < 2 or flush_tokens < 1:
            raise InputError(f"sigma_tokens must be >= 2 and flush_tokens >= 1, got {sigma_tokens}, {flush_tokens}")
        self.num_layers = num_layers
        self.kernel = kernel
        self.unbiased = unbiased
        self.sigmas: list[float] | None = check_sigma_spec(sigma, sigma_scale, num_layers, kernel)
        self._median_options = {
            "sigma_scale": sigma_scale,
            "include_diagonal": median_diagonal,
            "max_pairs": median_pairs,
            "seed": seed,
        }
        self._sigma_tokens = sigma_tokens
        self._store_kind, self._store_dir, self._backend_name = store, store_dir, backend
        self._linear_state, self._state_bytes = linear_state, state_bytes
        self._block_size, self._flush_tokens = block_size, flush_tokens
        self._pairs = with_diagonal(normalize_pairs(pairs, num_layers))
        self._group = process_group

        self._updates = 0
        self._num_tokens = 0
        self._widths: list[int] = []
        self._layout: tuple[torch.dtype, torch.device] | None = None
        self._reference: list[Tensor] = []  # first token of each layer, for the constancy check
        self._constant: list[bool] = []
        self._backend: ModuleType | None = None
        self._features: LinearFeatureState | None = None
        self._store: TokenStore | None = None
        self._switch_at: int | None = None  # token count at which linear "auto" moves to feature state
        self._paired = 0
        self._frob = torch.zeros(0, dtype=torch.float64)
        self._row_sums: _GrowingColumns | None = None
        self._diagonal: _GrowingColumns | None = None  # linear: |x~_i|^2 of the tokens paired so far
        self._centers: list[Tensor] | None = None  # the backends' centre per layer, fixed at the first pairing

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def state(self) -> str:
        """'features' or 'tokens' (or 'empty' before the first update)."""
        if self._features is not None:
            return "features"
        return "tokens" if self._store is not None else "empty"

    def update(self, chunk: Tensor | Sequence[Tensor]) -> None:
        what = f"update {self._updates}"
        layers = as_layers(chunk, what=what)
        self._check_chunk(layers, what)
        self._updates += 1
        if layers[0].shape[0] == 0:
            return
        if not self._widths:
            self._start(layers)
        for a, x in enumerate(layers):
            self._constant[a] = self._constant[a] and bool((x == self._reference[a]).all())
        self._num_tokens += layers[0].shape[0]
        if self._features is not None:
            self._features.update(layers)
            return
        assert self._store is not None and self._row_sums is not None
        self._store.append(layers)
        if self._group is None:  # distributed: tokens are paired at compute(), across the ranks
            self._row_sums.extend_zeros(layers[0].shape[0])
        if self._switch_at is not None and self._num_tokens >= self._switch_at:
            self._move_to_features()
        elif self._group is None and self._ready_to_pair() and self._num_tokens - self._paired >= self._flush_tokens:
            self._pair_new_tokens()

    def compute(self) -> Tensor:
        """[L, L] float64 CKA of the tokens so far (NaN where undefined or not requested)."""
        return self._matrices()[0]

    def compute_hsic(self) -> Tensor:
        """[L, L] float64 HSIC estimates of the tokens so far (NaN where not requested)."""
        return self._matrices()[1]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> StreamingCKA:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _check_chunk(self, layers: list[Tensor], what: str) -> None:
        if len(layers) != self.num_layers:
            raise InputError(f"{what}: {len(layers)} layers, expected {self.num_layers}")
        for a, x in enumerate(layers):
            if x.shape[0] != layers[0].shape[0]:
                raise InputError(f"{what}: layer {a} holds {x.shape[0]} tokens but layer 0 holds {layers[0].shape[0]}")
            if self._layout is not None and (x.shape[1], x.dtype, x.device) != (self._widths[a], *self._layout):
                raise InputError(
                    f"{what}: layer {a} is [{x.shape[1]}] {x.dtype} on {x.device}, but earlier chunks were "
                    f"[{self._widths[a]}] {self._layout[0]} on {self._layout[1]}"
                )
            if not x.is_floating_point():
                raise InputError(f"{what}: layer {a} has dtype {x.dtype}; activations must be floating point")
            check_finite(x, f"{what}: layer {a}")

    def _start(self, layers: list[Tensor]) -> None:
        self._widths = [x.shape[1] for x in layers]
        self._layout = (layers[0].dtype, layers[0].device)
        self._reference = [x[:1].clone() for x in layers]
        self._constant = [True] * self.num_layers
        self._backend = load_backend(self._backend_name, layers[0].device)
        dtype, device = layers[0].dtype, layers[0].device
        if self.kernel == "linear" and self._linear_state == "features":
            self._features = LinearFeatureState(self._widths, self._pairs, dtype, device)
            return
        self._store = open_store(self._store_kind, self._widths, dtype, device, self._store_dir)
        self._frob = torch.zeros(len(self._pairs), dtype=torch.float64, device=device)
        self._row_sums = _GrowingColumns(self.num_layers, device)
        if self.kernel == "linear":
            self._diagonal = _GrowingColumns(self.num_layers, device)
            fits = feature_state_bytes(self._widths, self._pairs) <= self._state_bytes
            if self._linear_state == "auto" and fits:
                self._switch_at = _break_even_tokens(self._widths, self._pairs)

    def _ready_to_pair(self) -> bool:
        if self.kernel == "rbf" and self.sigmas is None:
            if self._num_tokens < self._sigma_tokens:
                return False
            self._estimate_sigmas()
        return True

    def _estimate_sigmas(self) -> None:
        assert self._store is not None
        count = min(self._num_tokens, self._sigma_tokens)
        first = [self._store.read(a, 0, count) for a in range(self.num_layers)]
        self.sigmas = median_heuristic_sigmas(first, **self._median_options)

    def _pair_new_tokens(self) -> None:
        """Pair tokens [paired, n) with every earlier token and among themselves."""
        assert self._store is not None and self._backend is not None and self._row_sums is not None
        start, stop = self._paired, self._num_tokens
        if start == stop:
            return
        options = {
            "kernel": self.kernel,
            "gammas": gammas_from_sigmas(self.sigmas) if self.sigmas is not None else None,
            "pairs": self._pairs,
            "block_size": self._block_size,
        }
        rows = [self._store.read(a, start, stop) for a in range(self.num_layers)]
        if self._centers is None:  # the first pairing: centre on these tokens' mean (start == 0)
            self._centers = layer_centers(rows)
        options["centers"] = self._centers
        if self._diagonal is not None:
            self._diagonal.extend(squared_norms(rows, self._centers))
        row_sums = self._row_sums.view()
        for s, e in self._store.ranges(start):
            cols = [self._store.read(a, s, e) for a in range(self.num_layers)]
            cross = self._backend.kernel_sums(rows, cols, **options)
            self._frob += 2 * cross.frob
            row_sums[:, start:stop] += cross.row_sums
            row_sums[:, s:e] += cross.col_sums
        own = self._backend.kernel_sums(rows, None, **options)
        self._frob += own.frob
        row_sums[:, start:stop] += own.row_sums
        self._paired = stop

    def _move_to_features(self) -> None:
        assert self._store is not None and self._layout is not None
        dtype, device = self._layout
        self._features = LinearFeatureState(self._widths, self._pairs, dtype, device)
        for s, e in self._store.ranges(self._num_tokens):
            self._features.update([self._store.read(a, s, e) for a in range(self.num_layers)])
        self.close()
        self._row_sums = self._diagonal = None
        self._switch_at = None

    def _distributed_matrices(self) -> tuple[Tensor, Tensor]:
        group = distributed.open_group(self._group)
        distributed.check_same_setup(group, (self.num_layers, self.kernel, self.unbiased, self._pairs.tolist()))
        fed = distributed.shard_sizes(group, int(bool(self._widths)))
        if not all(fed):
            raise InputError(f"ranks {[r for r, f in enumerate(fed) if not f]} fed no tokens before compute()")
        assert self._layout is not None and self._backend is not None
        distributed.check_same_setup(group, (tuple(self._widths), str(self._layout[0])))
        in_features = torch.tensor([int(self._features is not None)])
        if self.kernel == "linear" and int(group.all_reduce(in_features, distributed.dist.ReduceOp.MAX)):
            if self._features is None:  # another rank has moved to feature state: follow it
                self._move_to_features()
            assert self._features is not None
            return distributed.feature_matrices(
                group, self._features, self._reference, self._constant, unbiased=self.unbiased
            )
        assert self._store is not None
        layers = [self._store.read(a, 0, self._num_tokens) for a in range(self.num_layers)]
        return distributed.group_matrices(
            group,
            layers,
            self._constant,
            kernel=self.kernel,
            sigmas=self.sigmas,
            unbiased=self.unbiased,
            pairs=self._pairs,
            module=self._backend,
            block_size=self._block_size,
            median_options=self._median_options,
            sigma_tokens=self._sigma_tokens,
        )

    def _stats(self) -> PairStats:
        if self._features is not None:
            return self._features.stats()
        assert self._row_sums is not None
        if self.kernel == "rbf" and self.sigmas is None:
            self._estimate_sigmas()
        self._pair_new_tokens()
        diagonal = self._diagonal.view() if self._diagonal is not None else None
        return stats_from_row_sums(self._num_tokens, self._pairs, self._frob, self._row_sums.view(), diagonal)

    def _matrices(self) -> tuple[Tensor, Tensor]:
        if self._group is not None:
            return self._distributed_matrices()
        needed = min_tokens(self.unbiased)
        if self._num_tokens < needed:
            raise InputError(
                f"compute() after {self._num_tokens} tokens; the {'un' if self.unbiased else ''}biased "
                f"estimator needs at least {needed}"
            )
        return similarity_matrices(self.num_layers, self._stats(), self.unbiased, self._constant)


class _GrowingColumns:
    """A float64 [rows, n] table that grows along n by doubling its capacity."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self._data = torch.zeros(rows, 256, dtype=torch.float64, device=device)
        self._size = 0

    def extend(self, columns: Tensor) -> None:
        self.extend_zeros(columns.shape[1])
        self._data[:, self._size - columns.shape[1] : self._size] = columns

    def extend_zeros(self, count: int) -> None:
        size = self._size + count
        if size > self._data.shape[1]:
            grown = self._data.new_zeros(self._data.shape[0], max(size, 2 * self._data.shape[1]))
            grown[:, : self._size] = self._data[:, : self._size]
            self._data = grown
        self._size = size

    def view(self) -> Tensor:
        return self._data[:, : self._size]


def _break_even_tokens(widths: Sequence[int], pairs: Tensor) -> int:
    """n* at which the cumulative cost of pairing tokens overtakes the feature-state cost."""
    layers = torch.unique(pairs).tolist()
    cross = sum(widths[a] * widths[b] for a, b in pairs.tolist())
    return math.ceil(2 * cross / (TOKEN_PAIRING_COST * (sum(widths[a] for a in layers) + len(layers) ** 2)))
