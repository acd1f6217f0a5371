"""Rewrite a checkpoint's config.json for a model that keeps only some of its blocks.

Every per-block key named in the architecture table follows the kept blocks; lists that the source
config leaves implicit (transformers derives `layer_types` from patterns when it is absent) are
derived with transformers' own config class first and written explicitly, because the derived
pattern of the shorter model would not match the blocks that were kept.
"""

from __future__ import annotations

import copy
import warnings

import torch

from slm_fast.checkpoint.arch import Architecture

CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def rewrite_config(
    config: dict, arch: Architecture, kept_sources: list[int], *, dtype: torch.dtype | None = None
) -> dict:
    """A new config dict for the blocks `kept_sources` (source indices, ascending; a merged window is
    represented by the block whose per-layer settings it takes, slm_fast.merge.settings_block). `dtype`
    updates the recorded dtype when the weights change it."""
    num_source = config[arch.count_key]
    new = copy.deepcopy(config)
    new[arch.count_key] = len(kept_sources)
    derived = _derived_config(config)
    for key in arch.per_block_lists:
        values = config.get(key, getattr(derived, key, None))
        if isinstance(values, list) and len(values) == num_source:
            new[key] = [values[i] for i in kept_sources]
    renumber = {source: position for position, source in enumerate(kept_sources)}
    for key in arch.block_index_lists:
        if isinstance(config.get(key), list):
            new[key] = [renumber[i] for i in config[key] if i in renumber]
    for key in arch.block_thresholds:
        if isinstance(config.get(key), int):
            new[key] = sum(1 for i in kept_sources if i < config[key])
    if dtype is not None and dtype in DTYPE_NAMES:
        for key in CONFIG_DTYPE_KEYS:
            if key in new:
                new[key] = DTYPE_NAMES[dtype]
    return new


def _derived_config(config: dict):
    """transformers' config object for `config` (with its derived per-layer defaults), or None."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.for_model(config["model_type"], **fields)
    except (KeyError, ValueError, TypeError):
        return None
