"""Tiny random decoder checkpoints for tests, one per supported architecture family.

Every parameter (norm gains and biases included) is randomised so that merge rules that pick
different tensors give different models."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

# PruneOptions of sliding layer merging without compensation (the defaults are SLEB + compensation):
# what the tests of SLM's search, report and runtime paths run.
SLM = dict(method="slm", compensate="none")
SLM_FLAGS = ["--method", "slm", "--compensate", "none"]

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def float64_tolerance(arch: str, blocks: int) -> dict:
    """assert_close tolerances for two float64 runs of a tiny `arch` model that differ only in summation
    order. Gemma's RMSNorm computes in float32 whatever the model's dtype (x.float() in transformers),
    and how a float32 row sum is split into SIMD lanes depends on the CPU and the tensor's layout: each
    norm may then differ by a few float32 ulps (2^-24 ~ 6e-8 relative, a sum over d = 64 terms
    rounding ~log2(d) + 4 times). With 4 norms a block plus the final one, (4 * blocks + 1) * 10 ulps
    bounds the drift; the other architectures keep float64 throughout (1e-12)."""
    if arch.startswith("gemma"):
        drift = (4 * blocks + 1) * 10 * 2.0**-24
        return {"rtol": drift, "atol": drift}
    return {"rtol": 1e-12, "atol": 1e-12}


def tiny_config(arch: str, num_layers: int = 6) -> PretrainedConfig:
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=num_layers, tie_word_embeddings=True, **COMMON)
    if arch == "mistral":
        return MistralConfig(num_hidden_layers=num_layers, sliding_window=None, **COMMON)
    if arch == "qwen2":
        # Sliding window on the top blocks only, so that layer_types/max_window_layers matter.
        return Qwen2Config(
            num_hidden_layers=num_layers,
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=num_layers // 2,
            **COMMON,
        )
    if arch == "qwen3":
        return Qwen3Config(num_hidden_layers=num_layers, head_dim=16, **COMMON)
    if arch == "gemma2":  # alternating sliding/full attention, logit soft-capping, four norms per block
        return Gemma2Config(num_hidden_layers=num_layers, head_dim=16, sliding_window=8, **COMMON)
    if arch == "gemma3":  # rotary embeddings per attention type, q/k norms
        return Gemma3TextConfig(num_hidden_layers=num_layers, head_dim=16, sliding_window=8, **COMMON)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(num_hidden_layers=num_layers, pad_token_id=0, eos_token_id=1, bos_token_id=1, **COMMON)
    raise ValueError(arch)


def tiny_model(arch: str, num_layers: int = 6, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    return model.eval()


def save_tiny_checkpoint(
    folder: Path, arch: str = "llama", num_layers: int = 6, dtype: torch.dtype = torch.float32, shard: str | None = None
) -> Path:
    """Write a tiny checkpoint (sharded when `shard` is a size such as '40KB') and return its folder."""
    model = tiny_model(arch, num_layers).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    return folder


def save_tiny_tokenizer(folder: Path, vocab_size: int = 128) -> None:
    """A word-level tokenizer whose words are w0 .. w{vocab_size-1} (so token ids equal word numbers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(folder)


def write_word_corpus(path: Path, documents: int = 24, words: int = 200, vocab_size: int = 128, seed: int = 0) -> Path:
    """A .txt corpus of random-word paragraphs for the tiny tokenizer (blank-line separated)."""
    gen = torch.Generator().manual_seed(seed)
    paragraphs = [
        " ".join(f"w{i}" for i in torch.randint(1, vocab_size, (words,), generator=gen).tolist())
        for _ in range(documents)
    ]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path
