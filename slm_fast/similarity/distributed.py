"""Token-parallel CKA/HSIC over a torch.distributed process group (gloo on CPUs; with NCCL the messages
go through the current CUDA device, a path not yet run on a GPU).

Every rank holds its own shard of the n tokens (the same L layers, widths and dtype everywhere; shards
may be uneven, even empty). The result equals the single-process result on the shards concatenated in
rank order, to float rounding:

- Centres: the global token mean of each layer (float64 sums and counts all-reduced), so every backend
  centres exactly as the single-process `layer_centers` would, up to the order of the float64 sum.
- Kernel sums: every rank pairs its own tokens (`kernel_sums(own, None)`); the cross-rank blocks are
  computed exactly by exchanging token shards with send/recv: at step k = 1 .. floor(W/2) rank r sends
  its raw shard (its own dtype; the backend centres it with the global centres) to r + k and receives
  the shard of r - k, and pairs its tokens with it. Each unordered pair of ranks is thus computed once
  (at k = W/2 for even W the two ranks split the block by halves), and the column sums of the received
  tokens go back to their owner (an [L, n_s] float64 message). Afterwards each rank holds the complete
  row sums of its own tokens.
- Statistics: every field of PairStats is a sum over tokens once the row sums are complete, so each
  rank forms them from its shard and one all-reduce sums them (as torchmetrics syncs metric states).
- Median-heuristic sigma: the single-process one. Every rank draws the same seeded pair sample over the
  global token indices (similarity/sigma.py); the ranks send rank 0 the sampled tokens they own, rank 0
  computes the medians and broadcasts the sigmas. Traffic: the sampled tokens once (at most
  2 * median_pairs tokens, or all of them when the sample is exact).
- Bad input on any rank fails the call on every rank with an InputError (no rank is left waiting in a
  collective): each rank validates, then the ranks agree on who failed.

Memory per rank: its shard, one received shard, and O(L n_r) float64 row sums; never n x n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor

from slm_fast.errors import InputError
from slm_fast.kernels import center_dtype, load_backend
from slm_fast.parallel.launch import communicate
from slm_fast.similarity.checks import (
    as_layers,
    check_kernel,
    check_layers,
    min_tokens,
    normalize_pairs,
    squared_norms,
    with_diagonal,
)
from slm_fast.similarity.estimators import PairStats, similarity_matrices, stats_from_row_sums
from slm_fast.similarity.linear_features import LinearFeatureState
from slm_fast.similarity.sigma import (
    PairSample,
    SigmaSpec,
    check_sigma_spec,
    gammas_from_sigmas,
    median_squared_distance,
    sample_pairs,
)


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks, by purpose (filled when passed to the functions below)."""

    tokens: int = 0
    column_sums: int = 0
    sigma_sample: int = 0
    collectives: int = 0  # payload of the all-reduces and broadcasts this rank joined (not the small setup check)

    @property
    def total(self) -> int:
        return self.tokens + self.column_sums + self.sigma_sample + self.collectives


@dataclass
class Group:
    """A process group with the facts every step needs."""

    handle: object
    rank: int
    size: int
    device: torch.device  # where communication buffers live (CUDA for NCCL, CPU otherwise)
    traffic: Traffic

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.handle, group_rank) if self.handle is not None else group_rank

    def all_reduce(self, tensor: Tensor, op: object = dist.ReduceOp.SUM) -> Tensor:
        buffer = tensor.to(self.device)
        self.traffic.collectives += buffer.numel() * buffer.element_size()
        communicate(dist.all_reduce, buffer, op=op, group=self.handle)
        return buffer.to(tensor.device)


