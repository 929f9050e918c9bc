"""Speculative decoding with either drafter kind, and target-only decoding as its reference.

One request at a time: `prompt_ids` is (1, P) (or (P,)). Batching requests with ragged
acceptance needs per-row cache cropping, which transformers' caches do not offer; a batch of
one keeps the loop exact and readable, and it is what τ is measured on.

The loop (block size S, "position" = index in prompt + generated tokens):

    prefill   target(prompt) -> features of 0..P-1, KV cache of 0..P-1, first token x_P
              drafter context cache <- features of 0..P-1
    repeat    block  = [x_last, MASK × (S-1)] anchored at x_last's position L
              drafts = drafter(block | context < L) at block positions 1..S-1
                       (autoregressive kind: S-1 one-token forwards from x_last, all reading
                        context < L, drafts fed back through the drafter's own KV cache)
              verify = target([x_last, d_1 .. d_{S-1}] | KV cache) -> S rows of logits
              accept a drafts, then the target's own token (correction, or bonus if a = S-1)
              crop the KV cache and extend the drafter context to the committed tokens

Invariant between steps: the target KV cache and the drafter context cache hold every
committed position except the last committed token, which opens the next block (the
drafter sees context strictly before its anchor; the target reads x_last as its first
verification input). Both caches are cropped/extended to exactly that after every step.

Losslessness. Greedy: a draft is accepted iff it equals the target's argmax given the same
prefix, so the output equals target-only greedy decoding token for token. Sampling: both
rules below keep the distribution of the committed tokens exactly the target's (tempered,
top-p filtered by the same `sampling_probs` in target-only and speculative decoding):

- "exact" (DFlash): sample the target's own token t_k at each block position; accept d_k iff
  d_k == t_k; commit t_k at the first mismatch. The committed sequence is the target's
  sample sequence itself; the draft only decides how far one verification step gets.
- "speculative" (Leviathan et al. / Chen et al.): accept d_k with prob min(1, p(d_k)/q(d_k)),
  else resample from normalize(max(0, p - q)); after S-1 acceptances a bonus token from p.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from metattt.models.base import ContextCache

# --- results ------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """What one request produced, and how.

    `accepted[i]` is the number of drafts the target accepted at verification step i, as the
    verifier decided, even when EOS or `max_new_tokens` then cut the step's tokens short
    (τ measures the drafter, not where the request happened to end). `tokens` never holds
    more than `max_new_tokens` and ends at the first EOS.
    """

    tokens: list[int]  # new tokens only (prompt excluded), EOS included when hit
    num_steps: int  # verification forwards (target-only: decode forwards, one token each)
    accepted: list[int]  # per step: accepted drafts, 0..S-1
    position_accepted: list[int]  # (S-1,) per block position k=1..S-1: steps where d_k was accepted
    position_reached: list[int]  # (S-1,) per block position: steps where d_k was checked (d_1..d_{k-1} accepted)
    prefill_time: float  # seconds: prompt forward (+ drafter context) and first token
    wall_time: float  # seconds: whole call, prefill and `on_prefill` included
    draft_time: float = 0.0  # seconds in drafter forwards (+ drafter context extension)
    verify_time: float = 0.0  # seconds in target forwards after prefill (+ acceptance, cache crop)
    stop_reason: str = "length"  # "eos" | "length"
    adapt_time: float = 0.0  # seconds in `on_prefill` (prefill TTT), between prefill and decoding
    step_starts: list[int] = field(default_factory=list)  # per step: new tokens committed before it
    online_time: float = 0.0  # seconds in `online` updates and the context rebuilds they asked for (in wall_time)
    online_updates: int = 0  # updates that asked for a rebuilt context cache
    # Only with `return_cache=True`: caches holding every committed position but the last token.
    target_cache: Any = field(default=None, repr=False)
    drafter_cache: Any = field(default=None, repr=False)

    @property
    def tau(self) -> float:
        """Acceptance length: mean over steps of (accepted drafts + 1); NaN without steps."""
        if not self.accepted:
            return float("nan")
        return sum(a + 1 for a in self.accepted) / len(self.accepted)

    @property
    def decode_time(self) -> float:
        return self.wall_time - self.prefill_time - self.adapt_time

    @property
    def position_rate(self) -> list[float]:
        """Per block position: P(d_k accepted | d_1..d_{k-1} accepted); NaN where never reached."""
        return [a / r if r else float("nan") for a, r in zip(self.position_accepted, self.position_reached)]


# --- sampling helpers -----------------------------------------------------------------------


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`, renormalized.

    probs (..., V). The first token is always kept. Target-only and speculative decoding both
    filter through this one function, so both sample the same distribution.
    """
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    out = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """logits (..., V) -> tempered, top-p filtered probabilities (..., V) in float32."""
    return top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs (..., V) -> one token per row (...,)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The target's own next token from one row of logits (V,): argmax at T=0, else a sample."""
    if temperature == 0.0:
        return int(logits.argmax(-1))
    return int(sample_tokens(sampling_probs(logits, temperature, top_p), generator))


