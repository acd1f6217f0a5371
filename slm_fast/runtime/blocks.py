"""Decoder blocks built from transformers' own classes, one at a time, from tensors read by the
checkpoint reader.

A skeleton of the whole model is built with empty (meta) parameters; its small non-block parts
(embedding, rotary embedding, final norm, head) are given their real weights, and each decoder block
is instantiated on demand and bound to a block's tensors without copying them (`assign=True`).
Buffers that transformers computes at construction time (rotary frequencies, embedding scales) are
built for real because only parameters go to the meta device.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.errors import ArchitectureError


class ModelParts:
    """The non-block modules of a checkpoint, materialised on `device`, and a factory for its blocks.

    `dtype` is the compute dtype (default: the checkpoint's storage dtype, except float16 on the
    CPU, which runs in float32 because fp16 matmul is unusably slow there).
    """

    def __init__(self, reader: CheckpointReader, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.reader = reader
        self.device = torch.device(device)
        self.dtype = dtype or _default_dtype(reader.dtype, self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.config = AutoConfig.from_pretrained(reader.folder)
        self.config.use_cache = False
        with init_empty_weights(include_buffers=False), torch.device(self.device):
            skeleton = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.config = skeleton.config  # with the attention implementation resolved
        self.layer_class = type(skeleton.model.layers[0])
        self.embed: nn.Module = skeleton.model.embed_tokens
        self.norm: nn.Module = skeleton.model.norm
        self.rotary: nn.Module = skeleton.model.rotary_emb
        self.head: nn.Module = skeleton.lm_head
        self._rotary_takes_layer_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self._load_shell(reader)

    def _load_shell(self, reader: CheckpointReader) -> None:
        arch = reader.arch
        tensors = reader.read_tensors(reader.other_names)
        final_norm = {n.removeprefix("model.norm."): t for n, t in tensors.items() if n.startswith("model.norm.")}
        self._bind(self.embed, {"weight": tensors[arch.embedding_name]}, "the embedding")
        self._bind(self.norm, final_norm, "the final norm")
        if arch.head_name in tensors:
            self._bind(self.head, {"weight": tensors[arch.head_name]}, "the head")
        elif self.config.get_text_config().tie_word_embeddings:
            self.head.weight = self.embed.weight
        else:
            raise ArchitectureError(
                f"{reader.folder}: no {arch.head_name} and tie_word_embeddings is false in config.json"
            )

    def _bind(self, module: nn.Module, tensors: Mapping[str, Tensor], what: str) -> None:
        tensors = {name: t.to(self.device, self.dtype) for name, t in tensors.items()}
        missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
        if missing or unexpected:
            raise ArchitectureError(
                f"{self.reader.folder}: {what} does not match transformers' "
                f"{type(module).__name__}: missing {missing}, unexpected {unexpected}"
            )
        module.eval().requires_grad_(False)

    def block(self, tensors: Mapping[str, Tensor], source_index: int) -> nn.Module:
        """A decoder block built as source block `source_index` (which fixes its attention type) and
        bound to `tensors` (names relative to the block)."""
        with init_empty_weights(include_buffers=False), torch.device(self.device):
            layer = self.layer_class(self.config, source_index)
        self._bind(layer, tensors, f"block {source_index}")
        return layer

    def attention_type(self, source_index: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[source_index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor, attention_type: str):
        if self._rotary_takes_layer_type:
            return self.rotary(hidden, position_ids, attention_type)
        return self.rotary(hidden, position_ids)

    def logits(self, normed: Tensor) -> Tensor:
        logits = self.head(normed)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _default_dtype(storage: torch.dtype, device: torch.device) -> torch.dtype:
    if device.type == "cpu" and storage == torch.float16:
        return torch.float32
    return storage