def open_group(process_group: object, traffic: Traffic | None = None) -> Group:
    """Wrap `process_group` (a ProcessGroup, or dist.group.WORLD) after checking it is usable."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("process_group was given but torch.distributed is not initialized (init_process_group)")
    handle = process_group
    nccl = dist.get_backend(handle) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return Group(handle, dist.get_rank(handle), dist.get_world_size(handle), device, traffic or Traffic())


def agree(group: Group, error: InputError | None) -> None:
    """Raise on every rank when any rank hit `error`: its own error where it has one, else a message
    naming the ranks that failed."""
    flags = torch.zeros(group.size, dtype=torch.int32)
    flags[group.rank] = int(error is not None)
    flags = group.all_reduce(flags)
    if error is not None:
        raise error
    failed = flags.nonzero().flatten().tolist()
    if failed:
        raise InputError(f"rank(s) {failed} of the process group rejected their input (see their error)")


def check_same_setup(group: Group, setup: tuple) -> None:
    """InputError on every rank unless every rank passed the same options and layer layout."""
    everyone: list[object] = [None] * group.size
    communicate(dist.all_gather_object, everyone, setup, group=group.handle)
    for rank, other in enumerate(everyone):
        if other != setup:
            raise InputError(
                f"rank {group.rank} and rank {rank} disagree on layers or options: {setup} vs {other}; every "
                "rank must pass the same kernel, options, layer count, widths and dtype"
            )


def shard_sizes(group: Group, count: int) -> list[int]:
    sizes = group.all_reduce(_one_hot(group, count, torch.int64))
    return [int(s) for s in sizes.tolist()]


def global_centers(group: Group, layers: Sequence[Tensor], total: int, chunk: int = 4096) -> list[Tensor]:
    """Global token mean per layer in `center_dtype` (as kernels.layer_centers, over every rank's tokens)."""
    dtype = center_dtype(layers)
    sums = []
    for x in layers:
        total_a = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], chunk):
            part = x[s : s + chunk]
            total_a += part.sum(0, dtype=torch.promote_types(part.dtype, torch.float32)).double()
        sums.append(total_a)
    flat = group.all_reduce(torch.cat(sums))
    return [(part / max(total, 1)).to(dtype) for part in flat.split([x.shape[1] for x in layers])]


def global_constant(group: Group, layers: Sequence[Tensor], local_constant: Sequence[bool]) -> list[bool]:
    """Layers constant over every rank's tokens: constant on each rank and the same value everywhere."""
    flags = group.all_reduce(torch.tensor([int(c) for c in local_constant], dtype=torch.int64), dist.ReduceOp.MIN)
    candidates = [a for a, flag in enumerate(flags.tolist()) if flag]
    if not candidates:
        return [False] * len(layers)
    first = [
        layers[a][0].double()
        if layers[a].shape[0]
        else torch.full((layers[a].shape[1],), math.inf, dtype=torch.float64, device=layers[a].device)
        for a in candidates
    ]
    low = group.all_reduce(torch.cat(first), dist.ReduceOp.MIN)
    high = group.all_reduce(torch.cat([torch.where(torch.isinf(f), -f, f) for f in first]), dist.ReduceOp.MAX)
    same = torch.eq(low, high)
    widths = [layers[a].shape[1] for a in candidates]
    result = [False] * len(layers)
    for a, part in zip(candidates, same.split(widths), strict=True):
        result[a] = bool(part.all())
    return result


def median_sigmas(
    group: Group,
    layers: Sequence[Tensor],
    sizes: Sequence[int],
    count: int,
    *,
    sigma_scale: float,
    include_diagonal: bool,
    max_pairs: int,
    seed: int,
) -> list[float]:
    """The median-heuristic sigmas of the first `count` tokens in rank order, exactly as
    sigma.median_heuristic_sigmas on those tokens in one process (see the module docstring)."""
    sample = sample_pairs(count, include_diagonal=include_diagonal, max_pairs=max_pairs, seed=seed)
    needed = torch.unique(torch.cat([sample.i, sample.j]))
    offsets = [0, *torch.tensor(list(sizes)).cumsum(0).tolist()]
    owned = [needed[(needed >= offsets[s]) & (needed < offsets[s + 1])] - offsets[s] for s in range(group.size)]
    sigmas = torch.full((len(layers),), math.nan, dtype=torch.float64)
    if group.rank != 0:
        mine = owned[group.rank].to(layers[0].device)
        if len(mine):
            for x in layers:
                rows = x[mine].contiguous()
                group.traffic.sigma_sample += rows.numel() * rows.element_size()
                communicate(dist.send, rows.to(group.device), group.global_rank(0), group=group.handle)
    else:
        gathered = []
        for x in layers:
            parts = [x[owned[0].to(x.device)]]
            for s in range(1, group.size):
                if len(owned[s]):
                    part = torch.empty(len(owned[s]), x.shape[1], dtype=x.dtype, device=group.device)
                    communicate(dist.recv, part, group.global_rank(s), group=group.handle)
                    parts.append(part.to(x.device))
            gathered.append(torch.cat(parts))
        local = PairSample(torch.searchsorted(needed, sample.i), torch.searchsorted(needed, sample.j), sample.exact)
        for a, x in enumerate(gathered):
            sigmas[a] = sigma_scale * math.sqrt(median_squared_distance(x, local, include_diagonal=include_diagonal))
    # recv on rank 0 is per layer in layer order, matching the sends, so the order above is consistent.
    buffer = sigmas.to(group.device)
    group.traffic.collectives += buffer.numel() * buffer.element_size()
    communicate(dist.broadcast, buffer, group.global_rank(0), group=group.handle)
    sigmas = buffer.cpu()
    for a, value in enumerate(sigmas.tolist()):
        if not value > 0:
            raise InputError(
                f"layer {a}: the median squared distance between tokens is 0 (constant or mostly repeated "
                "activations), so the median heuristic cannot choose sigma; pass sigma explicitly"
            )
    return sigmas.tolist()


