"""An lm-evaluation-harness model backed by the block-streamed runner.

`StreamedLM` is a `TemplateLM`: the harness's own code turns (context, continuation) strings into
`context_enc` and `continuation_enc` (trailing spaces of the context move to the continuation; the
concatenation is encoded and split at the context's token count), and this class tokenizes exactly as
the harness's `hf` model does (the tokenizer's own special tokens, i.e. BOS where the tokenizer adds
it, unless `add_bos_token` says otherwise). Scoring differs only in how the model is run: every
request the harness passes in one call (all tasks of a run together) goes through the blocks as one
stream, so each block is read a handful of times per run, whatever the number of requests.

Generation (`generate_until`) is not supported: each generated token would need a pass over every
block, which defeats streaming a model larger than memory; tasks that generate are refused before any
work starts (see `harness.check_output_types`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import has_bos_prefix, resolve_max_length

from slm_fast.errors import InputError
from slm_fast.evaluation.scoring import loglikelihoods, token_request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from slm_fast.runtime.stream import BlockRunner

DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when neither config nor tokenizer names a context length


class StreamedLM(TemplateLM):
    """Scores harness requests on `runner`'s model with `tokenizer`.

    add_bos_token: None tokenizes with the tokenizer's default special tokens (the harness's default);
    True / False force BOS on / off, as `--model_args add_bos_token=...` does for the harness's `hf`.
    max_length: the context length requests are left-truncated to (default: the model's, as the harness).
    """

    def __init__(
        self,
        runner: BlockRunner,
        tokenizer: PreTrainedTokenizerBase,
        *,
        add_bos_token: bool | None = None,
        max_length: int | None = None,
        hidden_budget_bytes: int = 2 * 10**9,
        batch_tokens: int = 4096,
        head_rows: int = 512,
        progress: bool = True,
    ):
        super().__init__()
        self.runner = runner
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self._max_length = max_length or resolve_max_length(runner.parts.config, tokenizer, default=DEFAULT_MAX_LENGTH)
        self.streaming = dict(
            hidden_budget_bytes=hidden_budget_bytes, batch_tokens=batch_tokens, head_rows=head_rows, progress=progress
        )
        self.requests_scored = 0  # token requests (rolling windows count one each)
        self.rows_run = 0  # distinct input rows run through the blocks
        self.calls = 0  # scoring passes over the blocks' stream

    # -- tokenization, as the harness's HFLM ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window condition on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False  # the text carries its own BOS
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring -------------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of every (key, context_enc, continuation_enc), in order."""
        if not requests:
            return []
        tokens = [token_request(context, continuation, self.max_length) for _, context, continuation in requests]
        streaming = self.streaming | ({"progress": False} if disable_tqdm else {})
        scores = loglikelihoods(self.runner, tokens, desc="scoring", **streaming)
        self.requests_scored += len(tokens)
        self.rows_run += scores.rows
        self.calls += 1
        results = list(zip(scores.loglikelihood.tolist(), scores.greedy.tolist(), strict=True))
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, cut into the harness's disjoint rolling windows of
        `max_length` (the first conditioned on `prefix_token_id`); all windows of all texts are scored
        in one stream."""
        windows, owners = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += loglikelihood
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise InputError(
            "generation (generate_until tasks) is not supported by the block-streamed model: every new "
            "token would need a pass over all blocks"
        )
