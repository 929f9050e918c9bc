"""`python -m metattt <stage> --config recipes/<recipe>.yaml [--section.key value ...]`.

Every stage parses the whole recipe (the same YAML drives all stages), validates it against
the typed sections in `metattt.config` and the DataModule's signature, and runs.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from metattt.config import (
    DistillConfig,
    DrafterArgs,
    LoraArgs,
    MetaConfig,
    PrepareConfig,
    RunConfig,
    TargetConfig,
    TrainerConfig,
)
from metattt.data.datamodule import SequenceDataModule
from metattt.evaluate import EvalConfig
from metattt.export.serving import ExportConfig
from metattt.guided import GuidedEvalConfig
from metattt.sweep import SweepConfig
from metattt.tiny import CorpusConfig, TinyTargetConfig

STAGES: dict[str, str] = {
    "distill": "Distill a block drafter from the frozen target; export it to {out}/drafter/.",
    "meta-train": "Meta-train the drafter's LoRA initialization; export a peft adapter to {out}/meta_lora/.",
    "eval": "Prefill TTT + speculative decoding: τ for static / TTT-zero / TTT-meta; {out}/eval/report.md.",
    "prepare": "Chat data -> target-regenerated, tokenized Arrow folders in {out}/data/ (+ the hidden-state cache).",
    "guided-eval": "Draft-guided decoding on context-learning tasks (α × TTT × temperature, null control); "
                   "{out}/guided/report.md.",
    "export": "Serving folder (DFlash layout, what vLLM / SGLang load): the static drafter to {out}/serve/static/, "
              "or with --merge-lora the meta-learned LoRA merged in to {out}/serve/meta_static/.",
    "sweep": "TTT sweep: TTT steps x inner lr x LoRA rank x LoRA placement, Δτ vs static; {out}/sweep/sweep.md.",
    "build-target": "Rebuild the embedded target (corpus, tokenizer, small Qwen3 LM) into target.path (data/tiny_target).",
}


def add_recipe_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--config", action=ActionConfigFile, help="Recipe YAML (recipes/*.yaml).")
    parser.add_class_arguments(RunConfig, "run")
    parser.add_class_arguments(TargetConfig, "target")
    parser.add_class_arguments(CorpusConfig, "corpus")
    parser.add_class_arguments(TinyTargetConfig, "tiny_target")
    parser.add_class_arguments(DrafterArgs, "drafter")
    parser.add_class_arguments(SequenceDataModule, "data", skip={"tokenizer"}, instantiate=False)
    parser.add_class_arguments(TrainerConfig, "trainer")
    parser.add_class_arguments(DistillConfig, "distill")
    parser.add_class_arguments(LoraArgs, "lora")
    parser.add_class_arguments(MetaConfig, "meta")
    parser.add_class_arguments(PrepareConfig, "prepare")
    parser.add_class_arguments(EvalConfig, "eval")
    parser.add_class_arguments(GuidedEvalConfig, "guided")
    parser.add_class_arguments(SweepConfig, "sweep")
    parser.add_class_arguments(ExportConfig, "export")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="metattt", description="Meta-learned test-time-training drafters.")
    subcommands = parser.add_subcommands(required=True, dest="stage")
    for stage, help_text in STAGES.items():
        sub = ArgumentParser(description=help_text)
        add_recipe_arguments(sub)
        if stage == "export":
            sub.add_argument("--merge-lora", action="store_true",
                             help="Merge the meta-learned LoRA into the drafter (same as --export.merge_lora=true).")
        subcommands.add_subcommand(stage, sub, help=help_text)
    return parser


def parse_recipe(argv: list[str]) -> tuple[str, Namespace]:
    """Parse argv into (stage, instantiated recipe namespace)."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    stage = cfg.stage
    init = parser.instantiate_classes(cfg)
    return stage, init[stage]


def _section_dict(ns) -> dict:
    if isinstance(ns, Namespace):
        return {k: v for k, v in ns.as_dict().items() if k != "__path__"}
    return asdict(ns)


def run_stage(stage: str, r: Namespace) -> None:
    from metattt import pipeline
    from metattt.tiny import build_target, ensure_corpus

    if stage == "export":  # reads the run folder only: no target, no corpus
        from metattt.export.serving import run_export

        run_export(r.run.out_dir, replace(r.export, merge_lora=r.export.merge_lora or bool(r.get("merge_lora"))))
        return
    if stage == "build-target":
        build_target(Path(r.target.path), r.corpus, r.tiny_target)
        return
    ensure_corpus(r.corpus, r.target.path)
    if stage == "distill":
        pipeline.run_distill(r.run, r.target, r.drafter, _section_dict(r.data), r.trainer, r.distill)
    elif stage == "meta-train":
        pipeline.run_meta_train(r.run, r.target, r.drafter, r.lora, _section_dict(r.data), r.trainer, r.distill,
                                r.meta)
    elif stage == "eval":
        pipeline.run_eval(r.run, r.target, r.drafter, r.lora, r.trainer, r.eval)
    elif stage == "prepare":
        pipeline.run_prepare(r.run, r.target, r.drafter, _section_dict(r.data), r.prepare)
    elif stage == "sweep":
        pipeline.run_sweep_stage(r.run, r.target, r.drafter, r.lora, r.eval, r.sweep)
    elif stage == "guided-eval":
        pipeline.run_guided_eval(r.run, r.target, r.drafter, r.lora, r.trainer, r.guided)
    else:  # pragma: no cover - guarded by the parser
        raise ValueError(f"unknown stage {stage}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage, recipe = parse_recipe(sys.argv[1:] if argv is None else argv)
    run_stage(stage, recipe)


if __name__ == "__main__":
    main()
