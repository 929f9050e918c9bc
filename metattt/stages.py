"""One function per stage, each over the whole typed `Recipe`; `STAGES` is the table the CLI and the
bench run them from. A stage reads only what its recipe says, builds what it needs through
metattt.loading, and writes under `{run.output_root}/{run.name}/`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from metattt.config import DrafterConfig, Recipe
from metattt.lit.trainer import eval_trainer, fit_resuming, make_trainer
from metattt.loading import (
    build_datamodule,
    build_drafter,
    check_feature_cache,
    load_eval_stack,
    load_target,
    load_tokenizer,
    lora_targets,
)

log = logging.getLogger("metattt")


def _target_and_tokenizer(r: Recipe, heads_only: bool = False):
    return load_target(r.target, r.drafter.num_hidden_layers, heads_only=heads_only), load_tokenizer(r.target.path)


# --- prepare -----------------------------------------------------------------------------------
def prepare(r: Recipe) -> dict:
    """Data → (target-regenerated) tokenized Arrow folders in `prepare.output_dir` (default
    {out}/data/{train,validation}); then, with `prepare.cache_features`, the hidden-state cache of the
    `data` section's sequences in `data.feature_cache`. Reruns reuse finished work."""
    from metattt.data.feature_cache import write_feature_cache
    from metattt.data.prepare import prepare_chat_data

    p = r.prepare
    if not (p.train_files or p.val_files or p.cache_features):
        raise ValueError("prepare has nothing to do: set prepare.train_files (data to tokenize) and/or "
                         "prepare.cache_features=true (with data.feature_cache)")
    if p.cache_features and not r.data.feature_cache:
        raise ValueError("prepare.cache_features=true needs data.feature_cache: <folder> (where the cache goes)")
    target = None

    def get_target():
        nonlocal target
        if target is None:
            target = load_target(r.target, r.drafter.num_hidden_layers)
            if torch.cuda.is_available():
                target.to("cuda")
        return target

    tokenizer = load_tokenizer(r.target.path)
    result: dict = {}
    if p.train_files or p.val_files:
        out_dir = prepare_output_dir(r)
        if p.records == "text":
            result["data"] = _prepare_text_continuations(r, tokenizer, out_dir, lambda: get_target().model)
        else:
            result["data"] = prepare_chat_data(p, tokenizer, out_dir, r.data.chat_template_kwargs,
                                               load_model=lambda: get_target().model)
    if p.cache_features:
        dm = build_datamodule(replace(r.data, feature_cache=None), tokenizer, r.run.seed, r.drafter.block_size)
        t = get_target()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        result["feature_cache"] = {}
        for split, ds in (("train", dm.train_dataset), ("validation", dm.val_dataset)):
            if ds is not None and len(ds):
                result["feature_cache"][split] = write_feature_cache(
                    t, ds, r.data.feature_cache, dtype=p.cache_dtype, batch_size=p.cache_batch_size,
                    shard_bytes=p.cache_shard_mb << 20, target_name=str(r.target.path), pad_id=pad, progress=True)
    return result


def prepare_output_dir(r: Recipe) -> Path:
    return Path(r.prepare.output_dir) if r.prepare.output_dir else r.run.out_dir / "data"


def _prepare_text_continuations(r: Recipe, tokenizer, out_dir: Path, load_model) -> dict:
    """`prepare.records: text`: train (and validation) folders of prompts continued by the target."""
    from metattt.data.continuations import prepare_continuations

    p = r.prepare
    if p.regenerate != "transformers":
        raise ValueError("prepare.records=text continues prompts with the local target: set "
                         "prepare.regenerate=transformers")
    if p.greedy_fraction < 1.0 and p.temperature <= 0:
        raise ValueError("prepare.greedy_fraction < 1 samples the other prompts: set prepare.temperature > 0")
    manifests = {}
    for split, files, limit in (("train", p.train_files, p.max_records),
                                ("validation", p.val_files, p.max_val_records or p.max_records)):
        if files:
            manifests[split] = prepare_continuations(
                files, out_dir / split, tokenizer, load_model, prompt_lens=p.text_prompt_lens,
                windows_per_doc=p.windows_per_doc, max_new_tokens=p.max_new_tokens,
                greedy_fraction=p.greedy_fraction, temperature=p.temperature, max_records=limit,
                seed=r.run.seed + (split == "validation"), batch_size=p.generate_batch_size,
                model_name=str(r.target.path), overwrite=p.overwrite)
    return manifests


