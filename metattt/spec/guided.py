"""Draft-guided decoding: steer the target toward what a prompt-adapted drafter learned.

The drafter is adapted (TTT) on the prompt. Besides drafting for speed, its next-token
distribution can steer the target: at every step

    guided_logits = target_logits + α_t · (draft_logits − target_logits)
                  = lerp(target_logits, draft_logits, α_t)

and the next token is the argmax (temperature 0) or a sample of `sampling_probs(guided_logits,
T, top_p)` — the same helpers target-only decoding uses, so α = 0 *is* target decoding (same
tokens, same random draws) and α = 1 decodes with the drafter's logits alone.

The drafter's next-token logits are its kind's `next_token_logits` (metattt.models.registry):
the block drafter at block position 1 of [last committed token, MASK × (S-1)], the
autoregressive drafter from its one-token chain, either reading (through its context cache, as
in `metattt.spec.decode`) the target features of every position before the last committed token.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from metattt.config import ALPHA_RULES
from metattt.models.lora import copy_lora, set_lora
from metattt.spec.decode import (
    as_single_prompt,
    check_sampling_args,
    commit_tokens,
    eos_token_set,
    pick_token,
)
from metattt.ttt.tasks import ttt_adapt

log = logging.getLogger("metattt")

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


def _empty_context(drafter, features: torch.Tensor):
    return drafter.extend_cache(None, features[:, :0])


# --- LoRA helpers ------------------------------------------------------------------------------
def adapt_on(model, init: dict[str, torch.Tensor], ids: torch.Tensor, features: torch.Tensor, ttt,
             seed: int = 0, feature_head=None) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """TTT from `init` on (ids, features) -> (adapted LoRA, inner losses, seconds). `init` is untouched."""
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
            d_logits = drafter.next_token_logits(last, position, ctx)
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
