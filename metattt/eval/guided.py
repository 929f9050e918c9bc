"""The guided-decoding experiment: context-learning tasks × temperature × α × TTT (+ the null
control), judged, summarized and reported. The decoding itself is metattt.spec.guided."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metattt.atomic import atomic_write_json, atomic_write_text
from metattt.config import GuidedConfig
from metattt.models.lora import set_lora
from metattt.spec.guided import GuidedResult, adapt_on, guided_generate, refine_generate
from metattt.stats import fmt, mean_and_stderr

log = logging.getLogger("metattt")


def load_guided_tasks(cfg: GuidedConfig, seed: int):
    from metattt.clbench import check_clbench_licence, load_tasks, make_synthetic_tasks

    if cfg.tasks:
        tasks = load_tasks(cfg.tasks)
        check_clbench_licence(tasks, any(cfg.ttt_modes) or cfg.refine_rounds > 0,
                              cfg.allow_ttt_on_clbench_rows_despite_licence,
                              "TTT (guided.ttt_modes with true, or guided.refine_rounds > 0)",
                              "guided.allow_ttt_on_clbench_rows_despite_licence")
    else:
        tasks = make_synthetic_tasks(cfg.synthetic_categories, cfg.synthetic_tasks, cfg.synthetic_questions, seed)
    if cfg.max_tasks is not None:
        per: dict[str, int] = {}
        kept = []
        for t in tasks:
            per[t.category] = per.get(t.category, 0) + 1
            if per[t.category] <= cfg.max_tasks:
                kept.append(t)
        tasks = kept
    if not tasks:
        raise ValueError("no context-learning tasks to evaluate")
    return tasks


def condition_list(cfg: GuidedConfig) -> list[tuple[str, bool, float]]:
    """(control, ttt, α) of every condition; α = 0 runs once (the target alone: TTT is moot)."""
    out: list[tuple[str, bool, float]] = [("guided", False, 0.0)]
    alphas = [a for a in dict.fromkeys(float(a) for a in cfg.alphas) if a != 0.0]
    for ttt in dict.fromkeys(bool(t) for t in cfg.ttt_modes):
        for a in alphas:
            out.append(("guided", ttt, a))
            if cfg.null_control:
                out.append(("noise", ttt, a))
    if cfg.refine_rounds > 0:
        out += [("refine", True, a) for a in alphas]
    return out


def condition_label(control: str, ttt: bool, alpha: float) -> str:
    if alpha == 0.0:
        return "target"
    return f"{control}|ttt={'on' if ttt else 'off'}|a={alpha:g}"


def _line_complete(tokenizer) -> Callable[[list[int]], bool]:
    def stop(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        return bool(text) and "\n" in text

    return stop


def _first_line_only(judge, question) -> bool:
    rule = getattr(judge, "rule", judge)
    rule_for = getattr(rule, "rule_for", None)
    check = rule_for(question) if rule_for is not None else None
    return check is not None and check.get("extract", "first_line") == "first_line"


def encode_prompt(tokenizer, text: str, chat: bool, max_tokens: int) -> tuple[list[int], bool]:
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    return (ids[-max_tokens:], True) if len(ids) > max_tokens else (ids, False)


def answer_ids(tokenizer, answer: str, chat: bool) -> list[int]:
    """The reference answer as the model would continue the prompt: after a space (qa/code prompts end
    with "Answer:" / "=="), or as the assistant turn's first tokens (chat)."""
    return tokenizer(("" if chat else " ") + answer.strip(), add_special_tokens=False)["input_ids"]


def answer_logprobs(target, model, ids: torch.Tensor, answer: list[int], conditions, adapted, init, cfg,
                    seed: int) -> dict[str, float]:
    """Condition label -> mean log p_guided of the answer tokens (teacher forced; refine is skipped)."""
    out = {}
    for control, ttt_on, alpha in conditions:
        if control == "refine" or not answer:
            continue
        set_lora(model, adapted if ttt_on else init)
        r = guided_generate(target, model, ids, len(answer), None, alpha=alpha, alpha_rule=cfg.alpha_rule,
                            kl_tau=cfg.kl_tau, control=control, noise_generator=torch.Generator().manual_seed(seed),
                            force=answer)
        out[condition_label(control, ttt_on, alpha)] = sum(r.logprobs) / len(r.logprobs)
    return out


