"""An lm-evaluation-harness model backed by the block-streamed runner.

`StreamedLM` is a `TemplateLM`: the harness's own code turns (context, continuation) strings into
`context_enc` and `continuation_enc` (trailing spaces of the context move to the continuation; the
concatenation is encoded and split at the context's token count), and this class tokenizes exactly as
the harness's `hf` model does (the tokenizer's own special tokens, i.e. BOS where the tokenizer adds
it, unless `add_bos_token` says otherwise). Scoring differs only in how the model is run: every
request the harness passes in one call (all tasks of a run together) goes through the blocks as one
stream, so each block is read a handful of times per run, whatever the number of requests.

Generation (`generate_until`) is greedy and block-streamed (see `generation`): each new token costs a
pass over every block for all unfinished requests together; sampled generation is refused.

Several processes (`process_group`): the harness's own data parallelism. Its evaluator gives rank r the
documents r, r + W, r + 2W, ... of every task (W processes), pads the ranks' request lists to equal
length, and gathers the per-document metrics to rank 0 through the LM's `all_gather` /
`gather_object` / `barrier`, which this class implements with torch.distributed. `gather_object` puts
the documents back in their one-process order (the harness would chain them rank after rank), so that
order-dependent statistics (the seeded bootstrap of median/perplexity/F1-type metrics) equal those
of one process, as do the means and their standard errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from slm_fast.errors import InputError
from slm_fast.evaluation.generation import greedy_generate
from slm_fast.evaluation.scoring import loglikelihoods, token_request
from slm_fast.parallel.launch import communicate

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from slm_fast.runtime.stream import BlockRunner

DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when neither config nor tokenizer names a context length
MAX_GEN_TOKS = 256  # the harness's default max_gen_toks for its hf model


class StreamedLM(TemplateLM):
    """Scores harness requests on `runner`'s model with `tokenizer`.

    add_bos_token: None tokenizes with the tokenizer's default special tokens (the harness's default);
    True / False force BOS on / off, as `--model_args add_bos_token=...` does for the harness's `hf`.
    max_length: the context length requests are left-truncated to (default: the model's, as the harness).
    share_prefixes: run requests that share a context as prefix trees (see `prefix_trees`).
    process_group: a torch.distributed group over which the harness splits the documents (see the
    module docstring); `simple_evaluate` then returns the results on rank 0 and None elsewhere.
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
        share_prefixes: bool = True,
        progress: bool = True,
        process_group: object | None = None,
    ):
        super().__init__()
        self.process_group = process_group
        if process_group is not None:
            self._rank = dist.get_rank(process_group)
            self._world_size = dist.get_world_size(process_group)
        self.runner = runner
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self._max_length = max_length or resolve_max_length(runner.parts.config, tokenizer, default=DEFAULT_MAX_LENGTH)
        self.streaming = dict(hidden_budget_bytes=hidden_budget_bytes, batch_tokens=batch_tokens, progress=progress)
        # Shared only where the runner can lay trees out (not under flash attention): what is reported.
        self.shares_prefixes = share_prefixes and runner.supports_trees
        self.scoring = dict(head_rows=head_rows, share_prefixes=self.shares_prefixes)
        self.requests_scored = 0  # token requests (rolling windows count one each)
        self.rows_run = 0  # distinct input rows run through the blocks
        self.tokens_run = 0  # tokens run through the blocks for scoring (shared prefixes once)
        self.calls = 0  # scoring passes over the blocks' stream
        self.generated_tokens = 0

    # -- the harness's hooks for data parallelism ----------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated in rank order (0-d tensors stacked), on every rank."""
        if self.process_group is None:
            return tensor
        local = tensor.detach().cpu()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        communicate(dist.all_gather, parts, local, group=self.process_group)
        return torch.stack(parts) if local.ndim == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """[every rank's object merged in document order] on `dst`, None elsewhere (see the module
        docstring); the harness chains the returned list's elements, here only one."""
        if self.process_group is None:
            return [obj]
        everyone: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        root = dist.get_global_rank(self.process_group, dst)
        communicate(dist.gather_object, obj, everyone, dst=root, group=self.process_group)
        return None if everyone is None else [documents_in_order(everyone)]

    def barrier(self) -> None:
        if self.process_group is not None:
            communicate(dist.barrier, group=self.process_group)

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
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.streaming["progress"])

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of every (key, context_enc, continuation_enc), in order."""
        if not requests:
            return []
        tokens = [token_request(context, continuation, self.max_length) for _, context, continuation in requests]
        streaming = self.streaming | ({"progress": False} if disable_tqdm else {})
        scores = loglikelihoods(self.runner, tokens, desc="scoring", **streaming, **self.scoring)
        self.requests_scored += len(tokens)
        self.rows_run += scores.rows
        self.tokens_run += scores.tokens
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
        """Greedy continuations, as the harness's hf model computes them: the context left-truncated
        to `max_length` - max_gen_toks tokens, generation until an end-of-sequence token or max_gen_toks,
        the text cut at the first of the `until` strings (EOS's text added to them). Sampling is refused."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, budgets, stops = [], [], []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise InputError(f"sampled generation ({gen_kwargs}) is not supported; only greedy")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise InputError(f"max_gen_toks {max_gen_toks} leaves no room for a context of {self.max_length}")
            prompts.append(self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks))
            budgets.append(max_gen_toks)
            stops.append([term for term in until if term])
        end_ids = self._end_token_ids()

        def finished(index: int, tokens: list[int]) -> bool:
            text = self.tok_decode(tokens, skip_special_tokens=False)
            return tokens[-1] in end_ids or any(term in text for term in stops[index])

        streaming = self.streaming | ({"progress": False} if disable_tqdm else {})
        outputs = greedy_generate(self.runner, prompts, budgets, finished, **streaming)
        texts = []
        for tokens, until, request in zip(outputs, stops, requests, strict=True):  # EOS, if any, is last
            text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
            texts.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        self.generated_tokens += sum(len(tokens) for tokens in outputs)
        return texts

    def _end_token_ids(self) -> set[int]:
        """The ids generation stops at: the tokenizer's EOS and the model's generation config's, as
        transformers' `generate` stops at the latter."""
        from transformers import GenerationConfig

        folder = self.runner.reader.folder
        try:
            config = GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json
            config = GenerationConfig.from_model_config(self.runner.parts.config)
        ids = config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        return ids | ({self.eot_token_id} if self.eot_token_id is not None else set())


def documents_in_order(per_rank: list[Any]) -> Any:
    """Merge the ranks' per-document values gathered by the harness ({task: {metric: [value per
    document]}} or {task: [sample per document]}): rank r's i-th value is document r + i W, so the
    lists are interleaved round-robin into document order. Dicts merge key by key."""
    first = per_rank[0]
    if isinstance(first, dict):
        if any(not isinstance(part, dict) or part.keys() != first.keys() for part in per_rank):
            raise ValueError("the ranks gathered different tasks or metrics")
        return {key: documents_in_order([part[key] for part in per_rank]) for key in first}
    if isinstance(first, list):
        lengths = [len(part) for part in per_rank]
        if any(length not in (lengths[0], lengths[0] - 1) for length in lengths) or lengths != sorted(lengths)[::-1]:
            raise ValueError(f"the ranks gathered {lengths} documents, not a strided split")
        return [part[i] for i in range(lengths[0]) for part in per_rank if i < len(part)]
    raise ValueError(f"cannot merge gathered {type(first).__name__} values")
