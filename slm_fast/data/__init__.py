"""Text for calibration and perplexity: corpus readers, the registry of corpus names
(`load_corpus`) and token sampling (`pack_calibration`, `sample_calibration`, `evaluation_windows`)."""

from slm_fast.data.registry import corpus_names, load_corpus
from slm_fast.data.sampling import DOCUMENT_SEPARATOR, evaluation_windows, pack_calibration, sample_calibration

__all__ = [
    "DOCUMENT_SEPARATOR",
    "corpus_names",
    "evaluation_windows",
    "load_corpus",
    "pack_calibration",
    "sample_calibration",
]
