"""Checkpoints that survive crashes, and resumes that are exact.

- `AtomicCheckpointIO`: every checkpoint is written to a temp file, fsynced and renamed into place;
  the file it replaces is kept as `x.prev.ckpt`. A kill mid-write leaves the old checkpoint intact.
- `find_resumable_checkpoint`: the newest checkpoint that passes an integrity check (zip CRCs +
  structure); a truncated or corrupt one is reported by name and the previous one is used.
- Exports (drafter, LoRA folders) are atomic too: `metattt.atomic.atomic_dir`.
- `ResumableSampler` + `ResumableDataLoader`: the shuffle order is a function of (seed, epoch) and the
  same global order for any number of processes; the loader's position (samples seen in the epoch) is
  saved in checkpoints and a resumed run continues mid-epoch exactly where the interrupted one was.
  (Lightning 2.6 by itself restarts an interrupted epoch from its first batch for map-style loaders.)
- `DataPosition`, `StepSeeder`, `PreemptionCheckpoint`: the Lightning callbacks that carry the loader
  position through checkpoints, make the global RNGs a function of the step, and turn SIGUSR1 (Slurm's
  warning before the time limit) into checkpoint + requeue + exit at a batch boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import signal
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger("metattt")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" — the run stopped to be requeued / resumed


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of writers that were killed mid-write (their process is gone on this host)."""
    for stale in path.parent.glob(f".{path.name}.*tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `x.ckpt` as a temp file + fsync + rename, and keeps the file it replaces as `x.prev.ckpt`.

    A kill mid-write leaves the old checkpoint intact; a checkpoint that was damaged after the
    fact (truncated copy, bad disk) still has a previous good one beside it to fall back on.
    `x.ckpt` exists at every moment (the previous copy is made with a hard link where the filesystem
    has them). Lightning's `ModelCheckpoint(save_last=True)` writes `last.ckpt` through this plugin
    (`trainer.save_checkpoint`); only `save_last="link"` would bypass it, and metattt does not use it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if path.exists():
                prev, prev_tmp = previous_path(path), path.with_name(f".{path.name}.prev-tmp-{os.getpid()}")
                try:
                    os.link(path, prev_tmp)  # keeps `path` in place until the new file replaces it
                    os.replace(prev_tmp, prev)
                except OSError:  # no hard links here: move it (path is briefly absent; prev is complete)
                    os.replace(path, prev)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(path.parent)


def checkpoint_is_loadable(path: Path) -> tuple[bool, str]:
    """(ok, why-not). Checks every zip record's CRC (catches truncation and flipped bytes, which
    `torch.load` itself does not notice), then the structure of a Lightning checkpoint."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return False, "empty file"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                return False, f"CRC mismatch in record {bad}"
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        else:  # legacy (non-zip) torch.save format: no CRCs, a full load is the check
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, unreadable: all mean "not usable"
        return False, f"{type(e).__name__}: {e}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return False, "not a Lightning checkpoint (no state_dict / global_step)"
    return True, ""


def find_resumable_checkpoint(ckpt_dir: Path) -> str | None:
    """Newest good checkpoint in `ckpt_dir`: last.ckpt, then last.prev.ckpt, then others by age.

    A corrupt or truncated file is logged as an error naming it, and the next one is tried.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    first = [ckpt_dir / "last.ckpt", previous_path(ckpt_dir / "last.ckpt")]
    rest = sorted((p for p in ckpt_dir.glob("*.ckpt") if p not in first), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = [p for p in first if p.exists()] + rest
    for i, path in enumerate(candidates):
        ok, why = checkpoint_is_loadable(path)
        if ok:
            return str(path)
        nxt = f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "no other checkpoint is left"
        log.error("checkpoint %s is corrupt or truncated (%s); %s", path, why, nxt)
    if candidates:
        log.error("no usable checkpoint in %s: starting this stage from scratch", ckpt_dir)
    return None


# ------------------------------------------------------------------------------------------------
# Data position


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose pass over an epoch can start mid-way.

    The order is `randperm(len, seed + epoch)` (padded like DistributedSampler), and rank r of W takes
    every W-th index of it, so step i of any run consumes the same global samples
    `order[i·B·W : (i+1)·B·W]`: one process with batch 2B sees what two processes with batch B see
    together. `resume(epoch, seen)` makes the next pass over `epoch` skip the first `seen` global
    samples. Being a DistributedSampler, Lightning keeps it (and calls `set_epoch`) instead of
    replacing it with its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None
        self.pass_epoch = 0  # epoch of the pass in progress
        self.pass_start = 0  # global samples skipped at the start of that pass

    def resume(self, epoch: int, seen: int) -> None:
        self._resume = (int(epoch), int(seen))
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        pad = self.total_size - n
        if pad > 0:
            order += (order * math.ceil(pad / max(1, n)))[:pad]
        start = 0
        if self._resume is not None:
            epoch, seen = self._resume
            if epoch == self.epoch:
                start = min(seen, self.total_size)
            if epoch <= self.epoch:
                self._resume = None
        self.pass_epoch, self.pass_start = self.epoch, start
        return iter(order[start + self.rank : self.total_size : self.num_replicas])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` that knows (and saves) its position in the epoch.

    `state_dict()` = {epoch, samples_seen (global, all ranks)}; Lightning stores it in checkpoints
    (it implements Lightning's stateful-loader protocol) and `DataPosition` restores it. Iteration is
    lazy: nothing is drawn from the sampler before the first batch is asked for, so a position loaded
    after Lightning has called `iter()` (it does during setup) still applies.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler) or self.batch_size is None:
            raise TypeError("ResumableDataLoader needs sampler=ResumableSampler(...) and a batch_size")
        self._position: tuple[int, int] | None = None

    def __iter__(self):  # type: ignore[override]
        return self._batches()

    def _batches(self):
        it = super().__iter__()
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        per_step = self.batch_size * sampler.num_replicas
        for n, batch in enumerate(it, start=1):
            self._position = (sampler.pass_epoch, sampler.pass_start + n * per_step)
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, seen = self._position if self._position is not None else (sampler.epoch, 0)
        return {"epoch": epoch, "samples_seen": seen, "num_replicas": sampler.num_replicas,
                "batch_size": int(self.batch_size), "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if state.get("seed", sampler.seed) != sampler.seed:
            log.warning("resuming with data seed %s (the checkpoint used %s): the data order changes",
                        sampler.seed, state["seed"])
        if state.get("num_replicas", sampler.num_replicas) != sampler.num_replicas:
            log.warning("resuming on %d processes (the checkpoint ran on %d): the rest of the epoch is "
                        "re-split, the samples already seen are still skipped", sampler.num_replicas,
                        state["num_replicas"])
        sampler.resume(state["epoch"], state["samples_seen"])
        self._position = (int(state["epoch"]), int(state["samples_seen"]))


class DataPosition(L.Callback):
    """Carries the train loader's position through checkpoints (`checkpoint["metattt_data"]`).

    Lightning saves stateful loaders itself, but restores them only when the loader is created after
    the checkpoint was read; `configure_optimizers` calling `trainer.estimated_stepping_batches`
    creates it earlier, and the saved position would be dropped. This callback re-applies it at
    `on_train_start`, before the first batch is drawn.
    """

    key = "metattt_data"

    def __init__(self) -> None:
        self._pending: dict | None = None

    @staticmethod
    def _loader(trainer: L.Trainer) -> ResumableDataLoader | None:
        loader = trainer.train_dataloader
        return loader if isinstance(loader, ResumableDataLoader) else None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        loader = self._loader(trainer)
        if loader is not None:
            checkpoint[self.key] = loader.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(self.key)

    def on_train_start(self, trainer, pl_module) -> None:
        loader = self._loader(trainer)
        if self._pending is not None and loader is not None:
            loader.load_state_dict(self._pending)
            log.info("data position restored: epoch %d, %d samples already seen", self._pending["epoch"],
                     self._pending["samples_seen"])
        elif loader is None and self._pending is not None:
            log.warning("the checkpoint has a data position but the train loader is not a ResumableDataLoader: "
                        "the interrupted epoch restarts from its first batch")
        self._pending = None


def step_generator(seed: int, step: int, rank: int, stage: str) -> torch.Generator:
    """The generator of one training step's (or validation batch's) own draws (anchors, task splits):
    a function of (seed, step, rank) only, so a resumed run samples what an uninterrupted one would
    have, and validation sees the same blocks every time (`step` is then the batch index)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 31 + (stage == "val")) % 2**62)
    return g


class StepSeeder(L.Callback):
    """Reseeds torch / numpy / random from (seed, epoch, batch, rank) before every training batch.

    Whatever draws from the global RNGs (dropout, LoRA dropout, augmentation) is then a function of
    the position in training, so a resumed run draws what the uninterrupted one drew, on each rank.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        key = f"{self.seed}:{trainer.current_epoch}:{batch_idx}:{trainer.global_rank}".encode()
        s = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        torch.manual_seed(s)  # also seeds every CUDA device
        np.random.seed(s % 2**32)
        random.seed(s)


# ------------------------------------------------------------------------------------------------
# Preemption (Slurm requeue)


class Preempted(SystemExit):
    """Raised (exit code 75) after the preemption checkpoint is written and the job is requeued."""


def requeue_slurm_job() -> bool:
    """`scontrol requeue <job>` for this Slurm job (array jobs: `<array>_<task>`). True on success."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_id else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("not in a Slurm job (no SLURM_JOB_ID): nothing to requeue")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        log.warning("could not requeue Slurm job %s (%s): resubmit it to resume", job, e)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.info("requeued Slurm job %s", job)
    return True


def _in_slurm_job() -> bool:
    return SLURMEnvironment.detect() and bool(os.environ.get("SLURM_JOB_ID"))


class PreemptionCheckpoint(L.Callback):
    """SIGUSR1 → `last.ckpt` at the next batch boundary → `scontrol requeue` (in a Slurm job) → exit 75.

    The signal handler only sets a flag; every rank checks it after each training batch (one tiny
    all-reduce, so all ranks stop at the same step even if the signal reached them at different
    times), the checkpoint is written where `find_resumable_checkpoint` looks, and the process exits
    without exporting, so a requeued (or re-run) job resumes from that step. Used instead of
    Lightning's own handler, which saves from inside the signal handler (mid-step, and without the
    ranks agreeing on the step) and to `hpc_ckpt_*.ckpt`, which an explicit `ckpt_path` overrides.
    `#SBATCH --signal=SIGUSR1@90` sends it 90 s before the time limit.
    """

    def __init__(self, dirpath: str | Path, signum: int = signal.SIGUSR1, requeue: bool = True,
                 filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.signum = signum
        self.requeue = requeue
        self.filename = filename
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._handler)
        self._installed = True
        then = "requeue this Slurm job, exit" if self.requeue and _in_slurm_job() else "exit"
        log.info("on %s: checkpoint at the next step to %s, %s %d", signal.Signals(self.signum).name,
                 self.dirpath / self.filename, then, PREEMPTED_EXIT_CODE)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate():  # only at optimizer-step boundaries (same on every rank)
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = self.dirpath / self.filename
        trainer.save_checkpoint(path)
        log.warning("signal %s: checkpoint written to %s at step %d", signal.Signals(self.signum).name, path,
                    trainer.global_step)
        if trainer.is_global_zero and self.requeue and _in_slurm_job():
            requeue_slurm_job()
        trainer.strategy.barrier("metattt-preempted")
        raise Preempted(PREEMPTED_EXIT_CODE)
