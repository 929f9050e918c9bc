"""The TTT sweep: how test-time training's settings move τ, on the same prompts, against static.

One factor at a time around the recipe's settings (a full grid is far beyond a CPU):

* TTT steps × inner lr, at the recipe's LoRA rank and placement, from peft's zero init and from
  the meta-learned init (which also runs with its learned, Meta-SGD lrs);
* LoRA rank, at the default steps and lr, from the zero init;
* LoRA placement (fc only; fc + k/v; fc + q/k/v; + MLP), at the default steps and lr, from the
  zero init, and from the meta init for the placement it was trained with.

Every point is measured as Δτ against `static` on the same prompts with a paired 95 % CI
(metattt.stats). Writes `sweep.json`, `sweep.md` and `sweep.png` into `{out}/sweep/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from metattt.atomic import atomic_write_json, atomic_write_text
from metattt.config import EvalConfig, SweepConfig, TTTConfig, TTTOverrides
from metattt.eval.speculative import evaluate_prompt, load_prompts, prompt_tau
from metattt.stats import fmt, fmt_difference, paired_difference

log = logging.getLogger("metattt")

#: LoRA placements of the block drafter, by name (the autoregressive drafter's modules differ:
#: placements whose modules it lacks are left out with a message).
PLACEMENTS: dict[str, list[str]] = {
    "fc": ["fc"],
    "fc+kv": ["fc", "k_proj", "v_proj"],
    "fc+qkv": ["fc", "q_proj", "k_proj", "v_proj"],
    "fc+qkv+mlp": ["fc", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class Arm:
    """One LoRA layout under test: the peft-wrapped drafter and its inits."""

    name: str
    model: torch.nn.Module
    inits: dict[str, dict[str, torch.Tensor]]
    plan: list[tuple[str, TTTConfig | None]]


def lr_label(lr: float | None) -> str:
    return "learned" if lr is None else f"{lr:g}"


def point(steps: int, lr: float | None, base: TTTConfig) -> TTTConfig:
    """`base` at `steps` and a scalar `lr` (None: keep its learned lrs)."""
    return TTTOverrides(steps=steps, lr=lr).apply(base)


def plan_for(cfg: SweepConfig, base: TTTConfig, has_meta: bool, rank_arm: bool) -> list[tuple[str, TTTConfig | None]]:
    """The conditions of the recipe's own LoRA layout (steps × lr, both inits) or of another layout
    (`rank_arm`: default steps and lr from the zero init, and meta when the layout has one)."""
    if rank_arm:
        plan = [(f"ttt_zero@steps={cfg.default_steps},lr={cfg.default_lr:g}", point(cfg.default_steps, cfg.default_lr,
                                                                                     base))]
        if has_meta:
            plan.append((f"ttt_meta@steps={cfg.default_steps},lr=learned", point(cfg.default_steps, None, base)))
        return plan
    plan: list[tuple[str, TTTConfig | None]] = [("static", None)]
    if has_meta:
        plan.append(("meta_static", None))
    for k in cfg.steps:
        for lr in cfg.lrs:
            plan.append((f"ttt_zero@steps={k},lr={lr:g}", point(k, lr, base)))
        if has_meta:
            for lr in [*cfg.lrs, None]:
                plan.append((f"ttt_meta@steps={k},lr={lr_label(lr)}", point(k, lr, base)))
    return plan


def run_sweep(target, arms: list[Arm], prompts: list[dict], eval_cfg: EvalConfig, eos_token_id, seed: int,
              out_dir: Path, meta: dict) -> list[dict]:
    """Run every arm's plan on every prompt; write the report; return one row per (arm, condition, split)."""
    records: list[dict] = []
    total = len(prompts) * len(arms)
    done = 0
    for arm in arms:
        for p in prompts:
            recs = evaluate_prompt(target, arm.model, p["prompt"], arm.plan, arm.inits, eval_cfg, eos_token_id,
                                   seed=seed * 1_000_003 + p["uid"], order_offset=p["uid"])
            for r in recs:
                records.append({"arm": arm.name, "split": p["split"], "prompt": p["uid"], "condition": r["condition"],
                                "tau": prompt_tau(r["accepted"]), "ttt_time": r["ttt_time"],
                                "lossless": r.get("lossless")})
            done += 1
            if done % max(1, total // 20) == 0:
                log.info("sweep %d/%d prompt-arms", done, total)
    rows = sweep_rows(records)
    write_sweep_report(rows, out_dir, meta)
    return rows


def sweep_rows(records: list[dict]) -> list[dict]:
    """Per split and (arm, condition): τ and Δτ against the split's static on the same prompts."""
    rows = []
    for split in dict.fromkeys(r["split"] for r in records):
        static = {r["prompt"]: r["tau"] for r in records if r["split"] == split and r["condition"] == "static"}
        keys = dict.fromkeys((r["arm"], r["condition"]) for r in records if r["split"] == split)
        for arm, cond in keys:
            rs = [r for r in records if r["split"] == split and r["arm"] == arm and r["condition"] == cond]
            common = [r for r in rs if r["prompt"] in static]
            diff = paired_difference([r["tau"] for r in common], [static[r["prompt"]] for r in common]).as_dict()
            name, _, grid = cond.partition("@")
            settings = dict(kv.split("=") for kv in grid.split(",")) if grid else {}
            rows.append({"split": split, "arm": arm, "condition": cond, "init": name.removeprefix("ttt_"),
                         "steps": int(settings["steps"]) if "steps" in settings else 0, "lr": settings.get("lr"),
                         "tau": sum(r["tau"] for r in rs) / len(rs), "n": len(rs), "delta_vs_static": diff,
                         "ttt_time": sum(r["ttt_time"] for r in rs) / len(rs),
                         "lossless": all(r["lossless"] for r in rs if r["lossless"] is not None)})
    return rows


def write_sweep_report(rows: list[dict], out_dir: Path, meta: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "sweep.json", {"meta": meta, "rows": rows})
    lines = ["# TTT sweep", "", *(f"- **{k}**: {v}" for k, v in meta.items()), "",
             "Δτ = τ(condition) − τ(static) per prompt, mean [95 % paired-bootstrap CI]; **bold**: excludes 0.", "",
             "| split | LoRA | condition | τ | Δτ vs static | TTT ms | n |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['arm']} | {r['condition']} | {fmt(r['tau'])} | "
                     f"{fmt_difference(r['delta_vs_static'])} | {fmt(r['ttt_time'] * 1e3, '.0f')} | {r['n']} |")
    atomic_write_text(out_dir / "sweep.md", "\n".join(lines) + "\n")
    plot_sweep(rows, out_dir / "sweep.png", meta.get("default_arm"))


def plot_sweep(rows: list[dict], path: Path, default_arm: str | None) -> None:
    """Δτ vs static against TTT steps, one line per (init, lr), one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(r["split"] for r in rows))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        lines: dict[str, list[tuple[int, dict]]] = {}
        for r in rows:
            if r["split"] == split and r["arm"] == default_arm and r["steps"]:
                lines.setdefault(f"{r['init']} lr={r['lr']}", []).append((r["steps"], r["delta_vs_static"]))
        for label, pts in lines.items():
            pts.sort(key=lambda x: x[0])
            ax.errorbar([k for k, _ in pts], [d["mean"] for _, d in pts], marker="o", capsize=2, label=label,
                        yerr=[[d["mean"] - d["ci_low"] for _, d in pts], [d["ci_high"] - d["mean"] for _, d in pts]],
                        ls="-" if label.startswith("meta") else "--")
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(split)
        ax.set_xlabel("TTT steps")
        ax.set_ylabel("Δτ vs static (95 % CI)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_prompts(eval_cfg: EvalConfig, cfg: SweepConfig, tokenizer, seed: int) -> list[dict]:
    prompts = []
    for split in cfg.splits:
        if split not in eval_cfg.splits:
            raise ValueError(f"sweep.splits names {split!r}, which eval.splits does not have ({list(eval_cfg.splits)})")
        for ids in load_prompts(eval_cfg.splits[split], tokenizer, cfg.prompt_len or eval_cfg.prompt_len,
                                cfg.num_prompts, seed):
            prompts.append({"split": split, "uid": len(prompts), "prompt": ids})
    return prompts
