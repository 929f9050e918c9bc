"""Rewrite README.md's "Results on the embedded world" section from the reports the tiny recipe wrote.

    python scripts/world_results.py            # after make run (and make sweep / guided-eval / the AR run)

Reads, when present: data/tiny_target/tiny_target_report.json, and the copies `make world-results`
(`--collect`) puts in bench/world/ (eval.json: the block drafter's `make run` eval; eval_ar.json: the same for the
autoregressive drafter; sweep.json; guided.json; online.json: the online-TTT eval of the tiny_online run;
run_time.json: the measured `make setup run`).
Every number in the section is read from those files; the goals table compares them with the
goals of the embedded-world issue mechanically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from readme_results import replace_section  # scripts/ is on sys.path when a script here runs

from metattt.stats import fmt, fmt_difference

BEGIN, END = "<!-- world:begin -->", "<!-- world:end -->"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _train_time(rep: dict) -> str:
    minutes = rep["train_time_s"] / 60
    timed_from = rep.get("timed_from_step", 0)
    if timed_from:  # resumed from a state that kept no time: only the steps after it were timed
        return f"steps {timed_from}-{rep['steps']} took {minutes:.0f} min on {rep['config'].get('threads', '?')} threads"
    return f"{minutes:.0f} min of training on {rep['config'].get('threads', '?')} threads"


def target_section(rep: dict) -> list[str]:
    c = rep["config"]
    lines = [f"**The target** (`data/tiny_target`, `{rep.get('command', 'make target')}`): a Qwen3-style LM, "
             f"{rep['params'] / 1e6:.2f}M parameters (width {c['hidden_size']}, {c['num_layers']} layers, "
             f"{c['vocab_size']}-token BPE), {rep['steps']} steps of {c['batch_size']} × {c['seq_len']} tokens = "
             f"{rep['tokens_seen'] / 1e6:.1f}M tokens seen ({rep['epochs']:.1f} epochs of "
             f"{rep['train_tokens'] / 1e6:.1f}M), seed {c['seed']}; {_train_time(rep)}.", "",
             "| held-out split | loss (nats/token) | bits/byte | greedy distinct-4 | sampled (T=1) distinct-4 | "
             "reference distinct-4 | EOS at document end |", "|---|---|---|---|---|---|---|"]
    for name, loss in rep["heldout_loss"].items():
        cont = rep["continuations"].get(name, {})
        lines.append(f"| {name} | {fmt(loss)} | {fmt(rep['heldout_bits_per_byte'][name])} | "
                     f"{fmt(cont.get('greedy_distinct_4'))} | {fmt(cont.get('sampled_distinct_4'))} | "
                     f"{fmt(cont.get('reference_distinct_4'))} | {fmt(rep['eos_at_end'].get(name))} |")
    return lines + [""]


def _differences_table(diffs: dict) -> list[str]:
    """One row per split, one column per paired difference (the per-bucket ones, `@`, left out)."""
    pairs = list(dict.fromkeys(k for d in diffs.values() for k in d if "@" not in k))
    lines = ["| split | n | " + " | ".join(f"Δτ {p}" for p in pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for split, d in diffs.items():
        n = next((v["n"] for v in d.values() if v), 0)
        lines.append(f"| {split} | {n} | " + " | ".join(fmt_difference(d.get(p)) for p in pairs) + " |")
    return lines


def _goal_row(rows: list[str], goal: str, value: str, met: bool | None) -> None:
    """Append one goal's row: the goal, what was measured, met / not met (— where nothing was)."""
    rows.append(f"| {goal} | {value} | {'—' if met is None else ('met' if met else 'not met')} |")


