"""A tiny random Llama with a real (byte-level BPE) tokenizer, so that harness tasks on English text
run through it: the tokenizer is trained here, in a second, on the tasks' own text."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 400


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", model_max_length=512
    )


def save_text_model(folder: Path, texts: list[str], num_layers: int = 3, seed: int = 0) -> Path:
    """A random tiny Llama (float32, context 512) and a tokenizer trained on `texts`, in `folder`."""
    tokenizer = train_tokenizer(texts)
    config = tiny_config("llama", num_layers)
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = 512
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
