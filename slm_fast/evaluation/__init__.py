"""Model evaluation, block-streamed so that a model larger than memory can be scored: perplexity of
token windows (ours), and any lm-evaluation-harness task (log-likelihood, rolling, greedy generation)
through `StreamedLM` (the harness's own task definitions; the seven tasks of the layer-pruning papers
also offline).

`harness_lm` and `harness` import lm-eval (the `eval` extra); import them from their modules."""

from slm_fast.evaluation.perplexity import PerplexityResult, perplexity, strided_windows
from slm_fast.evaluation.scoring import Scores, TokenRequest, loglikelihoods, token_request

__all__ = [
    "PerplexityResult",
    "Scores",
    "TokenRequest",
    "loglikelihoods",
    "perplexity",
    "strided_windows",
    "token_request",
]
