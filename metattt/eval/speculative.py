"""The speculative-decoding evaluation as plain functions: prompts, conditions (static / TTT-zero /
TTT-meta), τ, paired differences, report.

For every prompt the target prefills, the drafter's LoRA is (optionally) adapted on the
prompt's target features, then speculative decoding runs with target verification. Each
condition starts again from its own initialization, so nothing leaks between prompts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from metattt.atomic import atomic_write_json, atomic_write_text
from metattt.config import EVAL_CONDITIONS, EvalConfig, TTTConfig, TTTOverrides
from metattt.models.lora import set_lora
from metattt.spec.decode import speculative_generate, target_generate
from metattt.spec.metrics import summarize_tau
from metattt.stats import (
    PairedDifference,
    distinct_n,
    fmt,
    fmt_difference,
    mean_and_stderr,
    paired_difference,
)
from metattt.ttt.inner import ParamDict
from metattt.ttt.online import OnlineTTT
from metattt.ttt.tasks import prefill_ttt

log = logging.getLogger("metattt")

CONDITIONS = EVAL_CONDITIONS
CONDITION_HELP = {
    "target": "target-only decoding (the speed baseline)",
    "static": "drafter without LoRA",
    "meta_static": "drafter with the meta-learned LoRA init, no TTT",
    "ttt_zero": "TTT on the prompt from peft's zero init (B = 0)",
    "ttt_meta": "TTT on the prompt from the meta-learned init",
    "online_zero": "TTT on the prompt from peft's zero init, then online TTT on committed tokens while decoding",
    "online_meta": "TTT on the prompt from the meta-learned init, then online TTT while decoding",
}


# --- prompts --------------------------------------------------------------------------------
def load_prompts(files: str | list[str], tokenizer, prompt_len: int, num_prompts: int, seed: int) -> list[list[int]]:
    """`num_prompts` windows of `prompt_len` tokens from records long enough to hold one."""
    from metattt.data.text import load_records, tokenize_dataset

    ds = load_records(files)
    ds = tokenize_dataset(ds, tokenizer, max_length=1 << 30, pack=False)
    long_enough = [i for i, n in enumerate(ds["input_ids"]) if len(n) > prompt_len]
    if not long_enough:
        raise ValueError(f"no record in {files} is longer than eval.prompt_len={prompt_len} tokens")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(long_enough), generator=g).tolist()
    prompts, taken = [], {}
    for j in order[:num_prompts]:
        ids = ds[long_enough[j]]["input_ids"]
        start = int(torch.randint(0, len(ids) - prompt_len, (1,), generator=g))
        prompts.append(ids[start : start + prompt_len])
        taken[j] = start
    if len(prompts) < num_prompts:
        # fewer long records than prompts: more windows from records that hold several, none
        # overlapping the window already taken from it (prompts of one file are then not independent)
        extra = []
        for j, start in taken.items():
            ids = ds[long_enough[j]]["input_ids"]
            for k in range(len(ids) // prompt_len):
                lo = k * prompt_len
                if lo + prompt_len <= start or lo >= start + prompt_len:
                    extra.append(ids[lo : lo + prompt_len])
        picks = torch.randperm(len(extra), generator=g).tolist()[: num_prompts - len(prompts)]
        prompts += [extra[i] for i in picks]
        if picks:
            log.info("%s: %d records hold a prompt of %d tokens; %d more prompts from other windows of them",
                     files, len(taken), prompt_len, len(picks))
    if len(prompts) < num_prompts:
        log.warning("only %d prompts of %d tokens in %s (asked for %d)", len(prompts), prompt_len, files, num_prompts)
    return prompts


# --- one prompt, every condition --------------------------------------------------------------
def condition_plan(cfg: EvalConfig, base_ttt: TTTConfig) -> list[tuple[str, TTTConfig | None]]:
    """(condition label, TTT settings or None) for every condition and grid point."""
    ttt = cfg.ttt.apply(base_ttt)
    plan: list[tuple[str, TTTConfig | None]] = []
    for cond in cfg.conditions:
        if cond not in CONDITIONS:
            raise ValueError(f"unknown eval condition {cond!r}; choose from {CONDITIONS}")
        if not cond.startswith(("ttt_", "online_")):
            plan.append((cond, None))
            continue
        plan.append((cond, ttt))
        for k in cfg.grid_steps or []:
            plan.append((f"{cond}@steps={k}", TTTOverrides(steps=k).apply(ttt)))
        for lr in cfg.grid_lrs or []:
            plan.append((f"{cond}@lr={lr:g}", TTTOverrides(lr=lr).apply(ttt)))
    return plan


def rotated(plan: list, offset: int) -> list:
    """`plan` rotated by `offset`: prompt i runs the conditions in a different order than prompt
    i + 1, so no condition is always the one that runs first (cold caches) or last."""
    if not plan:
        return plan
    k = offset % len(plan)
    return plan[k:] + plan[:k]


def evaluate_prompt(
    target,
    model,  # peft-wrapped drafter
    prompt: list[int],
    plan: list[tuple[str, TTTConfig | None]],
    inits: dict[str, ParamDict],  # "zero" / "meta" -> LoRA tensors
    cfg: EvalConfig,
    eos_token_id,
    seed: int,
    feature_head=None,
    order_offset: int = 0,
    max_new_tokens: int | None = None,
) -> list[dict]:
    """Run every condition on one prompt (in the plan's order rotated by `order_offset`); returns
    one record per condition, in plan order."""
    device = next(target.parameters()).device
    ids = torch.tensor([prompt], device=device)
    gen = dict(max_new_tokens=max_new_tokens or cfg.max_new_tokens, eos_token_id=eos_token_id,
               temperature=cfg.temperature, top_p=cfg.top_p)
    records: dict[str, dict] = {}
    for label, ttt in rotated(plan, order_offset):
        cond = label.split("@")[0]
        g = torch.Generator(device=device).manual_seed(seed)  # same draws for every condition
        if cond == "target":
            res = target_generate(target, ids, generator=g, **gen)
            records[label] = dict(condition=label, tokens=res.tokens, wall_time=res.wall_time,
                                  prefill_time=res.prefill_time, accepted=[], ttt_time=0.0)
            continue
        ttt_losses: list[float] = []
        if cond == "static":
            with model.disable_adapter():
                res = speculative_generate(target, model, ids, rule=cfg.rule, generator=g, **gen)
        else:
            init = inits["meta" if cond.endswith("_meta") or cond == "meta_static" else "zero"]
            adapt = online = None
            if ttt is None:
                set_lora(model, init)
            else:  # the hook adapts from `init` and writes the result before the drafter runs
                adapt = prefill_ttt(model, init, ids, ttt, seed, feature_head, ttt_losses)
            if cond.startswith("online_"):  # continues from what prefill TTT wrote
                online = OnlineTTT(model, None, ttt, cfg.online, ids.shape[1], seed, feature_head)
            res = speculative_generate(target, model, ids, rule=cfg.rule, generator=g, on_prefill=adapt,
                                       online=online, **gen)
        records[label] = dict(
            condition=label, tokens=res.tokens, wall_time=res.wall_time, prefill_time=res.prefill_time,
            accepted=res.accepted, position_accepted=res.position_accepted,
            position_reached=res.position_reached, ttt_time=res.adapt_time, ttt_losses=ttt_losses,
            step_starts=res.step_starts, online_time=res.online_time,
        )
    out = [records[label] for label, _ in plan]
    reference = records.get("target", {}).get("tokens")
    for r in out:
        if r["condition"] != "target":
            r["lossless"] = (r["tokens"] == reference) if (reference is not None and cfg.temperature == 0) else None
    return out


# --- summary & report -------------------------------------------------------------------------
#: Paired comparisons every report leads with: (condition, baseline), each per prompt.
COMPARISONS: tuple[tuple[str, str], ...] = (("ttt_meta", "static"), ("ttt_meta", "ttt_zero"),
                                             ("meta_static", "static"), ("ttt_zero", "static"),
                                             ("online_meta", "static"), ("online_meta", "ttt_meta"),
                                             ("online_meta", "online_zero"), ("online_zero", "static"))

#: Above this, a measured speedup per unit of τ is flagged: a drafter cannot make decoding faster
#: than the tokens it gets accepted (a timing artefact such as a warm-up paid by the baseline).
SPEEDUP_OVER_TAU_LIMIT = 1.0


def prompt_tau(accepted: list[int]) -> float:
    """τ of one generation: mean over its verification steps of accepted drafts + 1."""
    return sum(a + 1 for a in accepted) / len(accepted) if accepted else float("nan")


def paired_taus(rows: list[dict], condition: str, baseline: str, seed: int = 0) -> dict | None:
    """Δτ(condition − baseline) over the prompts both ran, with its paired 95 % CI."""
    a = {r["prompt"]: prompt_tau(r["accepted"]) for r in rows if r["condition"] == condition}
    b = {r["prompt"]: prompt_tau(r["accepted"]) for r in rows if r["condition"] == baseline}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return paired_difference([a[p] for p in common], [b[p] for p in common], seed=seed).as_dict()


def comparisons_for(conditions: list[str]) -> list[tuple[str, str]]:
    """The standard comparisons the run has, plus every grid point against static and its base."""
    have = set(conditions)
    pairs = [(c, b) for c, b in COMPARISONS if c in have and b in have]
    for c in conditions:
        if "@" in c:
            base = c.split("@")[0]
            pairs += [(c, b) for b in ("static", base) if b in have]
    return pairs


def paired_differences(records: list[dict]) -> dict[str, dict]:
    """Per split, the paired differences of τ: `{split: {"a - b": {mean, ci_low, ci_high, n, ...}}}`."""
    out: dict[str, dict] = {}
    for split in sorted({r["split"] for r in records}):
        rows = [r for r in records if r["split"] == split]
        conditions = list(dict.fromkeys(r["condition"] for r in rows))
        out[split] = {f"{a} - {b}": paired_taus(rows, a, b) for a, b in comparisons_for(conditions)}
    return out


def tau_by_position(rows: list[dict], bucket: int) -> list[dict]:
    """τ per bucket of generated positions: every verification step counted in the bucket of the
    position its drafts start at; per prompt, then the mean (± s.e.) over the prompts that reach it."""
    n_buckets = max((max(r["step_starts"]) // bucket + 1 for r in rows if r.get("step_starts")), default=0)
    out = []
    for b in range(n_buckets):
        per_prompt = []
        for r in rows:
            steps = [a + 1 for a, start in zip(r["accepted"], r.get("step_starts") or []) if start // bucket == b]
            if steps:
                per_prompt.append(sum(steps) / len(steps))
        tau, se = mean_and_stderr(per_prompt)
        out.append({"start": b * bucket, "end": (b + 1) * bucket, "tau": tau, "tau_stderr": se, "n": len(per_prompt)})
    return out


def summarize(records: list[dict], bucket: int = 64) -> dict:
    """records: flat list with `split`, `prompt`, `condition`, ... -> per split × condition stats
    (τ also per `bucket` generated positions)."""
    out: dict[str, dict] = {}
    for split in sorted({r["split"] for r in records}):
        rows = [r for r in records if r["split"] == split]
        base = {r["prompt"]: r for r in rows if r["condition"] == "target"}
        conditions = list(dict.fromkeys(r["condition"] for r in rows))
        split_out: dict[str, dict] = {}
        for cond in conditions:
            rs = [r for r in rows if r["condition"] == cond]
            n_tok = sum(len(r["tokens"]) for r in rs)
            wall = sum(r["wall_time"] for r in rs)
            s: dict = {"n": len(rs), "tokens_per_s": n_tok / wall if wall > 0 else float("nan")}
            if cond == "target":
                s["distinct_2"], _ = mean_and_stderr(distinct_n(r["tokens"], 2) for r in rs)
                s["distinct_4"], _ = mean_and_stderr(distinct_n(r["tokens"], 4) for r in rs)
            else:
                s.update(summarize_tau(r["accepted"] for r in rs))
                S1 = len(rs[0]["position_accepted"])
                acc = [sum(r["position_accepted"][k] for r in rs) for k in range(S1)]
                reach = [sum(r["position_reached"][k] for r in rs) for k in range(S1)]
                steps = sum(len(r["accepted"]) for r in rs)
                s["acceptance_by_position"] = [a / steps if steps else float("nan") for a in acc]
                s["conditional_acceptance_by_position"] = [a / m if m else float("nan") for a, m in zip(acc, reach)]
                paired = [(base[r["prompt"]]["wall_time"], r["wall_time"]) for r in rs if r["prompt"] in base]
                if paired:
                    s["speedup"] = sum(t for t, _ in paired) / sum(c for _, c in paired)
                    s["speedup_over_tau"] = s["speedup"] / s["tau"] if s["tau"] == s["tau"] else float("nan")
                    s["timing_suspect"] = bool(s["speedup_over_tau"] > SPEEDUP_OVER_TAU_LIMIT)
                ttt = [r["ttt_time"] / r["prefill_time"] for r in rs if r["ttt_time"] > 0 and r["prefill_time"] > 0]
                if ttt:
                    s["ttt_over_prefill"], _ = mean_and_stderr(ttt)
                if any(r.get("step_starts") for r in rs):
                    s["tau_by_position"] = tau_by_position(rs, bucket)
                online = [r["online_time"] / r["wall_time"] for r in rs if r.get("online_time") and r["wall_time"] > 0]
                if online:
                    s["online_share_of_wall_time"], _ = mean_and_stderr(online)
                checks = [r["lossless"] for r in rs if r.get("lossless") is not None]
                if checks:
                    s["lossless"] = all(checks)
            split_out[cond] = s
        out[split] = split_out
    return out


def markdown_report(splits: dict, diffs: dict, meta: dict) -> str:
    lines = ["# metattt evaluation", "",
             "## Paired differences of τ", "",
             "Per prompt, condition minus baseline on the same prompt; mean and 95 % CI "
             f"({PairedDifference.method}). **Bold**: the interval excludes 0.", ""]
    pairs = list(dict.fromkeys(k for d in diffs.values() for k in d))
    if pairs:
        lines += ["| split | n | " + " | ".join(f"Δτ {p}" for p in pairs) + " |",
                  "|---|---|" + "---|" * len(pairs)]
        for split, d in diffs.items():
            n = next((v["n"] for v in d.values() if v), 0)
            lines.append(f"| {split} | {n} | " + " | ".join(fmt_difference(d.get(p)) for p in pairs) + " |")
    lines += ["", "## Settings", ""]
    for k, v in meta.items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "## τ and speed per condition", "",
              "| split | condition | τ | ± s.e. | n | speedup | speedup/τ | TTT/prefill | tok/s | lossless |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    suspect = []
    for split, conds in splits.items():
        for cond, s in conds.items():
            ratio = fmt(s.get("speedup_over_tau"))
            if s.get("timing_suspect"):
                ratio += " ⚠"
                suspect.append(f"{split}/{cond}")
            lines.append(
                f"| {split} | {cond} | {fmt(s.get('tau'))} | {fmt(s.get('tau_stderr'))} | {s['n']} | "
                f"{fmt(s.get('speedup'))} | {ratio} | {fmt(s.get('ttt_over_prefill'))} | "
                f"{fmt(s.get('tokens_per_s'), '.1f')} | {'' if s.get('lossless') is None else s['lossless']} |")
    if suspect:
        lines += ["", f"⚠ speedup/τ above {SPEEDUP_OVER_TAU_LIMIT:g} ({', '.join(suspect)}): impossible for a "
                  "drafter, so these timings are not results (a timing artefact of this run)."]
    buckets = {(split, cond): s["tau_by_position"] for split, conds in splits.items() for cond, s in conds.items()
               if len(s.get("tau_by_position") or []) > 1}
    if buckets:
        width = max(len(b) for b in buckets.values())
        first = next(iter(buckets.values()))
        lines += ["", "## τ by generated position", "",
                  "| split | condition | " + " | ".join(f"{b['start']}–{b['end']}" for b in first[:width]) + " |",
                  "|---|---|" + "---|" * width]
        for (split, cond), bs in buckets.items():
            lines.append(f"| {split} | {cond} | " + " | ".join(fmt(b["tau"]) for b in bs) + " |" + " |" * (width - len(bs)))
    lines += ["", "Target quality beside τ (target-only continuations):", "",
              "| split | distinct-2 | distinct-4 |", "|---|---|---|"]
    for split, conds in splits.items():
        t = conds.get("target", {})
        lines.append(f"| {split} | {fmt(t.get('distinct_2'))} | {fmt(t.get('distinct_4'))} |")
    lines += ["", "τ = accepted drafts + 1 per verification step, mean over steps per prompt, then over prompts.",
              "Speedup = target-only wall time / condition wall time (TTT included) on the same prompts, same run; "
              "a warm-up generation of every condition runs before anything is timed, and each prompt runs the "
              "conditions in a rotated order."]
    return "\n".join(lines) + "\n"


def plot_report(summary: dict, diffs: dict, out_dir: Path, default_steps: int | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    splits = list(summary)
    conds = [c for c in dict.fromkeys(c for s in summary.values() for c in s) if c != "target"]
    if not conds:
        return paths
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(conds) * len(splits) / 2, 3.5))
    width = 0.8 / len(splits)
    for i, split in enumerate(splits):
        taus = [summary[split].get(c, {}).get("tau", float("nan")) for c in conds]
        errs = [summary[split].get(c, {}).get("tau_stderr", 0.0) for c in conds]
        errs = [0.0 if e != e else e for e in errs]
        ax.bar([j + i * width for j in range(len(conds))], taus, width, yerr=errs, capsize=3, label=split)
    ax.set_xticks([j + width * (len(splits) - 1) / 2 for j in range(len(conds))], conds, rotation=20)
    ax.set_ylabel("acceptance length τ")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "tau_by_condition.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 3.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for c in conds:
            rates = summary[split].get(c, {}).get("acceptance_by_position")
            if rates:
                ax.plot(range(1, len(rates) + 1), rates, marker="o", label=c)
        ax.set_title(split)
        ax.set_xlabel("block position k")
        ax.set_ylabel("P(draft k accepted)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "acceptance_by_position.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    curves = steps_curves(diffs, default_steps)
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
        for ax, (split, by_init) in zip(axes[0], curves.items()):
            for init, points in by_init.items():
                ks = [k for k, _ in points]
                ax.errorbar(ks, [d["mean"] for _, d in points], marker="o", capsize=3, label=init,
                            yerr=[[d["mean"] - d["ci_low"] for _, d in points], [d["ci_high"] - d["mean"] for _, d in points]])
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(split)
            ax.set_xlabel("TTT steps")
            ax.set_ylabel("Δτ vs static (95 % CI)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "delta_tau_by_steps.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def steps_curves(diffs: dict, default_steps: int | None) -> dict[str, dict[str, list[tuple[int, dict]]]]:
    """Δτ against static as a function of TTT steps: `{split: {"ttt_meta": [(k, diff), ...]}}`, from
    the `@steps=k` grid points and the default condition (at `default_steps`)."""
    out: dict[str, dict[str, list]] = {}
    for split, d in diffs.items():
        for key, v in d.items():
            cond, _, base = key.partition(" - ")
            if base != "static" or v is None or not cond.startswith("ttt_") or "@lr=" in cond:
                continue
            init, _, grid = cond.partition("@steps=")
            k = int(grid) if grid else default_steps
            if k is not None:
                out.setdefault(split, {}).setdefault(init, []).append((k, v))
    out = {s: {i: sorted(p) for i, p in by.items() if len(p) > 1} for s, by in out.items()}
    return {s: by for s, by in out.items() if by}


def write_report(records: list[dict], out_dir: Path, meta: dict) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, meta.get("position_bucket", 64))
    diffs = paired_differences(records)
    atomic_write_json(out_dir / "report.json", {"meta": meta, "differences": diffs, "summary": summary,
                                                "records": [{k: v for k, v in r.items() if k != "tokens"} | {
                                                    "num_tokens": len(r["tokens"])} for r in records]})
    atomic_write_text(out_dir / "report.md", markdown_report(summary, diffs, meta))
    plot_report(summary, diffs, out_dir, meta.get("ttt_steps"))
    return summary


def load_summary(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text())["summary"]