def run_guided_matrix(target, model, tokenizer, tasks, cfg: GuidedConfig, init: dict[str, torch.Tensor],
                      ttt, judge, seed: int = 0, feature_head=None) -> list[dict]:
    """Every task × question × temperature × sample × condition -> one record each."""
    from metattt.clbench import render_prompt

    device = next(target.parameters()).device
    eos = tokenizer.eos_token_id
    conditions = condition_list(cfg)
    need_ttt = any(t for _, t, a in conditions if a != 0.0)
    stop_fn = _line_complete(tokenizer)
    records: list[dict] = []
    truncated = 0
    t_start = time.perf_counter()
    n_q = sum(len(t.questions) for t in tasks)
    done_q = 0
    for ti, task in enumerate(tasks):
        for qi, question in enumerate(task.questions):
            text = render_prompt(task, question, tokenizer)
            ids_list, cut = encode_prompt(tokenizer, text, task.prompt_style == "chat" and bool(
                getattr(tokenizer, "chat_template", None)), cfg.max_prompt_tokens)
            truncated += cut
            ids = torch.tensor([ids_list], device=device)
            q_seed = seed * 1_000_003 + ti * 1_009 + qi
            adapted, ttt_losses, ttt_time = None, [], 0.0
            if need_ttt:
                with torch.no_grad():
                    features = target(ids, return_logits=False).features
                adapted, ttt_losses, ttt_time = adapt_on(model, init, ids, features, ttt, q_seed, feature_head)
            stop = stop_fn if cfg.stop_at_line and _first_line_only(judge, question) else None
            chat = task.prompt_style == "chat" and bool(getattr(tokenizer, "chat_template", None))
            answer_lp = answer_logprobs(target, model, ids, answer_ids(tokenizer, question.answer, chat), conditions,
                                        adapted, init, cfg, q_seed) if cfg.answer_logprob and question.answer else {}
            for temp in dict.fromkeys(float(t) for t in cfg.temperatures):
                for sample in range(cfg.samples if temp > 0 else 1):
                    s_seed = q_seed * 31 + sample
                    ttt_on_result: dict[float, GuidedResult] = {}
                    for control, ttt_on, alpha in conditions:
                        gen = dict(max_new_tokens=cfg.max_new_tokens, alpha=alpha, alpha_rule=cfg.alpha_rule,
                                   kl_tau=cfg.kl_tau, temperature=temp, top_p=cfg.top_p, stop=stop)
                        set_lora(model, adapted if ttt_on else init)
                        round_scores = None
                        if control == "refine":
                            rounds = refine_generate(target, model, ids, cfg.refine_rounds, ttt, init, seed=s_seed,
                                                     first=ttt_on_result.get(alpha), feature_head=feature_head,
                                                     eos_token_id=eos, control="guided", **gen)
                            round_scores = [judge(task, question, tokenizer.decode(r.tokens, skip_special_tokens=True))
                                            .score for r in rounds[:-1]]
                            res = rounds[-1]
                            res.ttt_time = ttt_time + sum(r.ttt_time for r in rounds[1:])
                        else:
                            res = guided_generate(
                                target, model, ids, eos_token_id=eos, control=control,
                                generator=torch.Generator().manual_seed(s_seed),
                                noise_generator=torch.Generator().manual_seed(s_seed + 1), **gen)
                            if ttt_on:
                                res.ttt_time, res.ttt_losses = ttt_time, ttt_losses
                                if control == "guided":
                                    ttt_on_result[alpha] = res
                        response = tokenizer.decode(res.tokens, skip_special_tokens=True)
                        verdict = judge(task, question, response)
                        if round_scores is not None:
                            round_scores.append(verdict.score)
                        records.append(dict(
                            task=task.id, category=task.category, question=qi, temperature=temp, sample=sample,
                            control="guided" if alpha == 0.0 else control, ttt=bool(ttt_on), alpha=alpha,
                            condition=condition_label(control, ttt_on, alpha), score=verdict.score,
                            judge=verdict.judge, response=response[:400], reference=question.answer,
                            num_tokens=len(res.tokens), stop_reason=res.stop_reason, mean_kl=res.mean_kl,
                            mean_alpha=res.mean_alpha, agree_rate=_rate(res.agree), changed_rate=_rate(res.changed),
                            wall_time=res.wall_time, ttt_time=res.ttt_time, round_scores=round_scores,
                            prompt_tokens=len(ids_list), truncated=cut,
                            answer_logprob=answer_lp.get(condition_label(control, ttt_on, alpha)),
                        ))
            done_q += 1
            log.info("guided-eval: %d/%d questions (%.0f s)", done_q, n_q, time.perf_counter() - t_start)
    set_lora(model, init)
    if truncated:
        log.warning("guided-eval: %d prompts longer than guided.max_prompt_tokens=%d kept their last tokens",
                    truncated, cfg.max_prompt_tokens)
    return records


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