def _prepared_first(r: Recipe) -> None:
    """Run `prepare` first when the recipe trains on what it writes and it is not there yet."""
    out = prepare_output_dir(r)
    if r.prepare.train_files and r.data.train_files and Path(str(r.data.train_files)) == out / "train" \
            and not (out / "train").exists():
        log.info("no prepared data at %s: preparing it first", out / "train")
        prepare(r)


# --- distill -----------------------------------------------------------------------------------
def distill(r: Recipe) -> Path:
    """Distill a drafter and export it to `{out}/drafter/` (DFlash layout). Returns that folder."""
    from metattt.lit.distill import DistillModule

    if r.distill.kl_weight > 0 and r.data.feature_cache:
        raise ValueError("distill.kl_weight > 0 needs the target's own next-token distributions, which the "
                         "feature cache does not hold: unset data.feature_cache or set distill.kl_weight=0")
    _prepared_first(r)
    L.seed_everything(r.run.seed, workers=True)
    # with cached features the target never runs: only the embedding and head the drafter borrows
    target, tokenizer = _target_and_tokenizer(r, heads_only=bool(r.data.feature_cache))
    drafter = build_drafter(r.drafter, target, tokenizer)
    dm = build_datamodule(r.data, tokenizer, r.run.seed, drafter.config.block_size)
    check_feature_cache(dm, target)
    d = r.distill
    module = DistillModule(target, drafter, lr=d.lr, weight_decay=d.weight_decay, warmup_ratio=d.warmup_ratio,
                           num_anchors=d.num_anchors, gamma=d.gamma, seed=r.run.seed, kl_weight=d.kl_weight)
    trainer = make_trainer(r.run, r.trainer, "distill", max_epochs=d.max_epochs, max_steps=d.max_steps,
                           grad_clip=d.grad_clip, checkpoint_every_n_steps=d.checkpoint_every_n_steps,
                           val_check_interval=d.val_check_interval, limit_val_batches=d.limit_val_batches,
                           accumulate_grad_batches=d.accumulate_grad_batches)
    fit_resuming(trainer, module, dm, r.run, "distill")
    out = r.run.out_dir / "drafter"
    if trainer.is_global_zero:
        module.drafter.save_pretrained(out)
        log.info("drafter written to %s", out)
    return out


# --- meta-train --------------------------------------------------------------------------------
def meta_train(r: Recipe) -> Path:
    """Meta-train a LoRA init on the distilled drafter; export a peft adapter to {out}/meta_lora/."""
    from metattt.export.meta_lora import export_meta_lora
    from metattt.lit.meta import MetaTrainModule
    from metattt.models.lora import add_lora

    meta = r.meta
    drafter_path = Path(meta.drafter_path) if meta.drafter_path else r.run.out_dir / "drafter"
    if not (drafter_path / "config.json").is_file():
        if meta.drafter_path:
            raise FileNotFoundError(f"meta.drafter_path={drafter_path} has no drafter (config.json)")
        log.info("no drafter at %s: distilling one first", drafter_path)
        distill(r)
    _prepared_first(r)
    L.seed_everything(r.run.seed, workers=True)
    target, tokenizer = _target_and_tokenizer(r, heads_only=bool(r.data.feature_cache))
    drafter = build_drafter(DrafterConfig(init_from=str(drafter_path), attn_implementation=r.drafter.attn_implementation),
                            target, tokenizer)
    S = drafter.config.block_size
    if meta.context_max < S + 1:
        raise ValueError(f"meta.context_max={meta.context_max} leaves no room for a block of {S} in the context")
    dm = build_datamodule(r.data, tokenizer, r.run.seed, 2 * S + 1)  # a block in the context and one after it
    check_feature_cache(dm, target)
    lora = r.lora
    model = add_lora(drafter, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                     target_modules=lora_targets(lora, drafter), seed=r.run.seed)
    module = MetaTrainModule(target, model, meta, seed=r.run.seed)
    trainer = make_trainer(r.run, r.trainer, "meta", max_epochs=meta.max_epochs, max_steps=meta.max_steps,
                           grad_clip=None, checkpoint_every_n_steps=meta.checkpoint_every_n_steps,
                           val_check_interval=meta.val_check_interval, limit_val_batches=meta.limit_val_batches,
                           inference_mode=False)
    fit_resuming(trainer, module, dm, r.run, "meta")
    out = r.run.out_dir / "meta_lora"
    if trainer.is_global_zero:
        base_path = drafter_path
        if meta.update_base:
            base_path = r.run.out_dir / "meta_drafter"
            model.get_base_model().save_pretrained(base_path)
        extra = {"feature_head.weight": module.feature_head.weight} if module.feature_head is not None else None
        export_meta_lora(model, out, module.ttt_config(), base_path, extra=extra, algorithm=meta.algorithm,
                         global_step=trainer.global_step)
        log.info("meta-learned LoRA init written to %s", out)
    return out


