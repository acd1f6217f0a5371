"""Per-architecture facts as data: where blocks live in the tensor names and which config keys count or
list per-block things, so that dropping blocks rewrites the config consistently.

Adding an architecture is adding a row to ARCHITECTURES; nothing else branches on the model type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slm_fast.errors import ArchitectureError


@dataclass(frozen=True)
class Architecture:
    """How one family of decoder-only checkpoints lays out its blocks and per-block config."""

    name: str
    model_types: tuple[str, ...]
    block_prefix: str = "model.layers."
    count_key: str = "num_hidden_layers"
    # Config lists with one entry per block (e.g. layer_types): kept entries follow their blocks.
    per_block_lists: tuple[str, ...] = ()
    # Config lists of block indices (e.g. mlp_only_layers): indices are renumbered, dropped ones removed.
    block_index_lists: tuple[str, ...] = ()
    # Config ints that count blocks from the bottom (e.g. max_window_layers: blocks below it use full
    # attention): the new value is the number of kept blocks whose source index is below the old one.
    block_thresholds: tuple[str, ...] = ()
    # Tensors (names relative to a block) that the reference SLM code merges; everything else (norms,
    # biases) keeps the window's lowest block under the `keep_high_norms_low` rule.
    projection_pattern: str = r".*_proj\.weight$"
    embedding_name: str = "model.embed_tokens.weight"
    head_name: str = "lm_head.weight"
    tie_key: str = "tie_word_embeddings"

    def is_projection(self, block_tensor_name: str) -> bool:
        return re.fullmatch(self.projection_pattern, block_tensor_name) is not None


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(name="llama", model_types=("llama",)),
    Architecture(name="mistral", model_types=("mistral",), per_block_lists=("layer_types",)),
    Architecture(
        name="qwen2",
        model_types=("qwen2",),
        per_block_lists=("layer_types",),
        block_thresholds=("max_window_layers",),
    ),
    Architecture(
        name="qwen3",
        model_types=("qwen3",),
        per_block_lists=("layer_types",),
        block_thresholds=("max_window_layers",),
    ),
    Architecture(name="gemma2", model_types=("gemma2",), per_block_lists=("layer_types",)),
    Architecture(name="gemma3", model_types=("gemma3_text",), per_block_lists=("layer_types",)),
    Architecture(name="phi3", model_types=("phi3",)),
    Architecture(
        name="smollm3",
        model_types=("smollm3",),
        per_block_lists=("layer_types", "no_rope_layers"),
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_for(config: dict, *, source: str = "config.json") -> Architecture:
    """The table row for a checkpoint's config dict; ArchitectureError (listing the supported model
    types) when its `model_type` is absent or not in the table."""
    model_type = config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise ArchitectureError(
        f"{source}: unsupported model_type {model_type!r} "
        f"(architectures {config.get('architectures')}); supported: {', '.join(supported_model_types())}"
    )
