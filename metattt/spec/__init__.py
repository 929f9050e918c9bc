"""Speculative decoding with target verification, acceptance rules, and the τ metrics."""

from metattt.spec.decode import (
    ACCEPT_RULES,
    GenerationResult,
    accept_exact,
    accept_greedy,
    accept_speculative,
    crop_cache,
    sampling_probs,
    speculative_generate,
    target_generate,
    top_p_filter,
)
from metattt.spec.metrics import AcceptanceLength, PerPositionAcceptance, summarize_tau
from metattt.stats import mean_and_stderr

__all__ = [
    "ACCEPT_RULES",
    "AcceptanceLength",
    "GenerationResult",
    "PerPositionAcceptance",
    "accept_exact",
    "accept_greedy",
    "accept_speculative",
    "crop_cache",
    "mean_and_stderr",
    "sampling_probs",
    "speculative_generate",
    "summarize_tau",
    "target_generate",
    "top_p_filter",
]
