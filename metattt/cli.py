"""`python -m metattt <stage> --config recipes/<recipe>.yaml [--section.key value ...] [--debug]`.

Every stage parses the whole recipe (the same YAML drives all stages) into the typed `Recipe`
(metattt.config), refusing renamed keys with their new names, checks it (metattt.preflight) and
runs `STAGES[stage]`.

`main(argv)` raises what goes wrong; `entry()` (the console script and `python -m metattt`) turns
bad input into one line `metattt: error: ...` and exit code 2, and shows the traceback only with
`--debug` or `METATTT_DEBUG=1`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from metattt.config import RENAMED_KEYS, RENAMED_LIST_KEYS, Recipe
from metattt.errors import RecipeError
from metattt.stages import STAGES

__all__ = ["build_parser", "check_renamed_keys", "entry", "is_bad_input", "main", "parse_recipe", "run_stage"]


def build_parser() -> ArgumentParser:
    # exit_on_error=False: a bad key or value raises ArgumentError, which `entry` reports in one line
    # (jsonargparse would print the usage of every key first)
    parser = ArgumentParser(prog="metattt", description="Meta-learned test-time-training drafters.",
                            exit_on_error=False)
    subcommands = parser.add_subcommands(required=True, dest="stage")
    for name, stage in STAGES.items():
        sub = ArgumentParser(description=stage.help, exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="Recipe YAML (recipes/*.yaml).")
        for f in dataclasses.fields(Recipe):
            sub.add_class_arguments(f.default_factory, f.name)
        if name == "export":
            sub.add_argument("--merge-lora", action="store_true",
                             help="Merge the meta-learned LoRA into the drafter (same as --export.merge_lora=true).")
        subcommands.add_subcommand(name, sub, help=stage.help)
    return parser


def _flat_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out[key] = v
        if isinstance(v, dict):
            out.update(_flat_keys(v, key + "."))
    return out


def check_renamed_keys(argv: list[str]) -> None:
    """Refuse recipe keys that were renamed (in the recipe file or on the command line), naming the new key."""
    found: dict[str, object] = {}
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            found.update(_flat_keys(yaml.safe_load(Path(argv[i + 1]).read_text()) or {}))
        m = re.match(r"--([\w.]+)(?:=(.*))?$", arg)
        if m:
            found[m.group(1)] = m.group(2)
    for key, value in found.items():
        if key in RENAMED_KEYS:
            raise RecipeError(f"recipe key {key} was renamed: use {RENAMED_KEYS[key]}")
        if key in RENAMED_LIST_KEYS and (isinstance(value, list) or (isinstance(value, str) and value.startswith("["))):
            raise RecipeError(f"recipe key {key} (a list of on/off modes) was renamed: use {RENAMED_LIST_KEYS[key]}")


def parse_recipe(argv: list[str]) -> tuple[str, Recipe]:
    """Parse argv into (stage, the typed recipe)."""
    check_renamed_keys(argv)
    parser = build_parser()
    cfg = parser.parse_args(argv)
    stage = cfg.stage
    init = parser.instantiate_classes(cfg)[stage]
    recipe = Recipe(**{f.name: init[f.name] for f in dataclasses.fields(Recipe)})
    if stage == "export" and init.get("merge_lora"):
        recipe.export = dataclasses.replace(recipe.export, merge_lora=True)
    return stage, recipe


def run_stage(stage: str, recipe: Recipe):
    """Check the recipe for `stage` (metattt.preflight), build the corpus if it is used, run the stage."""
    from metattt.preflight import check_recipe
    from metattt.tiny import ensure_corpus

    check_recipe(stage, recipe)  # before anything is built or written, the corpus included
    if STAGES[stage].uses_corpus:
        ensure_corpus(recipe.corpus, recipe.target.path)
    return STAGES[stage].run(recipe)


def main(argv: list[str] | None = None) -> None:
    """Parse and run one stage; every error propagates (`entry` is the command-line face)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage, recipe = parse_recipe(sys.argv[1:] if argv is None else argv)
    run_stage(stage, recipe)


_PACKAGE = str(Path(__file__).resolve().parent)
# File-system errors are about the user's paths wherever they surface.
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_bad_input(e: BaseException) -> bool:
    """Bad input (told in one line) rather than a bug (told with its traceback): a RecipeError, a
    command line jsonargparse refuses, a file-system error, or a ValueError / KeyError that
    metattt's own checks raise. The same classes raised inside torch or transformers are left
    with their traceback: metattt cannot say what the user should change."""
    if isinstance(e, (RecipeError, argparse.ArgumentError, *_FILE_ERRORS)):
        return True
    if not isinstance(e, (ValueError, KeyError)):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE)


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split()) or type(e).__name__


def entry(argv: list[str] | None = None) -> int:
    """The command line: `main`, with bad input reported as one line on stderr and exit code 2.
    `--debug` (anywhere in argv) or METATTT_DEBUG=1 lets every exception through with its traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("METATTT_DEBUG", "").strip() not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if debug:
        main(args)
        return 0
    try:
        main(args)
    except Exception as e:
        if not is_bad_input(e):
            raise
        print(f"metattt: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(entry())