# --- eval --------------------------------------------------------------------------------------
def evaluate(r: Recipe) -> dict | None:
    """Evaluate static / TTT-zero / TTT-meta drafters; write {out}/eval/report.{json,md} + plots."""
    from torch.utils.data import DataLoader

    from metattt.eval.speculative import condition_plan, load_prompts
    from metattt.lit.eval import EvalModule
    from metattt.models.registry import kind_of

    cfg = r.eval
    L.seed_everything(r.run.seed, workers=True)
    s = load_eval_stack(r.run.out_dir, r.target, r.drafter, r.lora, cfg.drafter_path, cfg.meta_lora_path, r.run.seed)
    needs_meta = ("ttt_meta", "meta_static", "online_meta")
    if s.meta_path is None and any(c in needs_meta for c in cfg.conditions):
        log.warning("no meta-learned LoRA found: skipping conditions %s", "/".join(needs_meta))
        cfg = replace(cfg, conditions=[c for c in cfg.conditions if c not in needs_meta])
    cfg = replace(cfg, online=cfg.online.resolved(s.ttt.online))  # the report records what ran
    plan = condition_plan(cfg, s.ttt)
    prompts = []
    for split, files in cfg.splits.items():
        for ids in load_prompts(files, s.tokenizer, cfg.prompt_len, cfg.num_prompts, r.run.seed):
            prompts.append({"split": split, "uid": len(prompts), "prompt": ids})
    out_dir = Path(cfg.output_dir) if cfg.output_dir else r.run.out_dir / "eval"
    block_size = s.model.config.block_size
    meta = {"recipe": r.run.name, "drafter": str(s.drafter_path), "meta_lora": str(s.meta_path) if s.meta_path else None,
            "drafter_kind": kind_of(s.model).name, "block_size": block_size, "prompt_len": cfg.prompt_len,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "rule": cfg.rule if cfg.temperature > 0 else "greedy", "ttt_steps": cfg.ttt.apply(s.ttt).steps,
            "position_bucket": cfg.position_bucket,
            **({"online": dataclasses.asdict(cfg.online), "meta_online": dataclasses.asdict(s.ttt.online)}
               if any(c.startswith("online_") for c in cfg.conditions) else {}),
            "device": "cpu" if r.trainer.accelerator == "cpu" else r.trainer.accelerator}
    module = EvalModule(s.target, s.model, plan, s.inits, cfg, list(cfg.splits), s.tokenizer.eos_token_id, r.run.seed,
                        out_dir, meta, s.feature_head, warmup_prompt=prompts[0]["prompt"] if prompts else None)
    trainer = eval_trainer(out_dir, r.trainer)

    class _Shard(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(range(trainer.global_rank, len(prompts), trainer.world_size))

        def __getitem__(self, i: int) -> dict:
            return prompts[trainer.global_rank + i * trainer.world_size]

    trainer.test(module, dataloaders=DataLoader(_Shard(), batch_size=None))
    if trainer.is_global_zero:
        log.info("evaluation report written to %s", out_dir / "report.md")
    return module.summary


# --- guided-eval -------------------------------------------------------------------------------
def guided_eval(r: Recipe) -> list[dict]:
    """Draft-guided decoding on context-learning tasks: category × temperature × α × TTT (+ null
    control); writes {out}/guided/report.{json,md}, accuracy_by_alpha.png and tasks.jsonl."""
    from metattt.clbench import make_judge, save_tasks
    from metattt.eval.guided import load_guided_tasks, run_guided_matrix, write_guided_report

    cfg = r.guided
    L.seed_everything(r.run.seed, workers=True)
    judge = make_judge(cfg.judge, cfg.judge_base_url, cfg.judge_model, cfg.judge_api_key_env, cfg.judge_timeout_s)
    tasks = load_guided_tasks(cfg, r.run.seed)
    s = load_eval_stack(r.run.out_dir, r.target, r.drafter, r.lora, cfg.drafter_path, cfg.meta_lora_path, r.run.seed,
                        section="guided")
    ttt = cfg.ttt.apply(s.ttt)
    init_name = cfg.ttt_init if cfg.ttt_init in s.inits else "zero"
    if init_name != cfg.ttt_init:
        log.warning("no meta-learned LoRA at %s: guided-eval starts TTT from the zero init",
                    Path(cfg.meta_lora_path) if cfg.meta_lora_path else r.run.out_dir / "meta_lora")
    use_cuda = r.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    target, model = s.target.to(device), s.model.to(device)
    init = {n: t.to(device) for n, t in s.inits[init_name].items()}
    feature_head = s.feature_head.to(device) if s.feature_head is not None else None
    out_dir = r.run.out_dir / "guided"
    save_tasks(tasks, out_dir / "tasks.jsonl")
    log.info("guided-eval: %d tasks, %d questions, on %s", len(tasks), sum(len(t.questions) for t in tasks), device)
    records = run_guided_matrix(target, model, s.tokenizer, tasks, cfg, init, ttt, judge, r.run.seed, feature_head)
    meta = {"recipe": r.run.name, "drafter": str(s.drafter_path), "meta_lora": str(s.meta_path),
            "lora_init": init_name, "tasks": cfg.tasks or f"synthetic {list(cfg.synthetic_categories)} (seed {r.run.seed})",
            "num_tasks": len(tasks), "alpha_rule": cfg.alpha_rule if cfg.alpha_rule == "fixed"
            else f"kl (kl_tau={cfg.kl_tau:g})", "ttt_steps": ttt.steps, "ttt_lr": ttt.lr,
            "max_new_tokens": cfg.max_new_tokens, "top_p": cfg.top_p, "judge": getattr(judge, "name", cfg.judge),
            "device": str(device)}
    rows = write_guided_report(records, out_dir, meta)
    log.info("guided-eval report written to %s", out_dir / "report.md")
    return rows


# --- sweep -------------------------------------------------------------------------------------
def sweep(r: Recipe) -> list[dict]:
    """The TTT sweep (metattt.eval.sweep) over the recipe's drafter and meta-learned adapter; {out}/sweep/."""
    from metattt.eval.sweep import PLACEMENTS, Arm, plan_for, run_sweep, sweep_prompts
    from metattt.models.lora import add_lora, copy_lora

    cfg, eval_cfg = r.sweep, r.eval
    L.seed_everything(r.run.seed, workers=True)
    s = load_eval_stack(r.run.out_dir, r.target, r.drafter, r.lora, eval_cfg.drafter_path, eval_cfg.meta_lora_path,
                        r.run.seed)
    peft_cfg = s.model.peft_config["default"]
    rank, modules = int(peft_cfg.r), sorted(peft_cfg.target_modules)
    scale = float(peft_cfg.lora_alpha) / rank

    def name_of(r_: int, mods: list[str]) -> str:
        return f"r{r_} {next((n for n, m in PLACEMENTS.items() if sorted(m) == sorted(mods)), '+'.join(sorted(mods)))}"

    default_arm = name_of(rank, modules)
    arms = [Arm(default_arm, s.model, s.inits, plan_for(cfg, s.ttt, s.meta_path is not None, rank_arm=False))]
    available = {n.rsplit(".", 1)[-1] for n, _ in s.model.get_base_model().named_modules()}
    layouts = [(k, modules) for k in cfg.ranks if k != rank]
    for name in cfg.placements:
        if name not in PLACEMENTS:
            raise ValueError(f"sweep.placements: unknown {name!r}; choose from {list(PLACEMENTS)}")
        if sorted(PLACEMENTS[name]) == modules:
            continue
        if not set(PLACEMENTS[name]) <= available:
            log.warning("sweep: the drafter has no %s: placement %s left out", set(PLACEMENTS[name]) - available, name)
            continue
        layouts.append((rank, PLACEMENTS[name]))
    for k, mods in layouts:
        fresh = build_drafter(DrafterConfig(init_from=str(s.drafter_path)), s.target, s.tokenizer)
        m = add_lora(fresh, r=k, alpha=max(1, round(scale * k)), target_modules=mods, seed=r.run.seed)
        arms.append(Arm(name_of(k, mods), m, {"zero": copy_lora(m)}, plan_for(cfg, s.ttt, False, rank_arm=True)))
    prompts = sweep_prompts(eval_cfg, cfg, s.tokenizer, r.run.seed)
    ecfg = replace(eval_cfg, max_new_tokens=cfg.max_new_tokens, temperature=0.0, conditions=[])
    meta = {"recipe": r.run.name, "drafter": str(s.drafter_path), "meta_lora": str(s.meta_path),
            "default_arm": default_arm, "prompt_len": cfg.prompt_len or eval_cfg.prompt_len,
            "max_new_tokens": cfg.max_new_tokens, "prompts_per_split": cfg.num_prompts, "temperature": 0.0}
    log.info("TTT sweep: %d LoRA layouts, %d conditions, %d prompts", len(arms), sum(len(a.plan) for a in arms),
             len(prompts))
    return run_sweep(s.target, arms, prompts, ecfg, s.tokenizer.eos_token_id, r.run.seed, r.run.out_dir / "sweep", meta)


# --- export, build-target ----------------------------------------------------------------------
def export(r: Recipe) -> Path:
    """Serving folders (metattt.export.serving): the static drafter, or the meta-learned LoRA merged in."""
    from metattt.export.serving import run_export

    return run_export(r.run.out_dir, r.export)


def build_target(r: Recipe) -> Path:
    """Rebuild the embedded target (corpus, tokenizer, LM) into `target.path`."""
    from metattt.tiny import build_target as build

    return build(Path(r.target.path), r.corpus, r.tiny_target)


def bench(r: Recipe):
    """Cost ratios and τ (metattt.bench)."""
    from metattt.bench import bench as run_bench

    return run_bench(r)


@dataclass(frozen=True)
class Stage:
    run: Callable[[Recipe], Any]
    help: str
    uses_corpus: bool = True  # the stage reads the embedded corpus (built first when corpus.build)


STAGES: dict[str, Stage] = {
    "prepare": Stage(prepare, "Data -> target-regenerated, tokenized Arrow folders in {out}/data/ (+ the hidden-state cache)."),
    "distill": Stage(distill, "Distill a drafter from the frozen target; export it to {out}/drafter/."),
    "meta-train": Stage(meta_train, "Meta-train the drafter's LoRA initialization; export a peft adapter to {out}/meta_lora/."),
    "eval": Stage(evaluate, "Prefill TTT + speculative decoding: τ for static / TTT-zero / TTT-meta; {out}/eval/report.md."),
    "sweep": Stage(sweep, "TTT sweep: TTT steps x inner lr x LoRA rank x LoRA placement, Δτ vs static; {out}/sweep/sweep.md."),
    "guided-eval": Stage(guided_eval, "Draft-guided decoding on context-learning tasks (α × TTT × temperature, null "
                                      "control); {out}/guided/report.md."),
    "export": Stage(export, "Serving folders for vLLM / SGLang / DFlash: {out}/serve/static, or with --merge-lora "
                            "the meta-learned LoRA merged in ({out}/serve/meta_static).", uses_corpus=False),
    "bench": Stage(bench, "Cost ratios measured side by side (meta step ÷ distill step, TTT ÷ prefill, drafting) and τ "
                          "of the recipe -> bench/results.json.", uses_corpus=True),
    "build-target": Stage(build_target, "Rebuild the embedded target (corpus, tokenizer, small Qwen3 LM) into "
                                        "target.path (data/tiny_target).", uses_corpus=False),
}