def eval_section(rep: dict, title: str) -> list[str]:
    m = rep["meta"]
    decoding = "greedy" if not m.get("temperature") else f"T = {m['temperature']:g} ({m.get('rule')})"
    lines = [f"**{title}**: {m.get('drafter_kind')} drafter, block {m.get('block_size')}, prompts of "
             f"{m.get('prompt_len')} tokens, {m.get('max_new_tokens')} new tokens, {decoding}, "
             f"TTT {m.get('ttt_steps')} steps. Δτ per prompt, mean [95 % paired-bootstrap CI]; **bold**: excludes 0.", ""]
    lines += _differences_table(rep["differences"])
    lines += ["", "| split | condition | τ | ± s.e. | speedup | lossless |", "|---|---|---|---|---|---|"]
    for split, conds in rep["summary"].items():
        for cond, s in conds.items():
            if cond == "target" or "@" in cond:
                continue
            flag = " ⚠" if s.get("timing_suspect") else ""
            lines.append(f"| {split} | {cond} | {fmt(s.get('tau'))} | {fmt(s.get('tau_stderr'))} | "
                         f"{fmt(s.get('speedup'))}{flag} | {s.get('lossless', '')} |")
    d4 = {split: conds.get("target", {}).get("distinct_4") for split, conds in rep["summary"].items()}
    lines += ["", "Target-only greedy continuations, distinct-4: " +
              ", ".join(f"{k} {fmt(v)}" for k, v in d4.items()) + ".", ""]
    return lines


def _get(rep: dict | None, *keys):
    for k in keys:
        if rep is None:
            return None
        rep = rep.get(k) if isinstance(rep, dict) else None
    return rep


def goals(block: dict | None, ar: dict | None, run_time: dict | None) -> list[str]:
    """The embedded-world issue's goals against the measured values."""
    rows: list[str] = []
    s = _get(block, "summary")
    d = _get(block, "differences")
    tau_in = _get(s, "in_domain", "static", "tau")
    _goal_row(rows, "in_domain static τ ≥ 3.0 (block drafter, block 8, greedy)", fmt(tau_in), None if tau_in is None else tau_in >= 3.0)
    tau_ar = _get(ar, "summary", "in_domain", "static", "tau")
    _goal_row(rows, "in_domain static τ ≥ 3.5 (autoregressive drafter)", fmt(tau_ar), None if tau_ar is None else tau_ar >= 3.5)
    tau_sh = _get(s, "drafter_shifted", "static", "tau")
    ratio = tau_sh / tau_in if tau_sh is not None and tau_in else None
    shift = "—" if ratio is None else f"{abs(1 - ratio) * 100:.0f} % {'below' if ratio <= 1 else 'above'}"
    _goal_row(rows, "drafter_shifted static τ ≥ 25 % below in_domain static", f"{fmt(tau_sh)} vs {fmt(tau_in)} ({shift})",
        None if ratio is None else ratio <= 0.75)
    g = _get(d, "drafter_shifted", "ttt_meta - static")
    _goal_row(rows, "drafter_shifted Δτ(ttt_meta − static) ≥ +0.5, CI lower bound > 0", fmt_difference(g),
        None if g is None else (g["mean"] >= 0.5 and g["ci_low"] > 0))
    g = _get(d, "drafter_shifted", "ttt_meta - ttt_zero")
    _goal_row(rows, "drafter_shifted Δτ(ttt_meta − ttt_zero), CI lower bound > 0", fmt_difference(g),
        None if g is None else g["ci_low"] > 0)
    g = _get(d, "in_domain", "ttt_meta - static")
    _goal_row(rows, "in_domain Δτ(ttt_meta − static) ≥ −0.05", fmt_difference(g), None if g is None else g["mean"] >= -0.05)
    sp = _get(s, "in_domain", "ttt_meta", "speedup")
    sp_static = _get(s, "in_domain", "static", "speedup")
    _goal_row(rows, "in_domain wall-clock speedup over target-only ≥ 1.2 (block drafter, TTT from the meta init)",
        f"{fmt(sp)} (static drafter {fmt(sp_static)})", None if sp is None else sp >= 1.2)
    minutes = _get(run_time, "minutes")
    how = _get(run_time, "how")  # how the time was measured, e.g. the stages of one run summed
    _goal_row(rows, "`make setup run` on a fresh clone ≤ 35 min (2 cores)",
        (fmt(minutes, ".1f") + " min" + (f" ({how})" if how else "")) if minutes else "—",
        None if minutes is None else minutes <= 35)
    return ["| goal | measured | |", "|---|---|---|", *rows, ""]


