"""Healing a pruned model by brief fine-tuning: the SLM paper's LoRA recipe, or Lu et al.'s (2024)
partial fine-tuning of the head and the last blocks; the result is merged into a plain checkpoint.

Healing loads the whole model (it trains it); it is meant for models that fit in memory."""

from slm_fast.healing.train import MODES, HealOptions, HealReport, heal

__all__ = ["MODES", "HealOptions", "HealReport", "heal"]