def ring_stats(
    group: Group,
    layers: Sequence[Tensor],
    sizes: Sequence[int],
    *,
    kernel: str,
    gammas: list[float] | None,
    pairs: Tensor,
    centers: list[Tensor],
    backend: ModuleType,
    block_size: int | None,
) -> PairStats:
    """PairStats of all n tokens, identical on every rank (see the module docstring for the schedule)."""
    own = list(layers)
    n_own = own[0].shape[0]
    device = own[0].device
    options = {"kernel": kernel, "gammas": gammas, "pairs": pairs, "centers": centers, "block_size": block_size}
    frob = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    row_sums = torch.zeros(len(own), n_own, dtype=torch.float64, device=device)
    if n_own:
        sums = backend.kernel_sums(own, None, **options)
        frob += sums.frob
        row_sums += sums.row_sums
    rank, size = group.rank, group.size
    for k in range(1, size // 2 + 1):
        dst, src = (rank + k) % size, (rank - k) % size
        theirs = _exchange(group, own, dst, src, sizes[src])
        returned = torch.zeros(len(own), sizes[src], dtype=torch.float64, device=device)
        rows, cols = slice(0, n_own), slice(0, sizes[src])
        if 2 * k == size:  # both ranks of the pair hold both shards: split the block between them
            if rank < src:
                cols = slice(0, sizes[src] // 2)
            else:
                rows = slice(n_own // 2, n_own)
        if rows.stop > rows.start and cols.stop > cols.start:
            block = backend.kernel_sums([x[rows] for x in own], [y[cols] for y in theirs], **options)
            frob += 2 * block.frob
            row_sums[:, rows] += block.row_sums
            returned[:, cols] = block.col_sums
        row_sums += _send_back(group, returned, src, dst, n_own)
    diagonal = squared_norms(own, centers) if kernel == "linear" else None
    local = stats_from_row_sums(n_own, pairs, frob, row_sums, diagonal)
    fields = ("frob", "row_dot", "row_diag", "diag_row", "diag_dot", "totals", "diag_totals")
    parts = [getattr(local, f).reshape(-1).double() for f in fields]
    reduced = group.all_reduce(torch.cat(parts)).split([len(p) for p in parts])
    return PairStats(sum(sizes), pairs, *reduced)


def layer_signature(layers: Sequence[Tensor]) -> tuple:
    return (len(layers), tuple(x.shape[1] for x in layers), tuple(str(x.dtype) for x in layers))


def _one_hot(group: Group, value: int, dtype: torch.dtype) -> Tensor:
    table = torch.zeros(group.size, dtype=dtype)
    table[group.rank] = value
    return table


def _exchange(group: Group, own: list[Tensor], dst: int, src: int, src_count: int) -> list[Tensor]:
    """Send every layer of our shard to `dst` and receive `src`'s shard ([src_count, d_a] per layer)."""
    received = [torch.empty(src_count, x.shape[1], dtype=x.dtype, device=group.device) for x in own]
    ops = []
    if own[0].shape[0]:
        for x in own:
            buffer = x.contiguous().to(group.device)
            group.traffic.tokens += buffer.numel() * buffer.element_size()
            ops.append(dist.P2POp(dist.isend, buffer, group.global_rank(dst), group.handle))
    if src_count:
        ops.extend(dist.P2POp(dist.irecv, r, group.global_rank(src), group.handle) for r in received)
    _run(ops)
    return [r.to(own[0].device) for r in received]


def _send_back(group: Group, returned: Tensor, src: int, dst: int, n_own: int) -> Tensor:
    """Return the column sums of `src`'s tokens to it; receive those of our tokens from `dst`."""
    incoming = torch.zeros(returned.shape[0], n_own, dtype=torch.float64, device=group.device)
    ops = []
    if returned.shape[1]:
        buffer = returned.to(group.device)
        group.traffic.column_sums += buffer.numel() * buffer.element_size()
        ops.append(dist.P2POp(dist.isend, buffer, group.global_rank(src), group.handle))
    if n_own:
        ops.append(dist.P2POp(dist.irecv, incoming, group.global_rank(dst), group.handle))
    _run(ops)
    return incoming.to(returned.device)


def _run(ops: list) -> None:
    if ops:
        for request in communicate(dist.batch_isend_irecv, ops):
            communicate(request.wait)


def matrices(
    acts: Tensor | Sequence[Tensor],
    process_group: object,
    *,
    kernel: str,
    sigma: SigmaSpec,
    unbiased: bool,
    backend: str,
    pairs: Tensor | Sequence[Sequence[int]] | None,
    sigma_scale: float,
    median_diagonal: bool,
    median_pairs: int,
    seed: int,
    block_size: int | None,
    traffic: Traffic | None = None,
) -> tuple[Tensor, Tensor]:
    """(CKA, HSIC) of every rank's tokens together, on every rank: cka_matrix/hsic with process_group.
    A collective: every rank of the group must call it with the same options."""
    group = open_group(process_group, traffic)
    error = None
    try:
        check_kernel(kernel)
        layers = as_layers(acts)
        local_constant = check_layers(layers, tokens_at_least=0)
        explicit = check_sigma_spec(sigma, sigma_scale, len(layers), kernel)
        if block_size is not None and block_size < 1:
            raise InputError(f"block_size must be a positive token count, got {block_size}")
        stat_pairs = with_diagonal(normalize_pairs(pairs, len(layers)))
        module = load_backend(backend, layers[0].device)
    except InputError as exc:
        error = exc
    agree(group, error)
    options = (kernel, unbiased, explicit, sigma_scale, median_diagonal, median_pairs, seed, stat_pairs.tolist())
    check_same_setup(group, (*layer_signature(layers), options))
    return group_matrices(
        group,
        layers,
        local_constant,
        kernel=kernel,
        sigmas=explicit,
        unbiased=unbiased,
        pairs=stat_pairs,
        module=module,
        block_size=block_size,
        median_options={
            "sigma_scale": sigma_scale,
            "include_diagonal": median_diagonal,
            "max_pairs": median_pairs,
            "seed": seed,
        },
    )


def group_matrices(
    group: Group,
    layers: list[Tensor],
    local_constant: Sequence[bool],
    *,
    kernel: str,
    sigmas: list[float] | None,
    unbiased: bool,
    pairs: Tensor,
    module: ModuleType,
    block_size: int | None,
    median_options: dict,
    sigma_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(CKA, HSIC) from validated, agreed inputs. sigma_tokens: the median heuristic looks at the first
    that many tokens in rank order (None: all), as StreamingCKA does in one process."""
    sizes = shard_sizes(group, layers[0].shape[0])
    total = sum(sizes)
    needed = min_tokens(unbiased)
    if total < needed:
        raise InputError(f"the ranks hold {total} tokens together, but the estimator needs at least {needed}")
    constant = global_constant(group, layers, local_constant)
    gammas = None
    if kernel == "rbf":
        if sigmas is None:
            count = total if sigma_tokens is None else min(total, sigma_tokens)
            sigmas = median_sigmas(group, layers, sizes, count, **median_options)
        gammas = gammas_from_sigmas(sigmas)
    centers = global_centers(group, layers, total)
    stats = ring_stats(
        group,
        layers,
        sizes,
        kernel=kernel,
        gammas=gammas,
        pairs=pairs,
        centers=centers,
        backend=module,
        block_size=block_size,
    )
    return similarity_matrices(len(layers), stats, unbiased, constant)


def feature_matrices(
    group: Group,
    state: LinearFeatureState,
    references: Sequence[Tensor],
    local_constant: Sequence[bool],
    *,
    unbiased: bool,
) -> tuple[Tensor, Tensor]:
    """(CKA, HSIC) of the linear kernel from every rank's feature state: each state is recentred on the
    global token mean and the accumulators (d_a x d_b per pair) are all-reduced. references: each
    layer's first token on this rank (for the constant-layer check)."""
    sizes = shard_sizes(group, state.num_tokens)
    total = sum(sizes)
    needed = min_tokens(unbiased)
    if total < needed:
        raise InputError(f"the ranks hold {total} tokens together, but the estimator needs at least {needed}")
    constant = global_constant(group, references, local_constant)
    sums = state.token_sum()
    centers = [part / total for part in group.all_reduce(torch.cat(sums)).split([len(s) for s in sums])]
    merged = state.recentred(centers)
    accumulators = merged.accumulators()
    reduced = group.all_reduce(torch.cat([a.reshape(-1) for a in accumulators]))
    for target, part in zip(accumulators, reduced.split([a.numel() for a in accumulators]), strict=True):
        target.copy_(part.view_as(target))
    merged.num_tokens = total
    return similarity_matrices(len(references), merged.stats(), unbiased, constant)