def online_goals(rep: dict | None) -> list[str]:
    """The online-TTT issue's τ goals against one online eval's report."""
    rows: list[str] = []
    s, d = _get(rep, "summary"), _get(rep, "differences")
    on, st = _get(s, "drafter_shifted", "online_meta", "tau"), _get(s, "drafter_shifted", "static", "tau")
    _goal_row(rows, "drafter_shifted τ(online_meta) ≥ 1.41 × τ(static)",
        f"{fmt(on)} vs {fmt(st)} (× {fmt(on / st) if on and st else '—'})", None if not (on and st) else on >= 1.41 * st)
    for other in ("ttt_meta", "online_zero"):
        g = _get(d, "drafter_shifted", f"online_meta - {other}")
        _goal_row(rows, f"drafter_shifted Δτ(online_meta − {other}), CI lower bound > 0", fmt_difference(g),
            None if g is None else g["ci_low"] > 0)
    rises = {}
    for cond in ("online_meta", "static"):
        buckets = _get(s, "drafter_shifted", cond, "tau_by_position") or []
        rises[cond] = ((buckets[0]["tau"], buckets[-1]["tau"], buckets[0].get("tau_stderr"), buckets[-1].get("tau_stderr"))
                       if len(buckets) > 1 else None)
    om, sb = rises["online_meta"], rises["static"]
    _goal_row(rows, "drafter_shifted τ(online_meta) in the last position bucket > the first; static's does not rise "
        "(read strictly: static's last ≤ its first)",
        f"online_meta {fmt(om and om[0])} → {fmt(om and om[1])}, static {fmt(sb and sb[0])} → {fmt(sb and sb[1])} "
        f"(± {fmt(sb and sb[2])} → ± {fmt(sb and sb[3])} s.e.)",
        None if not (om and sb) else (om[1] > om[0] and sb[1] <= sb[0]))
    g = _get(d, "in_domain", "online_meta - ttt_meta")
    _goal_row(rows, "in_domain Δτ(online_meta − ttt_meta) ≥ −0.05", fmt_difference(g), None if g is None else g["mean"] >= -0.05)
    share = _get(s, "drafter_shifted", "online_meta", "online_share_of_wall_time")
    _goal_row(rows, "online updates ≤ 15 % of decoding time (drafter_shifted, online_meta)",
              "—" if share is None else f"{100 * share:.0f} %", None if share is None else share <= 0.15)
    return ["| goal | measured | |", "|---|---|---|", *rows, ""]


def online_section(rep: dict, title: str) -> list[str]:
    m, o, mo = rep["meta"], rep["meta"].get("online", {}), rep["meta"].get("meta_online") or {}
    trained = (f"chunks of {mo['chunk']} tokens, up to {mo['max_chunks']} per task" if mo.get("chunk")
               else "not trained for online updates")
    detached = "; the context before that window read from the decoding cache as constants" \
        if o.get("detach_context") else ""
    lines = [f"**{title}**: {m.get('drafter_kind')} drafter, "
             f"prompts of {m.get('prompt_len')} tokens, {m.get('max_new_tokens')} new tokens, greedy; prefill TTT "
             f"{m.get('ttt_steps')} steps, then an update every {o.get('every')} verification steps "
             f"({o.get('steps')} step, {o.get('num_anchors')} blocks from the last {o.get('window')} committed tokens"
             f"{detached}); the meta init was meta-trained for online updates: {trained}.", "",
             "Goals (online-TTT issue):", ""]
    lines += online_goals(rep)
    lines += ["Δτ per prompt, mean [95 % paired-bootstrap CI]; **bold**: excludes 0.", ""]
    lines += _differences_table(rep["differences"])
    lines += ["", "| split | condition | τ | ± s.e. | tokens/s (1 thread per process) | online updates' share of the time |",
              "|---|---|---|---|---|---|"]
    for split, conds in rep["summary"].items():
        for cond, st in conds.items():
            lines.append(f"| {split} | {cond} | {fmt(st.get('tau'))} | {fmt(st.get('tau_stderr'))} | "
                         f"{fmt(st.get('tokens_per_s'), '.1f')} | {fmt(st.get('online_share_of_wall_time'))} |")
    lines.append("")
    for split, conds in rep["summary"].items():
        rows = {c: s.get("tau_by_position") for c, s in conds.items() if s.get("tau_by_position")}
        if not rows:
            continue
        width = max(len(b) for b in rows.values())
        heads = [f"{b['start']}–{b['end']}" for b in max(rows.values(), key=len)]
        lines += [f"τ per position bucket of the generation, {split}:", "",
                  "| condition | " + " | ".join(heads) + " |", "|---|" + "---|" * width]
        for cond, bs in rows.items():
            lines.append(f"| {cond} | " + " | ".join(fmt(b["tau"]) for b in bs) + " |")
        lines.append("")
    return lines


