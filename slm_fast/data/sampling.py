"""Token-id tensors from documents: calibration samples (packed, or drawn as the reference draws them)
and perplexity windows."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from slm_fast.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DOCUMENT_SEPARATOR = "\n\n"


def pack_calibration(
    tokenizer: PreTrainedTokenizerBase,
    corpus: Sequence[str],
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
) -> torch.Tensor:
    """`n_samples` x `seq_len` token ids (int64) packed from the documents, the way llm-compressor,
    GPTQ and SLEB build calibration batches, so that short documents (paragraphs) are usable.

    The documents are shuffled with `random.Random(seed)`, tokenized without special tokens and
    concatenated with the tokenizer's EOS between consecutive documents (a blank line when it has no
    EOS); the stream is cut into consecutive sequences of `seq_len` tokens, each starting with BOS when
    the tokenizer adds one (then BOS plus `seq_len` - 1 stream tokens). Documents are tokenized only
    until the request is met.

    Raises InputError when the whole corpus is too short, stating the tokens it has and needs.
    """
    if n_samples < 1 or seq_len < 2:
        raise InputError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    separator = (
        [tokenizer.eos_token_id]
        if tokenizer.eos_token_id is not None
        else _encode(tokenizer, DOCUMENT_SEPARATOR, add_special_tokens=False)
    )
    body = seq_len - len(bos)
    needed = n_samples * body
    order = list(range(len(corpus)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for count, index in enumerate(order):
        if count:
            stream.extend(separator)
        stream.extend(_encode(tokenizer, corpus[index], add_special_tokens=False))
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise InputError(
            f"the calibration corpus has {len(stream)} tokens ({len(corpus)} documents, separators included), "
            f"but {n_samples} samples x {seq_len} tokens need {needed}"
            + (" (plus a BOS each)" if bos else "")
            + "; give more text or lower --samples / --seq-len"
        )
    return torch.tensor([bos + stream[i * body : (i + 1) * body] for i in range(n_samples)], dtype=torch.long)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts BOS first when encoding with its default special tokens."""
    if tokenizer.bos_token_id is None:
        return False
    ids = _encode(tokenizer, "a", add_special_tokens=True)
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def sample_calibration(
    tokenizer: PreTrainedTokenizerBase,
    corpus: Sequence[str],
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
) -> torch.Tensor:
    """`n_samples` x `seq_len` token ids (int64), drawn as the reference SLM code draws them.

    With `random.Random(seed)` (the same stream as the reference's `random.seed(seed)` followed by
    `random.randint`): pick a document uniformly; reject it if it tokenizes to fewer than `seq_len`
    tokens or was picked before; take the window starting at a uniform offset in [0, len - seq_len].

    BOS: documents are tokenized with the tokenizer's default special tokens, as in the reference, so
    a BOS-adding tokenizer (Llama-2 style) has BOS at a document's position 0 and it appears only in
    windows drawn at offset 0. The SmolLM2 and Qwen2.5 tokenizers add no BOS.

    Raises InputError when fewer than `n_samples` documents reach `seq_len` tokens (the reference
    would loop forever); the random stream is otherwise unchanged by that check.
    """
    if n_samples < 1 or seq_len < 1:
        raise InputError(f"n_samples and seq_len must be >= 1, got {n_samples} and {seq_len}")
    rng = random.Random(seed)
    used: set[int] = set()
    too_short: set[int] = set()
    samples = []
    for _ in range(n_samples):
        while True:
            if len(used) + len(too_short) == len(corpus):
                raise InputError(
                    f"the corpus has {len(used)} documents of >= {seq_len} tokens "
                    f"(of {len(corpus)}), fewer than the {n_samples} calibration samples asked for"
                )
            index = rng.randint(0, len(corpus) - 1)
            ids = _encode(tokenizer, corpus[index], add_special_tokens=True)
            if len(ids) < seq_len:
                too_short.add(index)
            elif index not in used:
                used.add(index)
                break
        start = rng.randint(0, len(ids) - seq_len)
        samples.append(ids[start : start + seq_len])
    return torch.tensor(samples, dtype=torch.long)


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase,
    corpus: Sequence[str],
    seq_len: int,
    max_windows: int | None = None,
    *,
    bos_every_window: bool = False,
) -> torch.Tensor:
    """Consecutive non-overlapping windows (w x `seq_len` int64 token ids) over the documents joined
    with DOCUMENT_SEPARATOR (a blank line, as the reference joins WikiText); the incomplete tail is
    dropped and `max_windows` keeps only the first windows.

    BOS: by default the joined text is tokenized with the tokenizer's default special tokens, so a
    BOS-adding tokenizer has BOS at the start of the first window only (the reference's `ppl.csv`).
    With `bos_every_window` the text is tokenized without special tokens and each window is BOS
    followed by `seq_len` - 1 text tokens (the reference's `ppl_bos.csv` variant, kept `seq_len` long).
    """
    if seq_len < 2 or (max_windows is not None and max_windows < 1):
        raise InputError(f"need seq_len >= 2 and max_windows >= 1, got {seq_len} and {max_windows}")
    text = DOCUMENT_SEPARATOR.join(corpus)
    if not bos_every_window:
        windows = _windows(_encode(tokenizer, text, add_special_tokens=True), seq_len, max_windows)
    elif tokenizer.bos_token_id is None:
        raise InputError("bos_every_window needs a tokenizer with a BOS token")
    else:
        windows = _windows(_encode(tokenizer, text, add_special_tokens=False), seq_len - 1, max_windows)
        windows = [[tokenizer.bos_token_id, *window] for window in windows]
    if not windows:
        raise InputError(f"the corpus is shorter than one window of {seq_len} tokens")
    return torch.tensor(windows, dtype=torch.long)


def _windows(ids: list[int], length: int, limit: int | None) -> list[list[int]]:
    count = len(ids) // length if limit is None else min(len(ids) // length, limit)
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    # verbose=False: documents longer than the model's context are expected here, not an error.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
