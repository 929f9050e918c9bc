"""Before a stage builds a model or writes a file: the paths its recipe names must exist and the
files it reads back must be intact. Types and ranges are refused earlier, when the recipe is parsed
(metattt.config); what only a file can tell (a truncated drafter, a missing adapter that the recipe
names explicitly, too few target layers for the taps) is checked here, reading headers and small
JSON files only. `check_recipe(stage, recipe)` runs before every stage of the CLI.

Every error names the recipe key or the file, and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metattt.config import Recipe
from metattt.data.text import check_sources
from metattt.errors import RecipeError, check_safetensors
from metattt.export.meta_lora import adapter_base_drafter, check_meta_lora_files
from metattt.loading import SHIPPED_TARGET
from metattt.models.dflash import weight_files
from metattt.models.registry import kind_named
from metattt.models.target import default_target_layer_ids, resolve_target_path, validate_layer_ids
from metattt.stages import prepare_output_dir

__all__ = ["CHECKS", "check_recipe"]


def check_recipe(stage: str, r: Recipe) -> None:
    """Refuse a recipe `stage` cannot run, before it builds a model or writes a file."""
    CHECKS.get(stage, lambda r: None)(r)


# --- pieces --------------------------------------------------------------------------------------
def _target(r: Recipe, num_draft_layers: int | None = None) -> None:
    """`target.path` resolves (a local folder first, a hub id only with a network), and the taps fit it."""
    path = Path(r.target.path).expanduser()
    if path.resolve() == Path(SHIPPED_TARGET).resolve() and not (path / "config.json").is_file():
        raise RecipeError(f"target.path={r.target.path}: the embedded target is missing; it ships with the project "
                          f"(restore it with `git checkout -- {SHIPPED_TARGET}`) or rebuild it with `make target`")
    source = resolve_target_path(r.target.path)
    if not (Path(source) / "config.json").is_file():
        return  # a hub id: its config is read when it loads
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    if r.target.layer_ids is not None:
        validate_layer_ids(r.target.layer_ids, layers)
    else:
        default_target_layer_ids(layers, num_draft_layers or r.drafter.num_hidden_layers)


def _drafter_folder(path: Path, key: str | None) -> None:
    """A drafter folder with config.json and intact safetensors weights."""
    if not (path / "config.json").is_file():
        where = f"{key}={path}" if key else f"no drafter at {path}"
        raise RecipeError(f"{where}: no drafter there (no config.json): " + (
            "point it at a drafter folder (`metattt distill` writes <run>/drafter/)" if key
            else "run `metattt distill` (and `metattt meta-train`) first"))
    for f in weight_files(path):
        check_safetensors(f)


def _block_size(path: Path, r: Recipe) -> int:
    import json

    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return int(raw.get("block_size") or (raw.get("dflash_config") or {}).get("block_size") or r.drafter.block_size)


def _made_by_this_run(r: Recipe, source) -> bool:
    """Files a stage writes before it reads them: the embedded corpus (corpus.build) and the
    output of `prepare`, which distill and meta-train run first when it is missing."""
    corpus = Path(r.corpus.dir).resolve()
    sources = [source] if isinstance(source, str) else list(source)
    from metattt.tiny.corpus import REPORT_NAME as CORPUS_REPORT

    def made(s: str) -> bool:
        p = Path(s).expanduser().resolve()
        if r.corpus.build and not (corpus / CORPUS_REPORT).is_file() and p.is_relative_to(corpus):
            return True
        return bool(r.prepare.train_files) and p.is_relative_to(prepare_output_dir(r).resolve())

    return all(made(str(s)) for s in sources)


def _sources(r: Recipe, key: str, source) -> None:
    if source and not _made_by_this_run(r, source):
        check_sources(source, key)


def _training_data(r: Recipe) -> None:
    if not r.data.train_files:
        raise RecipeError("data.train_files is not set: point it at the training data (or run `prepare` first)")
    _sources(r, "data.train_files", r.data.train_files)
    _sources(r, "data.val_files", r.data.val_files)
    if r.data.feature_cache and not Path(r.data.feature_cache).is_dir():
        raise RecipeError(f"data.feature_cache={r.data.feature_cache} does not exist: write it with `metattt prepare` "
                          "and prepare.cache_features=true, or unset data.feature_cache")


def _new_drafter(r: Recipe) -> None:
    if r.drafter.init_from:
        _drafter_folder(Path(r.drafter.init_from), "drafter.init_from")
    else:
        kind_named(r.drafter.kind)


def _adapter(r: Recipe, section: str, meta_lora_path: str | None) -> Path | None:
    """The meta-learned adapter the stage will use: an explicit path must hold one; the default
    location may be empty (then there is none)."""
    path = Path(meta_lora_path) if meta_lora_path else r.run.out_dir / "meta_lora"
    if not (path / "adapter_config.json").is_file():
        if meta_lora_path:
            raise RecipeError(f"{section}.meta_lora_path={meta_lora_path}: no peft adapter there (no "
                              "adapter_config.json): point it at a folder `metattt meta-train` wrote "
                              f"(<run>/meta_lora/), or leave it unset to use {r.run.out_dir / 'meta_lora'} when it exists")
        return None
    check_meta_lora_files(path)
    return path


def _eval_stack(r: Recipe, section: str, drafter_path: str | None, meta_lora_path: str | None) -> None:
    """What metattt.loading.load_eval_stack will read, in the same order of precedence."""
    adapter = _adapter(r, section, meta_lora_path)
    if drafter_path:
        _drafter_folder(Path(drafter_path), f"{section}.drafter_path")
    else:
        _drafter_folder((adapter_base_drafter(adapter) if adapter else None) or r.run.out_dir / "drafter", None)


# --- stages --------------------------------------------------------------------------------------
def _prepare(r: Recipe) -> None:
    _target(r)
    _sources(r, "prepare.train_files", r.prepare.train_files)
    _sources(r, "prepare.val_files", r.prepare.val_files)
    if r.prepare.cache_features and r.data.train_files:
        _sources(r, "data.train_files", r.data.train_files)


def _distill(r: Recipe) -> None:
    _target(r)
    _new_drafter(r)
    _training_data(r)


def _meta_train(r: Recipe) -> None:
    _target(r)
    path = Path(r.meta.drafter_path) if r.meta.drafter_path else r.run.out_dir / "drafter"
    if r.meta.drafter_path or (path / "config.json").is_file():
        _drafter_folder(path, "meta.drafter_path" if r.meta.drafter_path else None)
    else:
        _new_drafter(r)  # distilled first
    S = _block_size(path, r)
    if r.meta.context_max < S + 1:
        raise RecipeError(f"meta.context_max={r.meta.context_max} leaves no room for a block of {S} "
                          f"(drafter.block_size) in the context: use >= {S + 1}")
    _training_data(r)


def _eval(r: Recipe) -> None:
    _target(r)
    _eval_stack(r, "eval", r.eval.drafter_path, r.eval.meta_lora_path)
    for split, files in r.eval.splits.items():
        _sources(r, f"eval.splits.{split}", files)


def _sweep(r: Recipe) -> None:
    _eval(r)
    unknown = [s for s in r.sweep.splits if s not in r.eval.splits]
    if unknown:
        raise RecipeError(f"sweep.splits={r.sweep.splits}: {unknown} are not eval.splits ({list(r.eval.splits)})")


def _guided(r: Recipe) -> None:
    _target(r)
    _eval_stack(r, "guided", r.guided.drafter_path, r.guided.meta_lora_path)
    for p in [r.guided.tasks] if r.guided.tasks else []:
        if not Path(p).exists():
            raise RecipeError(f"guided.tasks={p} does not exist: point it at a task file or folder (.jsonl / .json), "
                              "or leave it unset for the synthetic tasks")


def _export(r: Recipe) -> None:
    e = r.export
    adapter = _adapter(r, "export", e.meta_lora_path) if (e.merge_lora or e.meta_lora_path) else None
    if e.merge_lora and adapter is None:
        raise RecipeError(f"export.merge_lora=true: no meta-learned adapter at {r.run.out_dir / 'meta_lora'}: run "
                          "`metattt meta-train` first, or set export.meta_lora_path")
    if e.drafter_path:
        _drafter_folder(Path(e.drafter_path), "export.drafter_path")
    else:
        base = adapter_base_drafter(adapter) if (e.merge_lora and adapter) else None
        _drafter_folder(base or r.run.out_dir / "drafter", None)


CHECKS: dict[str, Callable[[Recipe], None]] = {
    "prepare": _prepare,
    "distill": _distill,
    "meta-train": _meta_train,
    "eval": _eval,
    "sweep": _sweep,
    "guided-eval": _guided,
    "export": _export,
}  # bench and build-target: bench builds its own models or runs the stages above; build-target writes target.path