# --- acceptance rules ---------------------------------------------------------------------
# Each rule takes the target's probabilities p (S, V) for block positions 1..S-1 plus the
# bonus row, the drafter's probabilities q (S-1, V), the drafts (S-1,), and a generator;
# it returns (number of accepted drafts a, the target's token at position a+1).

AcceptRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Generator | None"], tuple[int, int]]


def accept_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """target_logits (S, V), drafts (S-1,): longest prefix where draft == target argmax."""
    best = target_logits.argmax(-1)  # (S,)
    a = int((drafts == best[:-1]).long().cumprod(0).sum())
    return a, int(best[a])


def accept_exact(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[int, int]:
    """DFlash's rule: sample the target's token at every position, accept drafts that equal it.

    Sampling all S rows at once is fine: row k is conditioned on d_1..d_k, which equal the
    target's own samples t_1..t_k whenever row k+1 is used.
    """
    samples = sample_tokens(p, generator)  # (S,)
    a = int((drafts == samples[:-1]).long().cumprod(0).sum())
    return a, int(samples[a])


def accept_speculative(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[int, int]:
    """Standard speculative sampling: accept d_k w.p. min(1, p/q), else sample max(0, p-q)."""
    n = drafts.shape[0]
    rows = torch.arange(n, device=drafts.device)
    p_d, q_d = p[rows, drafts], q[rows, drafts]  # (S-1,)
    r = torch.rand(n, generator=generator, device=p.device)
    ok = r * q_d < p_d  # r < p/q without dividing; q(d) > 0 because d was drawn from q
    a = int(ok.long().cumprod(0).sum())
    if a == n:
        return a, int(sample_tokens(p[n], generator))
    residual = (p[a] - q[a]).clamp_min(0.0)
    total = residual.sum()
    # Rejection needs p(d) < q(d), so the residual has mass; guard only against rounding.
    residual = residual / total if total > 0 else p[a]
    return a, int(sample_tokens(residual, generator))


# Looked up by name on every call, so a test can register a deliberately wrong rule and check
# that the statistical test catches it.
ACCEPT_RULES: dict[str, AcceptRule] = {"exact": accept_exact, "speculative": accept_speculative}

#: Named protocols: (acceptance rule, draft the argmax). "dflash" is DFlash's loop as issue 18 read it
#: (argmax drafts, a draft accepted iff it equals the target's own sample), so that τ at T > 0 is
#: comparable with DFlash's published T = 1 numbers; "exact" alone samples the drafts.
PROTOCOLS: dict[str, tuple[str, bool]] = {"dflash": ("exact", True)}


def resolve_rule(rule: str, greedy_draft: bool = False) -> tuple[str, bool]:
    """(acceptance rule, argmax drafts) for a rule or protocol name."""
    if rule in PROTOCOLS:
        return PROTOCOLS[rule]
    if rule not in ACCEPT_RULES:
        raise ValueError(f"unknown acceptance rule {rule!r}; choose one of {sorted(ACCEPT_RULES) + sorted(PROTOCOLS)}")
    return rule, greedy_draft


# --- caches -------------------------------------------------------------------------------


def crop_cache(cache: Any, num_tokens: int) -> None:
    """Remove the last `num_tokens` positions from a transformers cache, in place.

    `crop(-n)` removes n tokens in transformers 4.x (negative = relative to the end) and 5.x
    (5.x refuses positive arguments). `crop(0)` must not be called: 4.x reads it as "keep 0
    tokens" and empties the cache; 5.x does nothing.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_tokens == 0:
        return
    if not hasattr(cache, "crop"):
        raise TypeError(f"{type(cache).__name__} cannot be cropped: speculative decoding needs a DynamicCache")
    cache.crop(-num_tokens)


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length())


# --- shared plumbing ----------------------------------------------------------------------


def eos_token_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset((eos_token_id,))
    return frozenset(int(t) for t in eos_token_id)


def as_single_prompt(prompt_ids: torch.Tensor) -> torch.Tensor:
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be (1, P) or (P,): one request at a time, got {tuple(prompt_ids.shape)}")
    if prompt_ids.shape[1] == 0:
        raise ValueError("prompt_ids is empty: the first token needs at least one prompt token")
    return prompt_ids


def check_sampling_args(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def commit_tokens(tokens: list[int], new: Sequence[int], eos: frozenset[int], max_new_tokens: int) -> tuple[int, bool]:
    """Append `new` to `tokens` until EOS (kept) or the length limit; -> (appended, done)."""
    m = 0
    for t in new:
        if len(tokens) >= max_new_tokens:
            return m, True
        tokens.append(t)
        m += 1
        if t in eos:
            return m, True
    return m, len(tokens) >= max_new_tokens


class _Clock:
    """Wall-clock seconds that wait for queued GPU work, so phases are not misattributed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _prefill(target, prompt: torch.Tensor, temperature: float, top_p: float, generator):
    out = target(prompt, use_cache=True, logits_to_keep=1)  # features (1, P, n·H), logits (1, 1, V)
    first = pick_token(out.logits[0, -1], temperature, top_p, generator)
    return out, first


# --- target-only decoding -----------------------------------------------------------------


@torch.no_grad()
def target_generate(
    target,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    return_cache: bool = False,
) -> GenerationResult:
    """Autoregressive decoding with the target's KV cache: the reference and the speed baseline.

    Greedy at temperature 0, else sampling from `sampling_probs` (the same distribution the
    speculative rules preserve). Every decode forward is one step that commits one token, so
    τ = 1 by construction.
    """
    check_sampling_args(temperature, top_p)
    prompt = as_single_prompt(prompt_ids)
    eos = eos_token_set(eos_token_id)
    clock = _Clock(prompt.device)
    start = clock()
    tokens: list[int] = []
    if max_new_tokens <= 0:
        return GenerationResult([], 0, [], [], [], 0.0, clock() - start)
    out, first = _prefill(target, prompt, temperature, top_p, generator)
    cache = out.past_key_values
    prefill_done = clock()
    _, done = commit_tokens(tokens, [first], eos, max_new_tokens)
    steps = 0
    while not done:
        x = torch.tensor([[tokens[-1]]], device=prompt.device)  # (1, 1)
        out = target(x, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps += 1
        _, done = commit_tokens(tokens, [pick_token(out.logits[0, -1], temperature, top_p, generator)], eos, max_new_tokens)
    end = clock()
    return GenerationResult(
        tokens=tokens, num_steps=steps, accepted=[0] * steps, position_accepted=[], position_reached=[],
        prefill_time=prefill_done - start, wall_time=end - start, verify_time=end - prefill_done,
        stop_reason="eos" if tokens[-1] in eos else "length",
        target_cache=cache if return_cache else None,
    )


# --- speculative decoding -----------------------------------------------------------------


def chooser(temperature: float, top_p: float, generator: torch.Generator | None, greedy_draft: bool):
    """How drafts are picked from draft logits (n, V): argmax at temperature 0 (no distribution);
    else sampled from the tempered, top-p filtered q (argmax with `greedy_draft`: a draw from the
    one-hot q, with which both sampling rules stay exact). Returns (tokens (n,), q (n, V) | None)."""

    def choose(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if temperature == 0.0:
            return logits.argmax(-1), None
        q = sampling_probs(logits, temperature, top_p)  # (n, V)
        if greedy_draft:
            tokens = q.argmax(-1)
            return tokens, torch.nn.functional.one_hot(tokens, q.shape[-1]).to(q.dtype)
        return sample_tokens(q, generator), q  # each row an independent draw from its q

    return choose


def draft(drafter, last_token: int, position: int, ctx_cache, temperature: float, top_p: float,
          generator: torch.Generator | None, greedy_draft: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S-1 drafts after the committed `last_token` (at `position`) and their distribution q
    (S-1, V) (None when greedy), as the drafter's kind drafts them (metattt.models.registry): the
    block kind in one forward, the autoregressive kind one token per forward."""
    return drafter.draft(last_token, position, ctx_cache, chooser(temperature, top_p, generator, greedy_draft))


@torch.no_grad()
def speculative_generate(
    target,
    drafter,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rule: str = "exact",
    generator: torch.Generator | None = None,
    greedy_draft: bool = False,
    return_cache: bool = False,
    on_prefill: Callable[[torch.Tensor], None] | None = None,
    online: Callable[[int, torch.Tensor, torch.Tensor, ContextCache], bool] | None = None,
) -> GenerationResult:
    """Speculative decoding of one prompt (1, P) with either drafter kind, verified by the target.

    `drafter` is either kind (or a peft wrapper of it): it needs `config.block_size`,
    `extend_cache(cache, features)` and `draft(...)` (metattt.models.registry); the block kind
    drafts in one forward, the autoregressive kind in S-1 one-token forwards, and everything else
    (verification, acceptance, caches, τ) is the same loop. At temperature 0
    acceptance is greedy and `rule` is unused; at
    T > 0 drafts are sampled from the drafter's tempered/top-p distribution (argmax with
    `greedy_draft=True`, which suits the "exact" rule: it accepts d with probability p(d)).
    `rule="dflash"` is that pair, DFlash's protocol (`PROTOCOLS`).

    Counting differs from the DFlash loop checked in issue 18 in one place: when the committed
    count lands exactly on `max_new_tokens`, that loop verifies one more block and counts it in τ;
    this one stops (every step here commits at least one token the output keeps).

    `on_prefill(features)`, when given, is called once with the prompt's target features
    (1, P, n·H) from the prefill forward, with gradients enabled, before the drafter reads
    them: prefill TTT adapts the drafter's LoRA there, on the very forward decoding uses, so a
    TTT request costs one prefill like any other. Its time is `adapt_time` (in `wall_time`).

    `online(step, ids, features, cache)`, when given, is called after every verification step with
    every committed token (1, L) (prompt included), the target features of the committed positions
    (1, L-1, n·H) and the drafter's context cache of them — nothing else, so online TTT (metattt.ttt.online) learns from what the target
    verified only. When it returns True (it changed weights the context cache depends on), the
    drafter's context cache is rebuilt from the stored features, with no target work.
    """
    check_sampling_args(temperature, top_p)
    if temperature > 0:
        rule, greedy_draft = resolve_rule(rule, greedy_draft)
    if on_prefill is not None and torch.is_inference_mode_enabled():
        raise RuntimeError("on_prefill (prefill TTT) takes gradients, which torch.inference_mode() forbids: call "
                           "speculative_generate outside it (metattt.serve.TTTSpeculator.generate does)")
    prompt = as_single_prompt(prompt_ids)
    device = prompt.device
    eos = eos_token_set(eos_token_id)
    S = int(drafter.config.block_size)
    clock = _Clock(device)
    start = clock()
    tokens: list[int] = []
    accepted: list[int] = []
    pos_acc, pos_reach = [0] * (S - 1), [0] * (S - 1)
    if max_new_tokens <= 0:
        return GenerationResult([], 0, [], pos_acc, pos_reach, 0.0, clock() - start)

    out, first = _prefill(target, prompt, temperature, top_p, generator)
    cache = out.past_key_values  # positions 0..P-1
    adapt_time = 0.0
    if on_prefill is not None:
        t0 = clock()
        with torch.enable_grad():
            on_prefill(out.features)
        adapt_time = clock() - t0
    ctx = drafter.extend_cache(None, out.features)  # positions 0..P-1
    committed_features = [out.features] if online is not None else []  # kept only for online updates
    prefill_done = clock()
    _, done = commit_tokens(tokens, [first], eos, max_new_tokens)

    draft_time = verify_time = online_time = 0.0
    step_starts: list[int] = []
    rebuilds = 0
    while not done:
        step_starts.append(len(tokens))  # new tokens committed before this step's drafts
        t0 = clock()
        last = tokens[-1]
        position = prompt.shape[1] + len(tokens) - 1  # of the last committed token = the anchor
        drafts, q = draft(drafter, last, position, ctx, temperature, top_p, generator, greedy_draft)
        t1 = clock()

        verify_ids = torch.cat([drafts.new_tensor([last]), drafts])[None]  # (1, S)
        out = target(verify_ids, past_key_values=cache, use_cache=True)  # logits (1, S, V)
        cache = out.past_key_values
        t_logits = out.logits[0]  # (S, V): row j predicts position `position + j + 1`
        if temperature == 0.0:
            a, nxt = accept_greedy(t_logits, drafts)
        else:
            p = sampling_probs(t_logits, temperature, top_p)  # (S, V)
            a, nxt = ACCEPT_RULES[rule](p, q, drafts, generator)
        accepted.append(a)
        for k in range(min(a + 1, S - 1)):  # d_1..d_a accepted; d_{a+1} checked and rejected
            pos_reach[k] += 1
            pos_acc[k] += k < a

        m, done = commit_tokens(tokens, drafts[:a].tolist() + [nxt], eos, max_new_tokens)
        # Keep [last, d_1..d_{m-1}] (the committed tokens but the newest one); they were
        # verified with exactly these inputs, so their KV entries and features are right.
        crop_cache(cache, S - m)
        t2 = clock()
        if not done or return_cache:
            ctx = drafter.extend_cache(ctx, out.features[:, :m])
        t3 = clock()
        draft_time += (t1 - t0) + (t3 - t2)
        verify_time += t2 - t1
        if online is not None and not done:
            committed_features.append(out.features[:, :m])
            features = torch.cat(committed_features, 1)  # (1, P + len(tokens) - 1, n·H)
            ids = torch.cat([prompt, prompt.new_tensor([tokens])], 1)  # (1, P + len(tokens))
            with torch.enable_grad():
                rebuild = online(len(accepted) - 1, ids, features, ctx)
            if rebuild:
                ctx = drafter.extend_cache(None, features)
                rebuilds += 1
            online_time += clock() - t3

    end = clock()
    return GenerationResult(
        tokens=tokens, num_steps=len(accepted), accepted=accepted, position_accepted=pos_acc,
        position_reached=pos_reach, prefill_time=prefill_done - start - adapt_time, wall_time=end - start,
        draft_time=draft_time, verify_time=verify_time, adapt_time=adapt_time, step_starts=step_starts,
        online_time=online_time, online_updates=rebuilds,
        stop_reason="eos" if tokens[-1] in eos else "length",
        target_cache=cache if return_cache else None, drafter_cache=ctx if return_cache else None,
    )
