"""Checkpoints that survive crashes: atomic writes, one previous copy kept, corrupt files skipped."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("metattt")


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `x.ckpt` as a temp file + rename, and keeps the file it replaces as `x.prev.ckpt`.

    A kill mid-write leaves the old checkpoint intact; a checkpoint that was damaged after the
    fact (truncated copy, bad disk) still has a previous good one beside it to fall back on.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)


def checkpoint_is_loadable(path: Path) -> tuple[bool, str]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, empty file: all mean "not usable"
        return False, f"{type(e).__name__}: {e}"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return False, "not a Lightning checkpoint (no state_dict / global_step)"
    return True, ""


def find_resumable_checkpoint(ckpt_dir: Path) -> str | None:
    """Newest good checkpoint in `ckpt_dir`: last.ckpt, then last.prev.ckpt, then others by age."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    first = [ckpt_dir / "last.ckpt", previous_path(ckpt_dir / "last.ckpt")]
    rest = sorted((p for p in ckpt_dir.glob("*.ckpt") if p not in first), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in [p for p in first if p.exists()] + rest:
        ok, why = checkpoint_is_loadable(path)
        if ok:
            return str(path)
        log.error("checkpoint %s is corrupt or truncated (%s); falling back to the previous one", path, why)
    return None
