"""Draft-guided decoding: steer the target toward what a prompt-adapted drafter learned.

The drafter is adapted (TTT) on the prompt. Besides drafting for speed, its next-token
distribution can steer the target: at every step

    guided_logits = target_logits + α_t · (draft_logits − target_logits)
                  = lerp(target_logits, draft_logits, α_t)

and the next token is the argmax (temperature 0) or a sample of `sampling_probs(guided_logits,
T, top_p)` — the same helpers target-only decoding uses, so α = 0 *is* target decoding (same
tokens, same random draws) and α = 1 decodes with the drafter's logits alone.

The drafter's next-token logits: the block drafter at block position 1 of the block
[last committed token, MASK × (S-1)], anchored at the last committed token's position and
reading (through its context cache, as in `metattt.spec.decode`) the target features of every
position before it. (An autoregressive drafter gives them from its one-token chain.)

α rules (`alpha_rule`):

- `fixed`: α_t = α.
- `kl`:    α_t = α · min(1, KL(p_draft ‖ p_target) / kl_tau), with both distributions at
  temperature 1. Where drafter and target agree there is nothing to steer; the more the
  adapted drafter departs from the target (where the context taught it something the target
  does not pick up), the more weight it gets, capped at α.

Null control (`control="noise"`): target_logits + α_t · ε, with ε a zero-mean Gaussian
direction of the same L2 norm as the centred difference (draft − target) − mean(draft − target)
at that step (logits are shift invariant, so the mean carries nothing), and the same α_t.
Gains that survive this control are not a temperature-like effect of perturbing the logits.
The noise comes from its own generator: it never shifts the sampling draws.

TTT: `guided_generate(..., ttt=TTTConfig)` adapts the drafter's LoRA on the prompt's target
features (from the prefill) with `ttt_adapt`, from `ttt_init` (default: the LoRA it carries),
decodes, and puts the LoRA back. `refine_generate` runs rounds: generate → TTT on
prompt + response → generate again (each round from the same initialization and seed).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metattt.models.lora import copy_lora, set_lora
from metattt.spec.decode import (
    as_single_prompt,
    check_sampling_args,
    commit_tokens,
    eos_token_set,
    pick_token,
)

log = logging.getLogger("metattt")

ALPHA_RULES = ("fixed", "kl")
CONTROLS = ("guided", "noise")


# --- one step -----------------------------------------------------------------------------------
def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) over the last dim, in float32."""
    logp, logq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def step_alpha(alpha: float, alpha_rule: str, kl: float, kl_tau: float) -> float:
    if alpha_rule == "fixed":
        return float(alpha)
    if alpha_rule == "kl":
        return float(alpha) * min(1.0, kl / kl_tau) if kl_tau > 0 else float(alpha)
    raise ValueError(f"alpha_rule must be one of {ALPHA_RULES}, got {alpha_rule!r}")


