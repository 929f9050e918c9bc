"""Progress where there is no terminal: one log line every few seconds instead of a bar.

Lightning's tqdm bar redraws one line with carriage returns; in a Slurm log or a pipe that is
one ever-growing line or nothing readable. `make_trainer` keeps the bar on a terminal and uses
`ProgressLines` otherwise (`trainer.enable_progress_bar`, `trainer.progress_every_s`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("metattt")


def has_terminal() -> bool:
    return sys.stdout.isatty()


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds))) if math.isfinite(seconds) else "?"


def _metrics(trainer: L.Trainer, keep) -> list[str]:
    return [f"{k} {float(v):.4g}" for k, v in sorted(trainer.progress_bar_metrics.items()) if keep(k)]


class ProgressLines(Callback):
    """Rank 0 logs `stage step n/N (p%) | metrics | it/s | elapsed | eta` at most every `every_s`
    seconds during fit, and once per evaluation loop (validation, test) when it ends."""

    def __init__(self, stage: str, every_s: float = 30.0):
        self.stage, self.every_s = stage, every_s
        self._start = self._last = 0.0
        self._first_step = 0

    # --- fit ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._first_step = trainer.global_step  # a resumed run starts mid-way

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.monotonic()
        if trainer.is_global_zero and now - self._last >= self.every_s:
            self._last = now
            log.info(self.train_line(trainer, now))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info(self.train_line(trainer, time.monotonic()))

    def train_line(self, trainer: L.Trainer, now: float) -> str:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        elapsed = now - self._start
        rate = (step - self._first_step) / elapsed if elapsed > 0 else float("nan")
        parts = [f"{self.stage} step {step}"]
        if math.isfinite(total) and total > 0:
            parts[0] += f"/{int(total)} ({100 * step / total:.0f}%)"
        parts += _metrics(trainer, lambda k: not k.startswith("val"))
        parts.append(f"{rate:.3g} it/s" if math.isfinite(rate) else "? it/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if math.isfinite(total) and rate > 0:
            parts.append(f"eta {_duration((total - step) / rate)}")
        return " | ".join(parts)

    # --- evaluation loops -----------------------------------------------------------------------
    def _eval_line(self, trainer: L.Trainer, what: str, batches) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            n = sum(int(b) for b in batches) if isinstance(batches, list) else int(batches)
            metrics = _metrics(trainer, lambda k: k.startswith("val")) if what == "validation" else []
            log.info(" | ".join([f"{self.stage} {what}: {n} batches", *metrics]))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_line(trainer, "validation", trainer.num_val_batches)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        now = time.monotonic()
        if trainer.is_global_zero and now - self._last >= self.every_s:
            self._last = now
            total = int(sum(trainer.num_test_batches))
            elapsed = now - self._start
            eta = elapsed / (batch_idx + 1) * (total - batch_idx - 1)
            log.info(f"{self.stage} batch {batch_idx + 1}/{total} | elapsed {_duration(elapsed)} | eta {_duration(eta)}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_line(trainer, "test", trainer.num_test_batches)
