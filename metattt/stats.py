"""Statistics of reported numbers: mean ± standard error, and paired differences with a 95 % CI.

Conditions of an evaluation run on the same prompts, so they are compared per prompt: the
difference of two conditions is the mean of per-prompt differences, and its confidence interval
comes from a paired bootstrap (resampling prompts, keeping each prompt's pair together;
percentile interval, a fixed seed, so a report is reproducible). A difference whose interval
contains 0 is not a result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

BOOTSTRAP_RESAMPLES = 10_000
CI_LEVEL = 0.95


def mean_and_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n); stderr is NaN below 2 values."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class PairedDifference:
    """mean(a − b) over prompts that both conditions have, with a paired-bootstrap CI."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    method: str = f"paired bootstrap, {BOOTSTRAP_RESAMPLES} resamples, percentile {CI_LEVEL:.0%} CI"

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                      level: float = CI_LEVEL, seed: int = 0) -> PairedDifference:
    """Per-pair differences a[i] − b[i]: their mean and a bootstrap CI over pairs.

    Pairs where either value is NaN (a prompt without a verification step) are dropped. With
    one pair the CI is NaN; identical inputs give (0, 0, 0); a constant shift c gives (c, c, c).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = torch.tensor([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))], dtype=torch.float64)
    n = int(d.numel())
    if n == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(mean, float("nan"), float("nan"), n)
    if bool((d == d[0]).all()):  # a constant difference: every resample is that constant
        return PairedDifference(float(d[0]), float(d[0]), float(d[0]), n)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    boot = d[idx].mean(1)  # (resamples,)
    lo, hi = torch.quantile(boot, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return PairedDifference(mean, lo, hi, n)


def fmt(x: float | None, spec: str = ".2f") -> str:
    """A number for a report table; missing values as an em dash."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def fmt_difference(d: dict | PairedDifference | None, spec: str = "+.2f") -> str:
    """`+0.53 [+0.21, +0.80]` (bold when the interval excludes 0)."""
    if d is None:
        return "—"
    d = d.as_dict() if isinstance(d, PairedDifference) else d
    if d["mean"] != d["mean"]:
        return "—"
    text = f"{format(d['mean'], spec)} [{fmt(d['ci_low'], spec)}, {fmt(d['ci_high'], spec)}]"
    return f"**{text}**" if d.get("significant") else text


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Repetition of one generation: unique n-grams / n-grams (1.0: no repeats; a loop: near 0;
    too short for one n-gram: NaN)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")