def matched_noise(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """A zero-mean Gaussian direction with the L2 norm of the centred (draft − target) (V,)."""
    diff = draft_logits.float() - target_logits.float()
    norm = (diff - diff.mean()).norm()
    eps = torch.randn(diff.shape, generator=generator, dtype=torch.float32)  # on the generator's (CPU) device
    eps = eps - eps.mean()
    return (eps * (norm.cpu() / eps.norm().clamp_min(1e-12))).to(diff.device)


def guide_logits(target_logits: torch.Tensor, draft_logits: torch.Tensor, alpha: float,
                 alpha_rule: str = "fixed", kl_tau: float = 1.0, control: str = "guided",
                 noise_generator: torch.Generator | None = None) -> tuple[torch.Tensor, float, float]:
    """One step: (guided logits (V,), α_t, KL(p_draft ‖ p_target)).

    α_t = 0 returns `target_logits` itself; with control "guided" α_t = 1 returns the drafter's
    logits exactly (lerp is exact at both ends).
    """
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    kl = float(kl_divergence(draft_logits, target_logits))
    a = step_alpha(alpha, alpha_rule, kl, kl_tau)
    if a == 0.0:
        return target_logits, a, kl
    if control == "guided":
        return torch.lerp(target_logits.float(), draft_logits.float(), a), a, kl
    return target_logits.float() + a * matched_noise(target_logits, draft_logits, noise_generator), a, kl


def draft_next_logits(drafter, last_token: int, position: int, ctx_cache) -> torch.Tensor:
    """The drafter's logits (V,) for the token after `last_token` (at `position`).

    `ctx_cache` holds the drafter context of positions 0..position-1. Block drafter: block position 1
    of [last_token, MASK × (S-1)]. Autoregressive drafter (`config.kind == "autoregressive"`): its
    one-token chain [last_token], whose single output predicts the next token.
    """
    cfg = drafter.config
    device = next(drafter.parameters()).device
    anchors = torch.tensor([[position]], device=device)
    if getattr(cfg, "kind", "block") == "autoregressive":
        hidden = drafter(torch.tensor([[[last_token]]], device=device), anchors, cache=ctx_cache)  # (1, 1, 1, H)
        return drafter.logits(hidden[0, 0, 0]).float()
    block = torch.full((1, 1, cfg.block_size), cfg.mask_token_id, dtype=torch.long, device=device)
    block[0, 0, 0] = last_token
    hidden = drafter(block, anchors, cache=ctx_cache)  # (1, 1, S, H)
    return drafter.logits(hidden[0, 0, 1]).float()  # block position 1


def _empty_context(drafter, features: torch.Tensor):
    return drafter.extend_cache(None, features[:, :0])


# --- LoRA helpers ------------------------------------------------------------------------------
def adapt_on(model, init: dict[str, torch.Tensor], ids: torch.Tensor, features: torch.Tensor, ttt,
             seed: int = 0, feature_head=None) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """TTT from `init` on (ids, features) -> (adapted LoRA, inner losses, seconds). `init` is untouched."""
    from metattt.ttt.tasks import ttt_adapt

    t0 = time.perf_counter()
    out = ttt_adapt(model, init, ids, features, ttt, torch.Generator().manual_seed(seed), feature_head)
    return out.params, [float(x) for x in out.losses], time.perf_counter() - t0


# --- decoding -----------------------------------------------------------------------------------
@dataclass
class GuidedResult:
    tokens: list[int]  # new tokens only, EOS included when hit
    alphas: list[float]  # α_t of every generated token
    kls: list[float]  # KL(p_draft ‖ p_target) at every generated token
    agree: list[bool]  # drafter argmax == target argmax
    changed: list[bool]  # guided argmax != target argmax (guidance flipped the greedy choice)
    stop_reason: str  # eos | length | stop
    wall_time: float
    ttt_time: float = 0.0
    ttt_losses: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # with `force`: log p_guided(forced token), T = 1

    @property
    def mean_kl(self) -> float:
        return sum(self.kls) / len(self.kls) if self.kls else float("nan")

    @property
    def mean_alpha(self) -> float:
        return sum(self.alphas) / len(self.alphas) if self.alphas else float("nan")


def _pick_on(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if generator is not None and temperature > 0 and logits.device != generator.device:
        logits = logits.to(generator.device)
    return pick_token(logits, temperature, top_p, generator)


@torch.no_grad()
def guided_generate(
    target,
    drafter,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    alpha: float = 0.0,
    alpha_rule: str = "fixed",
    kl_tau: float = 1.0,
    control: str = "guided",
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    ttt=None,
    ttt_init: dict[str, torch.Tensor] | None = None,
    ttt_seed: int = 0,
    feature_head=None,
    stop: Callable[[list[int]], bool] | None = None,
    force: Sequence[int] | None = None,
) -> GuidedResult:
    """Token-by-token decoding of one prompt (1, P) with guided logits (module docstring).

    `drafter`: a BlockDrafter or its peft wrapper (needed for `ttt`). `stop(tokens)` may end the
    request early (after a token is committed). `noise_generator` drives the null control only.
    `force`: teacher forcing — commit these tokens instead of choosing, and record the log-probability
    the guided distribution (temperature 1, no top-p) gives each (`logprobs`): how much guidance moves
    probability toward a reference answer, a finer measure than whether the answer was produced.
    """
    check_sampling_args(temperature, top_p)
    if alpha_rule not in ALPHA_RULES:
        raise ValueError(f"alpha_rule must be one of {ALPHA_RULES}, got {alpha_rule!r}")
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    prompt = as_single_prompt(prompt_ids)
    eos = eos_token_set(eos_token_id)
    start = time.perf_counter()
    res = GuidedResult([], [], [], [], [], "length", 0.0)
    if force is not None:
        force = [int(t) for t in force]
        max_new_tokens, stop = len(force), None
    if max_new_tokens <= 0:
        res.wall_time = time.perf_counter() - start
        return res
    if control == "noise" and noise_generator is None:
        noise_generator = torch.Generator().manual_seed(0)

    out = target(prompt, use_cache=True, logits_to_keep=1)  # exactly target_generate's prefill
    cache = out.past_key_values
    saved = None
    if ttt is not None:
        saved = copy_lora(drafter)
        if not saved:
            raise ValueError("ttt needs a drafter with LoRA adapters (metattt.models.lora.add_lora / load_meta_lora)")
        params, res.ttt_losses, res.ttt_time = adapt_on(drafter, ttt_init if ttt_init is not None else saved, prompt,
                                                        out.features, ttt, ttt_seed, feature_head)
        set_lora(drafter, params)
    try:
        P = prompt.shape[1]
        # drafter context: every position before the anchor (the last committed token)
        ctx = drafter.extend_cache(None, out.features[:, : P - 1]) if P > 1 else _empty_context(drafter, out.features)
        pending = out.features[:, P - 1 :]  # features of the anchor's position, added once it is passed
        t_logits = out.logits[0, -1]
        last, position = int(prompt[0, -1]), P - 1
        tokens = res.tokens
        while True:
            d_logits = draft_next_logits(drafter, last, position, ctx)
            g_logits, a, kl = guide_logits(t_logits, d_logits, alpha, alpha_rule, kl_tau, control, noise_generator)
            if force is None:
                nxt = _pick_on(g_logits, temperature, top_p, generator)
            else:
                nxt = force[len(tokens)]
                res.logprobs.append(float(torch.log_softmax(g_logits.float(), -1)[nxt]))
            t_best = int(t_logits.argmax(-1))
            res.alphas.append(a)
            res.kls.append(kl)
            res.agree.append(int(d_logits.argmax(-1)) == t_best)
            res.changed.append(int(g_logits.argmax(-1)) != t_best)
            _, done = commit_tokens(tokens, [nxt], eos, max_new_tokens)
            if done:
                res.stop_reason = "eos" if tokens[-1] in eos else "length"
                break
            if stop is not None and stop(tokens):
                res.stop_reason = "stop"
                break
            out = target(torch.tensor([[nxt]], device=prompt.device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            t_logits = out.logits[0, -1]
            ctx = drafter.extend_cache(ctx, pending)
            pending = out.features
            last, position = nxt, position + 1
    finally:
        if saved is not None:
            set_lora(drafter, saved)
    res.wall_time = time.perf_counter() - start
    return res


def refine_generate(target, model, prompt_ids: torch.Tensor, rounds: int, ttt, init: dict[str, torch.Tensor],
                    seed: int = 0, first: GuidedResult | None = None, feature_head=None, eos_token_id=None,
                    **gen) -> list[GuidedResult]:
    """Multi-round refinement: round 0 = guided decoding with TTT on the prompt; round r ≥ 1 =
    TTT (from `init`) on prompt + response of round r-1, then guided decoding of the prompt again.

    Every round draws from generators seeded with `seed` (sampling) and `seed + 1` (noise), so
    rounds differ only in how the drafter was adapted. `first` reuses an existing round 0.
    `gen`: the other `guided_generate` arguments (max_new_tokens, alpha, temperature, ...).
    """
    prompt = as_single_prompt(prompt_ids)
    eos = eos_token_set(eos_token_id)
    saved = copy_lora(model)

    def gens():
        return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)

    try:
        if first is None:
            g, ng = gens()
            first = guided_generate(target, model, prompt, eos_token_id=eos_token_id, generator=g, noise_generator=ng,
                                    ttt=ttt, ttt_init=init, ttt_seed=seed, feature_head=feature_head, **gen)
        results = [first]
        for _ in range(rounds):
            response = [t for t in results[-1].tokens if t not in eos]
            ids = torch.cat([prompt, prompt.new_tensor([response])], 1) if response else prompt
            with torch.no_grad():
                features = target(ids, return_logits=False).features
            params, losses, ttt_time = adapt_on(model, init, ids, features, ttt, seed, feature_head)
            set_lora(model, params)
            g, ng = gens()
            res = guided_generate(target, model, prompt, eos_token_id=eos_token_id, generator=g, noise_generator=ng,
                                  **gen)
            res.ttt_time, res.ttt_losses = ttt_time, losses
            results.append(res)
    finally:
        set_lora(model, saved)
    return results


# --- the evaluation matrix ----------------------------------------------------------------------
@dataclass
class GuidedEvalConfig:
    """Draft-guided decoding on context-learning tasks: category × temperature × α × TTT (+ null control)."""

    tasks: str | None = None
    """Task file(s) or folder (metattt.clbench format, or public CL-bench JSONL rows); None: synthetic tasks."""
    synthetic_categories: list[str] = field(default_factory=lambda: ["python", "glossary", "cipher", "rules"])
    """Synthetic categories when `tasks` is None: python, glossary, cipher, rules."""
    synthetic_tasks: int = 4
    """Synthetic tasks per category."""
    synthetic_questions: int = 3
    """Questions per synthetic task (1..8)."""
    max_tasks: int | None = None
    """Use at most this many tasks (after loading), per category."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5])
    """Guidance strengths α (0 = the target alone)."""
    alpha_rule: str = "fixed"
    """fixed: α_t = α; kl: α_t = α · min(1, KL(p_draft ‖ p_target) / kl_tau)."""
    kl_tau: float = 1.0
    """KL (nats) at which the kl rule reaches the full α."""
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    """Decoding temperatures (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus filter (applied to the guided logits)."""
    samples: int = 1
    """Samples per question at temperature > 0 (greedy runs once)."""
    ttt: list[bool] = field(default_factory=lambda: [False, True])
    """Drafter conditions: False = its init LoRA as is, True = TTT on the prompt."""
    null_control: bool = True
    """Add the noise control (matched scale, same α_t) for every α > 0 and TTT setting."""
    refine_rounds: int = 0
    """> 0: add `refine` conditions (TTT on, every α > 0): TTT on prompt + response, generate again, r times."""
    ttt_init: str = "meta"
    """LoRA the drafter starts from: meta (meta-learned, when exported) or zero (peft's B = 0)."""
    ttt_steps: int | None = None
    """TTT steps; None: what meta-training exported."""
    ttt_lr: float | None = None
    """TTT inner lr; None: exported."""
    max_new_tokens: int = 24
    """Tokens per answer (rubric-graded tasks such as CL-bench need far more than checkable ones)."""
    answer_logprob: bool = True
    """Also score the reference answer teacher-forced: mean log p_guided per answer token (finer than accuracy)."""
    stop_at_line: bool = True
    """Stop once the first non-empty line of the answer is complete (when its check reads only that line)."""
    max_prompt_tokens: int = 768
    """Longer prompts keep their last tokens (the question is at the end)."""
    judge: str = "auto"
    """rule (checkable answers), endpoint (rubrics, OpenAI-compatible), auto (rule where checkable, else endpoint)."""
    judge_base_url: str | None = None
    """OpenAI-compatible endpoint of the rubric judge, e.g. http://127.0.0.1:8000/v1."""
    judge_model: str = "gpt-4o-mini"
    """Model name sent to the endpoint judge."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (unset: no Authorization header)."""
    judge_timeout_s: float = 60.0
    """Per-request timeout of the endpoint judge."""
    cpu_threads: int | None = None
    """torch intra-op threads when running on the CPU (None: torch's default). Token-by-token decoding
    of a small model is latency bound: 1 thread is as fast, and far faster when cores are shared."""
    drafter_path: str | None = None
    """Drafter folder; None: as eval (the meta adapter's base, or {out}/drafter)."""
    meta_lora_path: str | None = None
    """Meta-learned adapter; None: {out}/meta_lora."""

    def validate(self) -> None:
        if self.alpha_rule not in ALPHA_RULES:
            raise ValueError(f"guided.alpha_rule must be one of {ALPHA_RULES}")
        if self.ttt_init not in ("meta", "zero"):
            raise ValueError("guided.ttt_init must be meta or zero")
        if any(t < 0 for t in self.temperatures):
            raise ValueError("guided.temperatures must be >= 0")
        if not self.alphas or not self.ttt:
            raise ValueError("guided.alphas and guided.ttt need at least one value")


def load_guided_tasks(cfg: GuidedEvalConfig, seed: int):
    from metattt.clbench import load_tasks, make_synthetic_tasks

    if cfg.tasks:
        tasks = load_tasks(cfg.tasks)
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


def condition_list(cfg: GuidedEvalConfig) -> list[tuple[str, bool, float]]:
    """(control, ttt, α) of every condition; α = 0 runs once (the target alone: TTT is moot)."""
    out: list[tuple[str, bool, float]] = [("guided", False, 0.0)]
    alphas = [a for a in dict.fromkeys(float(a) for a in cfg.alphas) if a != 0.0]
    for ttt in dict.fromkeys(bool(t) for t in cfg.ttt):
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


def run_guided_matrix(target, model, tokenizer, tasks, cfg: GuidedEvalConfig, init: dict[str, torch.Tensor],
                      ttt, judge, seed: int = 0, feature_head=None) -> list[dict]:
    """Every task × question × temperature × sample × condition -> one record each."""
    from metattt.clbench import render_prompt

    cfg.validate()
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
def _mean_se(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


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
            base_acc = _mean_se([r["score"] for r in base])[0]
            base_lp = _mean_se([r.get("answer_logprob") for r in base])[0]
            for cond in dict.fromkeys(r["condition"] for r in rs_t):
                rs = [r for r in rs_t if r["condition"] == cond]
                graded = [r["score"] for r in rs if r["score"] is not None]
                acc, se = _mean_se(graded)
                lp, lp_se = _mean_se([r.get("answer_logprob") for r in rs])
                rows.append(dict(
                    category=cat, temperature=temp, condition=cond, control=rs[0]["control"], ttt=rs[0]["ttt"],
                    alpha=rs[0]["alpha"], accuracy=acc, stderr=se, n=len(graded), ungraded=len(rs) - len(graded),
                    delta_vs_target=acc - base_acc, answer_logprob=lp, answer_logprob_stderr=lp_se,
                    delta_logprob_vs_target=lp - base_lp,
                    mean_kl=_mean_se([r["mean_kl"] for r in rs])[0],
                    mean_alpha=_mean_se([r["mean_alpha"] for r in rs])[0],
                    changed_rate=_mean_se([r["changed_rate"] for r in rs])[0],
                    agree_rate=_mean_se([r["agree_rate"] for r in rs])[0],
                    mean_tokens=_mean_se([r["num_tokens"] for r in rs])[0],
                ))
    return rows


def _f(x, spec=".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _cell(row: dict | None, key: str = "accuracy", se_key: str = "stderr") -> str:
    if row is None:
        return ""
    value, se = row[key], row[se_key]
    return _f(value) + ("" if se is None or math.isnan(se) else f" ± {se:.2f}")


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
        lines.append(f"| {r['category']} | {r['temperature']:g} | {r['condition']} | {_f(r['accuracy'])} | "
                     f"{_f(r['stderr'])} | {_f(r['delta_vs_target'], '+.2f')} | {_f(r['answer_logprob'])} | "
                     f"{_f(r['delta_logprob_vs_target'], '+.2f')} | {r['n']} | {_f(r['mean_kl'])} | "
                     f"{_f(r['mean_alpha'], '.3f')} | {_f(r['changed_rate'])} | {_f(r['agree_rate'])} |")
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
    from metattt.utils import atomic_write_json, atomic_write_text

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
