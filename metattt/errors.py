"""Bad input, told in one line: the error class the CLI reports without a traceback, and the
integrity check of the safetensors files the stages read back.

`RecipeError` is a ValueError, so code that catches ValueError (and tests that expect one) keeps
working; the CLI entry point (metattt.cli.entry) prints its message as `metattt: error: ...` and
exits with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CorruptFileError", "RecipeError", "check_safetensors", "rewrite_hint"]


class RecipeError(ValueError):
    """Bad input: a recipe key out of range, a path that does not exist, a file that cannot be read,
    a combination that cannot work. The message names the key or file and what to do."""


class CorruptFileError(RecipeError):
    """A file a stage wrote is truncated or corrupt; the message says which stage writes it again."""


def rewrite_hint(path: str | Path) -> str:
    """Which stage writes `path` again, from the run-folder layout (README, stage table)."""
    path = Path(path)
    folder, parent = path.parent.name, path.parent.parent.name
    if parent == "serve":
        return "`metattt export` writes it: run export again"
    if folder == "drafter":
        return "`metattt distill` writes it: run distill again (it resumes from its last checkpoint and exports anew)"
    if folder == "meta_drafter":
        return "`metattt meta-train` with meta.update_base=true writes it: run meta-train again"
    if folder == "meta_lora":
        return "`metattt meta-train` writes it: run meta-train again"
    return "replace it with an intact copy"


def check_safetensors(path: str | Path, hint: str | None = None) -> None:
    """Refuse a safetensors file whose size does not match its own header (a truncated copy, an
    interrupted write), reading only the header. safetensors itself reports this as "incomplete
    metadata" without naming the file.

    Raises:
        CorruptFileError: naming the file, "truncated or corrupt", and `hint` (default: `rewrite_hint`).
    """
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{path} is truncated or corrupt ({why}): {hint or rewrite_hint(path)}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise bad(f"its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise bad(f"unreadable header: {e}") from e
    if 8 + n + end != size:
        raise bad(f"{size} bytes, its header describes {8 + n + end}")
