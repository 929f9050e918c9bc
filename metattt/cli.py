"""`python -m metattt <stage> --config recipes/<recipe>.yaml [--section.key value ...]`.

Every stage parses the whole recipe (the same YAML drives all stages) into the typed `Recipe`
(metattt.config), refusing renamed keys with their new names, and runs `STAGES[stage]`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from metattt.config import RENAMED_KEYS, RENAMED_LIST_KEYS, Recipe
from metattt.stages import STAGES

__all__ = ["build_parser", "check_renamed_keys", "main", "parse_recipe", "run_stage"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="metattt", description="Meta-learned test-time-training drafters.")
    subcommands = parser.add_subcommands(required=True, dest="stage")
    for name, stage in STAGES.items():
        sub = ArgumentParser(description=stage.help)
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
            raise ValueError(f"recipe key {key} was renamed: use {RENAMED_KEYS[key]}")
        if key in RENAMED_LIST_KEYS and (isinstance(value, list) or (isinstance(value, str) and value.startswith("["))):
            raise ValueError(f"recipe key {key} (a list of on/off modes) was renamed: use {RENAMED_LIST_KEYS[key]}")


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
    from metattt.tiny import ensure_corpus

    if STAGES[stage].uses_corpus:
        ensure_corpus(recipe.corpus, recipe.target.path)
    return STAGES[stage].run(recipe)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage, recipe = parse_recipe(sys.argv[1:] if argv is None else argv)
    run_stage(stage, recipe)


if __name__ == "__main__":
    main()