# --- summary & report ---------------------------------------------------------------------------
def summarize_guided(records: list[dict]) -> list[dict]:
    """One row per category (and "all") × temperature × condition: accuracy ± s.e., the answer's
    log-probability, and steering statistics; Δ columns are against the target (α = 0)."""
    rows = []
    cats = sorted({r["category"] for r in records})
    for cat in [*cats, "all"]:
        rs_cat = [r for r in records if cat == "all" or r["category"] == cat]
        for temp in sorted({r["temperature"] for r in rs_cat}):
            rs_t = [r for r in rs_cat if r["temperature"] == temp]
            base = [r for r in rs_t if r["condition"] == "target"]
            base_acc = mean_and_stderr([r["score"] for r in base])[0]
            base_lp = mean_and_stderr([r.get("answer_logprob") for r in base])[0]
            for cond in dict.fromkeys(r["condition"] for r in rs_t):
                rs = [r for r in rs_t if r["condition"] == cond]
                graded = [r["score"] for r in rs if r["score"] is not None]
                acc, se = mean_and_stderr(graded)
                lp, lp_se = mean_and_stderr([r.get("answer_logprob") for r in rs])
                rows.append(dict(
                    category=cat, temperature=temp, condition=cond, control=rs[0]["control"], ttt=rs[0]["ttt"],
                    alpha=rs[0]["alpha"], accuracy=acc, stderr=se, n=len(graded), ungraded=len(rs) - len(graded),
                    delta_vs_target=acc - base_acc, answer_logprob=lp, answer_logprob_stderr=lp_se,
                    delta_logprob_vs_target=lp - base_lp,
                    mean_kl=mean_and_stderr([r["mean_kl"] for r in rs])[0],
                    mean_alpha=mean_and_stderr([r["mean_alpha"] for r in rs])[0],
                    changed_rate=mean_and_stderr([r["changed_rate"] for r in rs])[0],
                    agree_rate=mean_and_stderr([r["agree_rate"] for r in rs])[0],
                    mean_tokens=mean_and_stderr([r["num_tokens"] for r in rs])[0],
                ))
    return rows


def _cell(row: dict | None, key: str = "accuracy", se_key: str = "stderr") -> str:
    if row is None:
        return ""
    value, se = row[key], row[se_key]
    return fmt(value) + ("" if se is None or math.isnan(se) else f" ± {se:.2f}")


_COLUMNS = [("guided", False, "guided, TTT off"), ("guided", True, "guided, TTT on"),
            ("noise", False, "null, TTT off"), ("noise", True, "null, TTT on"), ("refine", True, "refine (TTT on)")]


