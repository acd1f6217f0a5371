"""Running token batches through a model one block at a time.

`BlockRunner` applies the model's pieces with exactly the calls transformers' own forward makes
(embedding, causal / sliding-window masks, rotary embeddings, decoder blocks, final norm, head), but
lets the caller choose which block runs next and on which hidden states. Blocks are described by the
caller (`BlockSpec`: the checkpoint blocks to read and how to combine them), so the runtime knows
nothing of how a caller derives new blocks from the original ones. Built blocks are kept while a byte
budget allows (`PlannedResidency`: Belady's choice when the caller announces a sweep's order), and the
next block to read is read from disk on a background thread while the current one computes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.runtime.blocks import ModelParts
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.runtime.residency import PlannedResidency
from slm_fast.runtime.tree_attention import MASKABLE_IMPLEMENTATIONS, TreeLayout

MASK_BUILDERS: dict[str, Callable] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}

ReadBlock = Callable[[int], Mapping[str, Tensor]]


@dataclass(frozen=True)
class BlockSpec:
    """A decoder block for the runner to build.

    key: its identity for reuse (equal keys must mean equal weights).
    layer_index: the source layer whose per-layer settings (attention type) the block is built with.
    reads: the checkpoint blocks its tensors come from, in the order `tensors` reads them.
    tensors: computes the block's tensors through the given reader; None = block reads[0] as stored.
    """

    key: Hashable
    layer_index: int
    reads: tuple[int, ...]
    tensors: Callable[[ReadBlock], Mapping[str, Tensor]] | None = None

    @classmethod
    def original(cls, index: int) -> BlockSpec:
        return cls(("original", index), index, (index,))


class BlockRunner:
    """Block-streamed forward passes over token batches of one sequence length.

    micro_batch: sequences per block call (bounds activation memory; None = all at once).
    block_budget_bytes: bytes of built blocks kept resident for reuse (0 = rebuild every time).
    prefetch: read the next planned block on a background thread while the current one computes.

    Counters: `blocks_loaded` (checkpoint blocks read), `bytes_read` (their bytes), `token_forwards`
    (tokens passed through one block, summed over calls), `head_tokens` (tokens passed through the head).
    """

    def __init__(
        self,
        reader: CheckpointReader,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        micro_batch: int | None = None,
        block_budget_bytes: int = 0,
        prefetch: bool = True,
    ):
        self.reader = reader
        self.parts = ModelParts(reader, device, dtype)
        self.device, self.dtype = self.parts.device, self.parts.dtype
        self.micro_batch = micro_batch
        self.residency = PlannedResidency(block_budget_bytes)
        self._resident: dict[Hashable, nn.Module] = {}
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slm-prefetch") if prefetch else None
        self._prefetched: dict[int, Future] = {}
        self._upcoming: dict[Hashable, BlockSpec] = {}
        self.blocks_loaded = 0
        self.bytes_read = 0
        self.token_forwards = 0
        self.head_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.reader.num_blocks

    @property
    def block_budget_bytes(self) -> int:
        return self.residency.budget_bytes

    @block_budget_bytes.setter
    def block_budget_bytes(self, value: int) -> None:
        self.residency.budget_bytes = value

    # -- the pieces of a forward pass ---------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.parts.embed(input_ids.to(self.device))

    @torch.inference_mode()
    def apply(self, block: nn.Module, layer_index: int, hidden: Tensor, tree: TreeLayout | None = None) -> Tensor:
        """Run one decoder block (built with layer `layer_index`'s settings) on hidden [B, S, d]; `tree`
        lays several sequences out in each row (see `tree_attention`; `supports_trees` must hold)."""
        attention_type = self.parts.attention_type(layer_index)
        step = self.micro_batch or hidden.shape[0]
        outputs = []
        for start in range(0, hidden.shape[0], step):
            chunk = hidden[start : start + step].to(self.device, self.dtype)
            # The mask builders get sequence indices: positions that restart would read as packed sequences.
            indices = torch.arange(chunk.shape[1], device=self.device).unsqueeze(0)
            rows = None if tree is None else tree.rows(start, start + step).to(self.device)
            mask = MASK_BUILDERS[attention_type](
                config=self.parts.config,
                inputs_embeds=chunk,
                attention_mask=None,
                cache=None,
                position_ids=indices,
                and_mask_function=None if rows is None else rows.mask_function(),
            )
            position_ids = indices if rows is None else rows.positions
            position_embeddings = self.parts.position_embeddings(chunk, position_ids, attention_type)
            outputs.append(
                block(chunk, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
            )
            self.token_forwards += chunk.shape[0] * chunk.shape[1]
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @property
    def supports_trees(self) -> bool:
        """Whether `apply` can take a TreeLayout: the attention implementation builds its mask from mask
        functions and was tested with trees: sdpa and eager (flash attention takes no mask functions)."""
        return self.parts.config._attn_implementation in MASKABLE_IMPLEMENTATIONS

    @property
    def sliding_window(self) -> int | None:
        """The smallest sliding attention window of the model's layers (None: all attend fully). A tree
        row no longer than it is never cut by it, whether distances count positions or indices."""
        types = {self.parts.attention_type(index) for index in range(self.num_blocks)}
        return getattr(self.parts.config, "sliding_window", None) if "sliding_attention" in types else None

    @torch.inference_mode()
    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.parts.norm(hidden.to(self.device, self.dtype))

    @torch.inference_mode()
    def logits(self, normed: Tensor) -> Tensor:
        self.head_tokens += normed.shape[:-1].numel()
        return self.parts.logits(normed)

    # -- blocks ------------------------------------------------------------------------------------
    def plan(self, specs: Sequence[BlockSpec]) -> None:
        """Announce the blocks the next calls to `block` will ask for, in order: residency keeps what
        the plan reuses soonest, and the first block to read is fetched in the background."""
        self.residency.plan([spec.key for spec in specs])
        self._upcoming = {spec.key: spec for spec in specs}
        self._prefetch_next()

    def block(self, spec: BlockSpec | int) -> nn.Module:
        """The block described by `spec` (an int: that original block), built or resident."""
        if isinstance(spec, int):
            spec = BlockSpec.original(spec)
        if self.residency.access(spec.key):
            self._prefetch_next()
            return self._resident[spec.key]
        tensors = self.read_block(spec.reads[0]) if spec.tensors is None else spec.tensors(self.read_block)
        self._prefetch_next()
        block = self.parts.block(tensors, spec.layer_index)
        evicted = self.residency.admit(spec.key, _module_nbytes(block))
        for key in evicted or ():
            del self._resident[key]
        if evicted is not None:
            self._resident[spec.key] = block
        return block

    def read_block(self, index: int) -> Mapping[str, Tensor]:
        """Block `index`'s tensors from the checkpoint (counted), taken from the prefetch when ready."""
        self.blocks_loaded += 1
        self.bytes_read += self.reader.block_nbytes(index)
        future = self._prefetched.pop(index, None)
        return future.result() if future is not None else self.reader.read_block(index)

    def _prefetch_next(self) -> None:
        """Start reading the first checkpoint block of the next planned block that is not resident
        (one read in flight at most; a read the plan no longer wants is dropped)."""
        if self._prefetcher is None:
            return
        index = next(
            (self._upcoming[key].reads[0] for key in self.residency.upcoming() if key not in self._resident), None
        )
        if index is None or index in self._prefetched:
            return
        for stale in self._prefetched.values():
            stale.cancel()
        self._prefetched = {index: self._prefetcher.submit(self.reader.read_block, index)}

    # -- whole passes ------------------------------------------------------------------------------
    def run_blocks(
        self, hidden: Tensor, blocks: Iterable[int], on_boundary: Callable[[int, Tensor], None] | None = None
    ):
        """Apply original blocks in order; `on_boundary(i, h)` sees the output of each block i."""
        for index in blocks:
            hidden = self.apply(self.block(index), index, hidden)
            if on_boundary is not None:
                on_boundary(index, hidden)
        return hidden

    def final_hidden(self, input_ids: Tensor) -> Tensor:
        """The final-norm hidden states of the unmodified model (what HF's hidden_states[-1] holds)."""
        return self.final_norm(self.run_blocks(self.embed(input_ids), range(self.num_blocks)))

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetched.clear()


def _module_nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def calibrate(runner: BlockRunner, input_ids: Tensor, cache: HiddenStateCache, *, progress: bool = True) -> Tensor:
    """Run the unmodified model on `input_ids` block by block, storing the hidden state at every block
    boundary in `cache` (0 = embeddings ... L = last block's output) in chunks of `runner.micro_batch`
    samples; return the final-norm outputs. Each block is read once, whatever the number of chunks."""
    cache.set_chunks(input_ids.shape[0], runner.micro_batch)
    runner.plan([BlockSpec.original(i) for i in range(runner.num_blocks)])
    for chunk, (start, stop) in enumerate(cache.chunks):
        cache.put_chunk(0, chunk, runner.embed(input_ids[start:stop]))
    for index in tqdm(range(runner.num_blocks), desc="calibrating", unit="block", disable=not progress):
        block = runner.block(index)
        for chunk in range(len(cache.chunks)):
            cache.put_chunk(index + 1, chunk, runner.apply(block, index, cache.get_chunk(index, chunk)))
    reference = None
    for chunk, (start, stop) in enumerate(cache.chunks):  # filled in place: one copy, not a list and a cat
        final = runner.final_norm(cache.get_chunk(runner.num_blocks, chunk))
        if reference is None:
            reference = final.new_empty((input_ids.shape[0], *final.shape[1:]))
        reference[start:stop] = final
    return reference
