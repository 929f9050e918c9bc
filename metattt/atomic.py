"""Atomic writes: a reader (or a crash) never sees half a file or half a folder.

Every output metattt writes goes through these: a file or folder is written beside its final
name under a temporary one, then renamed into place. A folder that already exists is renamed
away first and removed only after the new one is in place, so at every instant either the old
or the new output exists in full.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it becomes `final` (replacing any old
    one), on an exception it is removed and `final` stays as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        mask = _umask()  # mkdtemp folders (and files written by some libraries) are private
        tmp.chmod(0o777 & ~mask)
        for p in tmp.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write; on success it is renamed to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_dataset(ds, final: Path, extra_files: dict[str, str] | None = None) -> None:
    """A `datasets.Dataset` saved with `save_to_disk` (plus small text files) as one atomic folder."""
    with atomic_dir(final) as tmp:
        ds.save_to_disk(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
