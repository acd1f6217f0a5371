"""Model evaluation, block-streamed so that a model larger than memory can be scored: perplexity of
token windows and lm-eval-harness-style zero-shot multiple choice on the seven tasks of the
layer-pruning papers."""

from slm_fast.evaluation.perplexity import PerplexityResult, perplexity
from slm_fast.evaluation.report import EvaluationReport
from slm_fast.evaluation.scoring import TokenRequest, encode_requests, loglikelihoods
from slm_fast.evaluation.tasks import TASKS, load_documents, parse_tasks
from slm_fast.evaluation.zeroshot import TaskResult, average_score, evaluate_task

__all__ = [
    "TASKS",
    "EvaluationReport",
    "PerplexityResult",
    "TaskResult",
    "TokenRequest",
    "average_score",
    "encode_requests",
    "evaluate_task",
    "load_documents",
    "loglikelihoods",
    "parse_tasks",
    "perplexity",
]