def _pivot(rows: list[dict], key: str, se_key: str) -> list[str]:
    present = [c for c in _COLUMNS if any(r["control"] == c[0] and r["ttt"] == c[1] and r["alpha"] > 0 for r in rows)]
    lines = []
    for temp in sorted({r["temperature"] for r in rows}):
        rs_t = [r for r in rows if r["temperature"] == temp]
        if all(math.isnan(r[key]) for r in rs_t):
            continue
        lines += [f"### temperature {temp:g}", "", "| category | α | " + " | ".join(c[2] for c in present) + " |",
                  "|---|---|" + "---|" * len(present)]
        for cat in dict.fromkeys(r["category"] for r in rs_t):
            rs = [r for r in rs_t if r["category"] == cat]
            base = next((r for r in rs if r["condition"] == "target"), None)
            for alpha in sorted({r["alpha"] for r in rs}):
                cells = []
                for control, ttt, _ in present:
                    if alpha == 0.0:
                        cells.append(_cell(base, key, se_key) if control == "guided" else "")
                        continue
                    cells.append(_cell(next((r for r in rs if r["control"] == control and r["ttt"] == ttt
                                             and r["alpha"] == alpha), None), key, se_key))
                lines.append(f"| {cat} | {alpha:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown_guided(rows: list[dict], meta: dict) -> str:
    lines = ["# metattt draft-guided decoding: context-learning evaluation", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "α = 0 is the target alone. `null` steers with matched-scale noise instead of the drafter's",
              "direction (same α_t). `refine`: TTT on prompt + response, then generate again.", "",
              "## Accuracy", "", "Fraction of questions the judge passes ± standard error.", ""]
    lines += _pivot(rows, "accuracy", "stderr")
    if any(not math.isnan(r["answer_logprob"]) for r in rows):
        lines += ["## Log-probability of the reference answer", "",
                  "Teacher-forced, mean log p per answer token under the guided distribution (temperature 1), "
                  "± s.e.; higher is better. The same for every temperature (shown once).", ""]
        first_t = min(r["temperature"] for r in rows)
        lines += _pivot([r for r in rows if r["temperature"] == first_t and r["control"] != "refine"],
                        "answer_logprob", "answer_logprob_stderr")
    lines += ["## Every condition", "",
              "| category | T | condition | accuracy | ± s.e. | Δ acc | answer log p | Δ log p | n "
              "| KL(draft‖target) | mean α_t | flips | draft=target |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']} | {r['temperature']:g} | {r['condition']} | {fmt(r['accuracy'])} | "
                     f"{fmt(r['stderr'])} | {fmt(r['delta_vs_target'], '+.2f')} | {fmt(r['answer_logprob'])} | "
                     f"{fmt(r['delta_logprob_vs_target'], '+.2f')} | {r['n']} | {fmt(r['mean_kl'])} | "
                     f"{fmt(r['mean_alpha'], '.3f')} | {fmt(r['changed_rate'])} | {fmt(r['agree_rate'])} |")
    lines += ["", "Δ: against the target (α = 0) on the same questions. KL: mean per generated token. "
              "flips: fraction of steps where guidance changed the greedy choice (guided argmax ≠ target argmax). "
              "draft=target: fraction of steps where the drafter's argmax equals the target's."]
    return "\n".join(lines) + "\n"


def plot_guided(rows: list[dict], out_dir: Path, key: str = "accuracy", ylabel: str = "accuracy",
                filename: str = "accuracy_by_alpha.png") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not math.isnan(r[key])]
    if not rows:
        return None
    temps = sorted({r["temperature"] for r in rows})
    cats = list(dict.fromkeys(r["category"] for r in rows))
    fig, axes = plt.subplots(len(temps), len(cats), figsize=(3.2 * len(cats), 2.8 * len(temps)),
                             squeeze=False, sharey=True)
    styles = {("guided", False): ("C0", "-"), ("guided", True): ("C1", "-"), ("noise", False): ("C0", ":"),
              ("noise", True): ("C1", ":"), ("refine", True): ("C2", "--")}
    names = {(c, t): name for c, t, name in _COLUMNS}
    for i, temp in enumerate(temps):
        for j, cat in enumerate(cats):
            ax = axes[i][j]
            rs = [r for r in rows if r["temperature"] == temp and r["category"] == cat]
            base = next((r for r in rs if r["condition"] == "target"), None)
            for style_key, (color, ls) in styles.items():
                pts = sorted((r["alpha"], r[key]) for r in rs if (r["control"], r["ttt"]) == style_key and r["alpha"] > 0)
                if not pts:
                    continue
                if base is not None:
                    pts = [(0.0, base[key]), *pts]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle=ls, marker="o", ms=3,
                        label=names[style_key])
            ax.set_title(f"{cat}, T={temp:g}", fontsize=9)
            ax.set_xlabel("α")
            if key == "accuracy":
                ax.set_ylim(-0.05, 1.05)
            if j == 0:
                ax.set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_guided_report(records: list[dict], out_dir: Path, meta: dict) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize_guided(records)
    atomic_write_json(out_dir / "report.json", {"meta": meta, "summary": rows, "records": records})
    atomic_write_text(out_dir / "report.md", markdown_guided(rows, meta))
    plot_guided(rows, out_dir)
    first_t = min((r["temperature"] for r in rows), default=0.0)
    plot_guided([r for r in rows if r["temperature"] == first_t], out_dir, "answer_logprob",
                "answer log p / token", "answer_logprob_by_alpha.png")
    return rows
