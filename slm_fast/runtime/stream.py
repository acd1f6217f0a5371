"""Running token batches through a model one block at a time.

`BlockRunner` applies the model's pieces with exactly the calls transformers' own forward makes
(embedding, causal / sliding-window masks, rotary embeddings, decoder blocks, final norm, head), but
lets the caller choose which block runs next and on which hidden states: the original blocks in
order (calibration), or a merged block followed by the blocks above it (a pruning candidate).
Original blocks are loaded from the reader on demand and kept while a memory budget allows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.merge import merge_window, settings_block
from slm_fast.runtime.blocks import ModelParts
from slm_fast.runtime.cache import HiddenStateCache
from slm_fast.windows import Window

MASK_BUILDERS: dict[str, Callable] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


class BlockRunner:
    """Block-streamed forward passes over token batches of one sequence length.

    micro_batch: sequences per block call (bounds activation memory; None = all at once).
    block_budget_bytes: bytes of blocks (original or merged) kept resident for reuse (0 = rebuild every time).
    average_settings: whose per-layer settings a window merged by an averaging rule takes (see
    slm_fast.merge.settings_block).
    """

    def __init__(
        self,
        reader: CheckpointReader,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        micro_batch: int | None = None,
        block_budget_bytes: int = 0,
        average_settings: str = "low",
    ):
        self.reader = reader
        self.parts = ModelParts(reader, device, dtype)
        self.device, self.dtype = self.parts.device, self.parts.dtype
        self.micro_batch = micro_batch
        self.block_budget_bytes = block_budget_bytes
        self.average_settings = average_settings
        self._resident: OrderedDict[tuple[int, int, str], nn.Module] = OrderedDict()
        self._resident_bytes = 0
        self.blocks_loaded = 0  # source blocks read from the checkpoint so far

    @property
    def num_blocks(self) -> int:
        return self.reader.num_blocks

    # -- the pieces of a forward pass ---------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.parts.embed(input_ids.to(self.device))

    @torch.inference_mode()
    def apply(self, block: nn.Module, source_index: int, hidden: Tensor) -> Tensor:
        """Run one decoder block (built as source block `source_index`) on hidden [B, S, d]."""
        attention_type = self.parts.attention_type(source_index)
        step = self.micro_batch or hidden.shape[0]
        outputs = []
        for start in range(0, hidden.shape[0], step):
            chunk = hidden[start : start + step].to(self.device, self.dtype)
            position_ids = torch.arange(chunk.shape[1], device=self.device).unsqueeze(0)
            mask = MASK_BUILDERS[attention_type](
                config=self.parts.config,
                inputs_embeds=chunk,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
            )
            position_embeddings = self.parts.position_embeddings(chunk, position_ids, attention_type)
            outputs.append(
                block(chunk, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
            )
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @torch.inference_mode()
    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.parts.norm(hidden.to(self.device, self.dtype))

    @torch.inference_mode()
    def logits(self, normed: Tensor) -> Tensor:
        return self.parts.logits(normed)

    # -- blocks ------------------------------------------------------------------------------------
    def settings_index(self, window: Window, rule: str = "keep_high") -> int:
        """The source block whose per-layer settings the block for `window` has (see run_window)."""
        return settings_block(*window, rule, self.average_settings)

    def run_window(self, window: Window, rule: str, hidden: Tensor) -> Tensor:
        """Apply the block for source window [lo, hi] (merged by `rule` unless lo == hi) with its
        per-layer settings (attention mask, rotary embeddings) to hidden [B, S, d]."""
        return self.apply(self.block(window, rule), self.settings_index(window, rule), hidden)

    def block(self, window: Window, rule: str = "keep_high") -> nn.Module:
        """The block for source window [lo, hi]: the original block when lo == hi, else the window
        merged by `rule`, built with the per-layer settings of settings_index(window, rule). Blocks
        are kept resident (least recently used first out) while their bytes fit the budget; otherwise
        they are rebuilt from the reader when asked for again."""
        key = (*window, rule if window[0] != window[1] else "")
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        lo, hi = window
        if lo == hi:
            tensors = self._read_block(lo)
        else:
            tensors = merge_window(self._read_block, lo, hi, rule, is_projection=self.reader.arch.is_projection)
        block = self.parts.block(tensors, self.settings_index(window, rule))
        size = _module_nbytes(block)
        if size <= self.block_budget_bytes:
            while self._resident and self._resident_bytes + size > self.block_budget_bytes:
                _, evicted = self._resident.popitem(last=False)
                self._resident_bytes -= _module_nbytes(evicted)
            self._resident[key] = block
            self._resident_bytes += size
        return block

    def _read_block(self, index: int) -> dict[str, Tensor]:
        self.blocks_loaded += 1
        return self.reader.read_block(index)

    # -- whole passes ------------------------------------------------------------------------------
    def run_blocks(
        self, hidden: Tensor, blocks: Iterable[int], on_boundary: Callable[[int, Tensor], None] | None = None
    ):
        """Apply original blocks in order; `on_boundary(i, h)` sees the output of each block i."""
        for index in blocks:
            hidden = self.apply(self.block((index, index)), index, hidden)
            if on_boundary is not None:
                on_boundary(index, hidden)
        return hidden

    def final_hidden(self, input_ids: Tensor) -> Tensor:
        """The final-norm hidden states of the unmodified model (what HF's hidden_states[-1] holds)."""
        return self.final_norm(self.run_blocks(self.embed(input_ids), range(self.num_blocks)))


def _module_nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def calibrate(runner: BlockRunner, input_ids: Tensor, cache: HiddenStateCache, *, progress: bool = True) -> Tensor:
    """Run the unmodified model on `input_ids` block by block, storing the hidden state at every block
    boundary in `cache` (0 = embeddings ... L = last block's output); return the final-norm outputs."""
    hidden = runner.embed(input_ids)
    cache.put(0, hidden)
    bar = tqdm(total=runner.num_blocks, desc="calibrating", unit="block", disable=not progress)

    def store(index: int, output: Tensor) -> None:
        cache.put(index + 1, output)
        bar.update()

    hidden = runner.run_blocks(hidden, range(runner.num_blocks), on_boundary=store)
    bar.close()
    return runner.final_norm(hidden)