#: The online evals at several update schedules: copy in bench/world/ -> how it was run.
ONLINE_RUNS = {
    "online.json": "`make online`",
    "online_every16.json": "`make online-cheap ONLINE_CHEAP=\"--eval.online.every=16 "
                           "--eval.output_dir=checkpoints/tiny_online/eval_every16\"`",
    "online_cheap.json": "`make online-cheap`",
}


def schedules_section(reports: dict[str, dict]) -> list[str]:
    """One row per online eval (`ONLINE_RUNS`): its update schedule against what online_meta reached
    on drafter_shifted and what the updates cost there."""
    lines = ["**Online update schedules** (drafter_shifted, online_meta; one eval of the split each, its paired CI; "
             "tokens/s compare within a row only, the runs shared the cores with different other work):", "",
             "| run | update every | context before the window | τ | × static | Δτ vs ttt_meta | "
             "updates' share of decoding time | tokens/s (static's) |", "|---|---|---|---|---|---|---|---|"]
    for name, how in ONLINE_RUNS.items():
        rep = reports.get(name)
        if rep is None:
            continue
        o = rep["meta"].get("online", {})
        on = _get(rep, "summary", "drafter_shifted", "online_meta") or {}
        st = _get(rep, "summary", "drafter_shifted", "static") or {}
        ratio = on["tau"] / st["tau"] if on.get("tau") and st.get("tau") else None
        share = on.get("online_share_of_wall_time")
        lines.append(f"| {how} | {o.get('every')} | {'detached' if o.get('detach_context') else 'differentiated'} | "
                     f"{fmt(on.get('tau'))} | {fmt(ratio)} | "
                     f"{fmt_difference(_get(rep, 'differences', 'drafter_shifted', 'online_meta - ttt_meta'))} | "
                     f"{'—' if share is None else f'{100 * share:.0f} %'} | "
                     f"{fmt(on.get('tokens_per_s'), '.0f')} ({fmt(st.get('tokens_per_s'), '.0f')}) |")
    return lines + [""]


def sweep_section(rep: dict) -> list[str]:
    m = rep["meta"]
    lines = [f"**TTT sweep** (`make sweep`: {m['prompts_per_split']} prompts per split of {m['prompt_len']} tokens, "
             f"{m['max_new_tokens']} new tokens, greedy; the recipe's LoRA is {m['default_arm']}; the full table is "
             "`checkpoints/tiny/sweep/sweep.md`). Δτ against static on the same prompts:", ""]
    splits = list(dict.fromkeys(r["split"] for r in rep["rows"]))
    keys = list(dict.fromkeys((r["arm"], r["condition"]) for r in rep["rows"] if r["condition"] != "static"))
    lines += ["| LoRA | condition | " + " | ".join(f"Δτ {s}" for s in splits) + " |", "|---|---|" + "---|" * len(splits)]
    by = {(r["arm"], r["condition"], r["split"]): r for r in rep["rows"]}
    for arm, cond in keys:
        lines.append(f"| {arm} | {cond} | " + " | ".join(
            fmt_difference(by.get((arm, cond, s), {}).get("delta_vs_static")) for s in splits) + " |")
    return lines + ["", "![TTT sweep](bench/world/sweep.png)", ""]


def kinds_section(block: dict, ar: dict) -> list[str]:
    lines = ["**Drafter kinds compared** (same target, data, recipe; `make run` and "
             "`make run ARGS=\"--drafter.kind=autoregressive --run.name=tiny_ar\"`): τ ± s.e.", "",
             "| split | condition | block | autoregressive |", "|---|---|---|---|"]
    for split, conds in block["summary"].items():
        for cond, s in conds.items():
            if cond == "target" or "@" in cond:
                continue
            a = _get(ar, "summary", split, cond) or {}
            lines.append(f"| {split} | {cond} | {fmt(s.get('tau'))} ± {fmt(s.get('tau_stderr'))} | "
                         f"{fmt(a.get('tau'))} ± {fmt(a.get('tau_stderr'))} |")
    return lines + [""]


def guided_section(rep: dict) -> list[str]:
    rows = [r for r in rep["summary"] if r["category"] != "all"]
    lines = ["**Guided decoding** (`make guided-eval`): accuracy per category at temperature 0; target alone "
             "(α = 0) beside the best guided condition.", "", "| category | target alone | best guided | condition |",
             "|---|---|---|---|"]
    for cat in dict.fromkeys(r["category"] for r in rows):
        rs = [r for r in rows if r["category"] == cat and r["temperature"] == 0.0]
        base = next((r for r in rs if r["condition"] == "target"), None)
        best = max((r for r in rs if r["condition"] != "target"), key=lambda r: r["accuracy"], default=None)
        lines.append(f"| {cat} | {fmt(base and base['accuracy'])} | {fmt(best and best['accuracy'])} | "
                     f"{best['condition'] if best else '—'} |")
    return lines + [""]


def section(root: Path) -> str:
    world = root / "bench" / "world"
    parts = [BEGIN, "", "Generated by `scripts/world_results.py` from the reports of the tiny recipe (copied into "
             "`bench/world/` by `make world-results`); the numbers are those of the last runs on 2 CPU cores.", ""]
    target = _load(root / "data" / "tiny_target" / "tiny_target_report.json")
    block, ar = _load(world / "eval.json"), _load(world / "eval_ar.json")
    if target:
        parts += target_section(target)
    parts += ["**Goals** (embedded-world issue), read from the reports below:", ""]
    parts += goals(block, ar, _load(world / "run_time.json"))
    if block:
        parts += eval_section(block, "`make run` (block drafter)")
    sweep = _load(world / "sweep.json")
    if sweep:
        parts += sweep_section(sweep)
    if block and ar:
        parts += kinds_section(block, ar)
    guided = _load(world / "guided.json")
    if guided:
        parts += guided_section(guided)
    online = _load(world / "online.json")
    if online:
        parts += online_section(online, "Online TTT while decoding (`make online`)")
    cheap = _load(world / "online_cheap.json")
    if cheap:
        parts += online_section(cheap, "The same at a cheaper update schedule (`make online-cheap`)")
    runs = {name: rep for name in ONLINE_RUNS if (rep := _load(world / name))}
    if len(runs) > 1:
        parts += schedules_section(runs)
    parts.append(END)
    return "\n".join(parts)


#: report -> (copy in bench/world/, the keys kept: the per-record lists stay in checkpoints/)
SOURCES = {
    "checkpoints/tiny/eval/report.json": ("eval.json", ("meta", "differences", "summary")),
    "checkpoints/tiny_ar/eval/report.json": ("eval_ar.json", ("meta", "differences", "summary")),
    "checkpoints/tiny/sweep/sweep.json": ("sweep.json", ("meta", "rows")),
    "checkpoints/tiny/guided/report.json": ("guided.json", ("meta", "summary")),
    "checkpoints/tiny_online/eval/report.json": ("online.json", ("meta", "differences", "summary")),
    "checkpoints/tiny_online/eval_cheap/report.json": ("online_cheap.json", ("meta", "differences", "summary")),
    "checkpoints/tiny_online/eval_every16/report.json": ("online_every16.json", ("meta", "differences", "summary")),
}


def collect(root: Path) -> None:
    """Copy the tiny recipe's reports (what the README reads) into bench/world/."""
    import shutil

    world = root / "bench" / "world"
    world.mkdir(parents=True, exist_ok=True)
    for src, (name, keys) in SOURCES.items():
        rep = _load(root / src)
        if rep is not None:
            (world / name).write_text(json.dumps({k: rep[k] for k in keys if k in rep}, indent=1) + "\n")
    if (root / "checkpoints/tiny/sweep/sweep.png").is_file():
        shutil.copy(root / "checkpoints/tiny/sweep/sweep.png", world / "sweep.png")


def main(root: Path = Path(".")) -> None:
    replace_section(root / "README.md", BEGIN, END, "Results on the embedded world", section(root))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--collect"]
    root = Path(args[0]) if args else Path(".")
    if "--collect" in sys.argv:
        collect(root)
    main(root)
