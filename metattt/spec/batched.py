"""Batched speculative decoding: R requests in one loop, each accepting its own number of drafts.

`speculative_generate_batch` is R calls of `metattt.spec.decode.speculative_generate` run together:
per step one drafter forward and one target forward for every row still decoding, each row
verified, accepted and stopped on its own (ragged acceptance, as in BASS, Qian et al. 2024).
`target_generate_batch` is the batched target-only reference and speed baseline.

Cache design: one slot layout for the target's KV cache (one transformers DynamicCache for the
whole batch) and the drafter's context cache (metattt.models.base.ContextCache).

- Prompts are left-padded to the longest, so every row's next inputs go to the same slots.
- Every row carries its own `position_ids` (a slot's index is not a row's position) and a 2-D
  attention mask over all slots (`valid`), from which transformers builds causal ∧ padding
  masks. Causality by slot index is right because each row's slots are in position order.
- A verification step appends S slots to every row ([last, d_1..d_{S-1}]). A row that commits m
  tokens keeps the first m (their K/V and features were computed on exactly the committed inputs)
  and marks the other S-m dead in `valid` instead of cropping, since a crop would cut every row
  by the same length. The drafter's context cache appends the same S slots (features of the same
  forward) with the same mask, so one `valid` (R, T) serves both caches, and the invariant of the
  single-request loop holds per row: the live slots are every committed position but the last.
- Dead slots cost memory and attention work, so once there are more than `compact_slack` of them
  beyond what the longest row needs, both caches are compacted: each row's live slots are
  gathered, in order, right-aligned into as many slots as the longest row needs.
- A row that hits EOS or `max_new_tokens` leaves the batch (DynamicCache.batch_select_indices,
  and the same rows of everything else) while the others go on.

Per-row drafter weights (TTT): `lora` holds fast weights under peft's names with a leading row dim,
A (R, r, in) and B (R, out, r). The drafter runs them through metattt.models.batched_lora inside
`torch.func.functional_call`, for drafting, context extension and rebuilds alike. `on_prefill`
gets each row's prefill features and may return such weights (`prefill_ttt_batched`, which is
metattt.ttt.batched.ttt_adapt_batched). `online` holds one metattt.ttt.online.OnlineTTT per row,
called with that row's committed tokens and features as the single-request loop calls it. Its
new weights go into that row, and the row's context K/V is recomputed from the stored features
when it asks. The updates themselves run one row after another.

What equals R separate requests: greedy tokens and acceptance counts, because each row computes
what its request computes alone, up to the float rounding of batched matmuls. With one generator
per row, each row draws from its own generator in the order its request alone would. RoPE types
whose frequencies depend on the sequence length (dynamic NTK, longrope) see the batch's largest
position, not each row's own.

Times in each row's GenerationResult are the batch's: `prefill_time` and `adapt_time` are the
batch's prefill and TTT, `draft_time` / `verify_time` add up the steps the row took part in, and
`wall_time` runs from the call until the row finished.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metattt.models.base import ContextCache
from metattt.models.batched_lora import batched_lora, repeat_lora, stack_lora
from metattt.models.lora import copy_lora
from metattt.spec.decode import (
    ACCEPT_RULES,
    GenerationResult,
    _Clock,
    check_sampling_args,
    commit_tokens,
    eos_token_set,
    pick_token,
    resolve_rule,
    sample_tokens,
    sampling_probs,
)
from metattt.ttt.batched import ttt_adapt_batched
from metattt.ttt.inner import ParamDict
from metattt.ttt.tasks import TTTConfig

#: The largest batch `speculative_generate_batch` and `target_generate_batch` accept by default
#: (`max_batch_size=`): past it the padded caches grow with the longest prompt times the rows.
MAX_BATCH_SIZE = 64

Generators = torch.Generator | Sequence[torch.Generator | None] | None


# --- input --------------------------------------------------------------------------------


def max_positions(target) -> int | None:
    """The target's context length (`config.max_position_embeddings`), None where it has none."""
    config = target.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if n is not None else None


def as_prompt_list(prompts: Sequence[torch.Tensor | Sequence[int]], max_new_tokens: int | Sequence[int],
                   context: int | None, max_batch_size: int | None) -> tuple[list[torch.Tensor], list[int]]:
    """R prompts of (P_i,) or (1, P_i) token ids -> R tensors (P_i,) and each row's token budget,
    checked: at least one prompt, at most `max_batch_size`, none empty, each with room for its
    `max_new_tokens` (one for all, or one per prompt) in `context` positions."""
    if isinstance(prompts, torch.Tensor):
        raise TypeError("prompts is a list of (P,) or (1, P) tensors, one per request (a (1, P) tensor alone is "
                        "one request: speculative_generate / target_generate)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: give at least one request")
    if max_batch_size is not None and len(prompts) > max_batch_size:
        raise ValueError(f"{len(prompts)} prompts exceed the maximum batch size {max_batch_size}: split them into "
                         "batches of at most that many (or raise max_batch_size=)")
    if isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * len(prompts)
    else:
        limits = [int(n) for n in max_new_tokens]
        if len(limits) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(limits)} max_new_tokens")
    out = []
    for i, (p, limit) in enumerate(zip(prompts, limits)):
        p = torch.as_tensor(p)
        if p.dim() == 2 and p.shape[0] == 1:
            p = p[0]
        if p.dim() != 1:
            raise ValueError(f"prompt {i} has shape {tuple(p.shape)}: each prompt is (P,) or (1, P)")
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty: the first token needs at least one prompt token")
        P = p.numel()
        if context is not None and P > context:
            raise ValueError(f"prompt {i} has {P} tokens, longer than the target's context "
                             f"(config.max_position_embeddings = {context})")
        if context is not None and P + max(0, limit) > context:
            raise ValueError(f"prompt {i} ({P} tokens) + max_new_tokens ({limit}) = {P + limit} "
                             f"positions, past the target's context (config.max_position_embeddings = {context}): "
                             "shorten the prompt or lower max_new_tokens")
        out.append(p.long())
    if len({p.device for p in out}) > 1:
        raise ValueError(f"prompts are on several devices: {sorted({str(p.device) for p in out})}")
    return out, limits


def row_generators(generators: Generators, rows: int) -> list[torch.Generator | None]:
    """One generator per row: a list is taken as is; one generator (or None) is shared by every
    row, drawn from row after row."""
    if generators is None or isinstance(generators, torch.Generator):
        return [generators] * rows
    gens = list(generators)
    if len(gens) != rows:
        raise ValueError(f"{rows} prompts but {len(gens)} generators")
    return gens


# --- drafting and acceptance, per row -------------------------------------------------------


def row_chooser(temperature: float, top_p: float, generators: Sequence[torch.Generator | None], greedy_draft: bool):
    """`metattt.spec.decode.chooser` with a leading row dim: logits (R, n, V) -> tokens (R, n) and
    q (R, n, V) (None when greedy). Row b samples from generators[b], as its request alone does."""

    def choose(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if temperature == 0.0:
            return logits.argmax(-1), None
        q = sampling_probs(logits, temperature, top_p)  # (R, n, V)
        if greedy_draft:
            tokens = q.argmax(-1)
            return tokens, F.one_hot(tokens, q.shape[-1]).to(q.dtype)
        return torch.stack([sample_tokens(q[b], g) for b, g in enumerate(generators)]), q

    return choose


def accept_rows(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, temperature: float,
                top_p: float, rule: str, generators: Sequence[torch.Generator | None]) -> tuple[list[int], list[int]]:
    """Each row's verification: logits (R, S, V) of the target on [last, d_1..d_{S-1}], drafts (R, S-1),
    q (R, S-1, V) | None -> accepted drafts per row and the target's own token after them.

    Greedy is one vectorised longest-prefix match (what `accept_greedy` does per row); the sampling
    rules run per row with that row's generator, so each consumes random numbers as alone.
    """
    if temperature == 0.0:
        best = logits.argmax(-1)  # (R, S)
        a = (drafts == best[:, :-1]).long().cumprod(1).sum(1)  # (R,)
        return a.tolist(), best.gather(1, a[:, None])[:, 0].tolist()
    p = sampling_probs(logits, temperature, top_p)  # (R, S, V)
    accept = ACCEPT_RULES[rule]  # looked up per call, as in decode.py, so tests can swap a rule in
    out = [accept(p[b], q[b], drafts[b], g) for b, g in enumerate(generators)]
    return [a for a, _ in out], [t for _, t in out]


class _Method(nn.Module):
    """Runs a method of `model` as its forward, so functional_call can swap fast weights in around
    any drafter method (`draft_rows`, `extend_cache`, `context_kv`), not only the forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class RowDrafter:
    """The drafter with each row's own fast weights `lora` ((R, ...) under peft's names; applied by
    metattt.models.batched_lora, whose context the caller holds), or with the model's own weights
    shared by every row when `lora` is None."""

    def __init__(self, model: nn.Module, lora: ParamDict | None):
        self.model, self.lora = model, lora
        self._call = _Method(model)

    def __call__(self, method: str, *args, **kwargs):
        if self.lora is None:
            return getattr(self.model, method)(*args, **kwargs)
        params = {f"model.{n}": t for n, t in self.lora.items()}
        return functional_call(self._call, params, (method, *args), kwargs, strict=False)

    def rows(self, index: torch.Tensor) -> RowDrafter:
        return RowDrafter(self.model, None if self.lora is None else {n: t[index] for n, t in self.lora.items()})

    def row(self, b: int) -> RowDrafter:
        return self.rows(torch.tensor([b]))

    def set_row(self, b: int, params: ParamDict) -> None:
        if self.lora is None:
            raise RuntimeError("set_row needs per-row fast weights (lora=)")
        for n, t in self.lora.items():
            t[b] = params[n]


# --- the batch's caches ----------------------------------------------------------------------


@dataclass
class _Batch:
    """The rows still decoding: their request indices and, in one slot layout (module doc), the
    target cache, the drafter's context cache, each slot's liveness and position, and (online
    updates only) each slot's target features."""

    rows: list[int]  # request index of each row
    cache: Any  # transformers DynamicCache: per layer (R, kv, T, d)
    valid: torch.Tensor  # (R, T) bool: live slots
    pos: torch.Tensor  # (R, T) position of each slot (anything on dead ones)
    gens: list[torch.Generator | None]
    ctx: ContextCache | None = None  # drafter context, same slots; ctx.valid is `valid`
    drafter: RowDrafter | None = None
    feats: torch.Tensor | None = None  # (R, T, n·H)

    def append(self, positions: torch.Tensor, live: torch.Tensor, features: torch.Tensor | None) -> None:
        """Slots a target forward just appended to every row: positions (R, s), live (R, s), features (R, s, n·H)."""
        self.valid = torch.cat([self.valid, live], 1)
        self.pos = torch.cat([self.pos, positions], 1)
        if self.feats is not None and features is not None:
            self.feats = torch.cat([self.feats, features], 1)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (indices into the current rows)."""
        idx = torch.tensor(keep, device=self.valid.device)
        self.cache.batch_select_indices(idx)
        self.valid, self.pos = self.valid[idx], self.pos[idx]
        if self.feats is not None:
            self.feats = self.feats[idx]
        if self.ctx is not None:
            self.ctx = ContextCache([(k[idx], v[idx]) for k, v in self.ctx.kv], self.ctx.length,
                                    self.ctx.valid[idx] if self.ctx.valid is not None else None)
        if self.drafter is not None:
            self.drafter = self.drafter.rows(idx)
        self.rows = [self.rows[i] for i in keep]
        self.gens = [self.gens[i] for i in keep]

    def commit_first(self, tokens: list[list[int]], first: list[int], eos: frozenset[int], limits: list[int],
                     end: list[float], now: float) -> None:
        """Commit each row's first token (the prefill's) and keep only the rows that go on; a row that
        ends here gets `end[b] = now`."""
        keep = []
        for b in range(len(self.rows)):
            if limits[b] <= 0 or commit_tokens(tokens[b], [first[b]], eos, limits[b])[1]:
                end[b] = now
            else:
                keep.append(b)
        if len(keep) < len(self.rows) and keep:
            self.select(keep)
        self.rows = keep

    def dead_slots(self) -> int:
        """Slots beyond what the row with the most live slots needs."""
        return self.valid.shape[1] - int(self.valid.sum(1).max())

    def compact(self) -> None:
        """Gather every row's live slots, in order, right-aligned into as many slots as the longest
        row needs; dead slots and surplus padding go."""
        R, T = self.valid.shape
        live = self.valid.sum(1)  # (R,)
        L = int(live.max())
        dest = (L - live)[:, None] + self.valid.long().cumsum(1) - 1  # (R, T): where each live slot goes
        dest = torch.where(self.valid, dest, L)  # dead slots all go to a scratch column, dropped below
        slots = torch.arange(T, device=self.valid.device).expand(R, T)
        src = torch.zeros(R, L + 1, dtype=torch.long, device=self.valid.device).scatter_(1, dest, slots)[:, :L]
        valid = torch.arange(L, device=self.valid.device)[None] >= (L - live)[:, None]  # (R, L)

        def take(x: torch.Tensor) -> torch.Tensor:  # (R, h, T, d) -> (R, h, L, d)
            return x.gather(2, src[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))

        for layer in self.cache.layers:
            layer.keys, layer.values = take(layer.keys), take(layer.values)
        if self.ctx is not None:
            self.ctx = ContextCache([(take(k), take(v)) for k, v in self.ctx.kv], L, valid)
        if self.feats is not None:
            self.feats = self.feats.gather(1, src[..., None].expand(-1, -1, self.feats.shape[-1]))
        self.valid, self.pos = valid, self.pos.gather(1, src)


def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise NotImplementedError(f"batched speculative decoding needs a DynamicCache of full-attention layers "
                                  f"(it gathers their slots); this target's cache has {kinds}")


def _prefill_batch(target, prompts: list[torch.Tensor], temperature: float, top_p: float,
                   generators: list[torch.Generator | None]):
    """Left-padded prompts through the target -> (the batch's slots, prefill output, first tokens)."""
    R, C = len(prompts), max(p.numel() for p in prompts)
    device = prompts[0].device
    ids = torch.zeros(R, C, dtype=torch.long, device=device)  # padding ids: any token, never attended to
    valid = torch.zeros(R, C, dtype=torch.bool, device=device)
    pos = torch.zeros(R, C, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        P = p.numel()
        ids[b, C - P:], valid[b, C - P:], pos[b, C - P:] = p, True, torch.arange(P, device=device)
    out = target(ids, attention_mask=valid.long(), use_cache=True, logits_to_keep=1, position_ids=pos)
    _check_cache(out.past_key_values)
    logits = out.logits[:, -1]  # (R, V): every row's last prompt token sits in the last slot
    if temperature == 0.0:
        first = logits.argmax(-1).tolist()
    else:
        first = [pick_token(logits[b], temperature, top_p, g) for b, g in enumerate(generators)]
    batch = _Batch(rows=list(range(R)), cache=out.past_key_values, valid=valid, pos=pos, gens=list(generators))
    return batch, out, first


def _stop_reason(tokens: list[int], eos: frozenset[int]) -> str:
    return "eos" if tokens and tokens[-1] in eos else "length"


# --- target-only decoding ---------------------------------------------------------------------


@torch.no_grad()
def target_generate_batch(
    target,
    prompts: Sequence[torch.Tensor | Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generators: Generators = None,
    max_batch_size: int | None = MAX_BATCH_SIZE,
) -> list[GenerationResult]:
    """`metattt.spec.decode.target_generate` of R prompts in one batch, one decode forward per
    step for every row still going; one GenerationResult per prompt, in order. `max_new_tokens`:
    one budget for every row, or one per row; `generators` as in `speculative_generate_batch`."""
    check_sampling_args(temperature, top_p)
    prompts, limits = as_prompt_list(prompts, max_new_tokens, max_positions(target), max_batch_size)
    R = len(prompts)
    gens = row_generators(generators, R)
    eos = eos_token_set(eos_token_id)
    device = prompts[0].device
    clock = _Clock(device)
    start = clock()
    if max(limits) <= 0:
        return [GenerationResult([], 0, [], [], [], 0.0, clock() - start) for _ in prompts]
    batch, _, first = _prefill_batch(target, prompts, temperature, top_p, gens)
    prefill_done = clock()
    tokens: list[list[int]] = [[] for _ in prompts]
    steps, end = [0] * R, [0.0] * R
    batch.commit_first(tokens, first, eos, limits, end, prefill_done)
    while batch.rows:
        R = len(batch.rows)
        last = torch.tensor([[tokens[r][-1]] for r in batch.rows], device=device)  # (R, 1)
        at = torch.tensor([[prompts[r].numel() + len(tokens[r]) - 1] for r in batch.rows], device=device)  # (R, 1)
        live = batch.valid.new_ones(R, 1)
        out = target(last, attention_mask=torch.cat([batch.valid, live], 1).long(), past_key_values=batch.cache,
                     use_cache=True, position_ids=at)
        batch.cache = out.past_key_values
        batch.append(at, live, None)
        logits = out.logits[:, -1]  # (R, V)
        if temperature == 0.0:
            picked = logits.argmax(-1).tolist()
        else:
            picked = [pick_token(logits[i], temperature, top_p, g) for i, g in enumerate(batch.gens)]
        now = clock()
        keep = []
        for i, r in enumerate(batch.rows):
            steps[r] += 1
            if commit_tokens(tokens[r], [picked[i]], eos, limits[r])[1]:
                end[r] = now
            else:
                keep.append(i)
        if not keep:
            break
        if len(keep) < R:
            batch.select(keep)
            if batch.dead_slots() > 0:  # a longer row left: drop the padding it leaves behind
                batch.compact()
    return [GenerationResult(
        tokens=tokens[b], num_steps=steps[b], accepted=[0] * steps[b], position_accepted=[], position_reached=[],
        prefill_time=prefill_done - start, wall_time=end[b] - start, verify_time=end[b] - prefill_done,
        stop_reason=_stop_reason(tokens[b], eos)) for b in range(len(prompts))]


# --- speculative decoding ---------------------------------------------------------------------


def prefill_ttt_batched(model: nn.Module, init: ParamDict, prompts: Sequence[torch.Tensor], ttt: TTTConfig,
                        seeds: int | Sequence[int] = 0, feature_head: nn.Module | None = None,
                        losses: list[list[float]] | None = None) -> Callable[[list[torch.Tensor]], ParamDict]:
    """An `on_prefill` hook for `speculative_generate_batch`: `metattt.ttt.tasks.prefill_ttt` of every
    row at once (`ttt_adapt_batched`, row b's anchors drawn from a generator seeded with seeds[b],
    as its request alone draws them), returning the adapted LoRA of every row, (R, ...) each.
    Each row's inner losses are appended to `losses` (one list per row)."""
    rows = [torch.as_tensor(p).reshape(1, -1) for p in prompts]
    seed_list = [seeds] * len(rows) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) != len(rows):
        raise ValueError(f"{len(rows)} prompts but {len(seed_list)} seeds")

    def adapt(features: list[torch.Tensor]) -> ParamDict:
        gens = [torch.Generator().manual_seed(s) for s in seed_list]
        results = ttt_adapt_batched(model, init, [p.to(f.device) for p, f in zip(rows, features)], features, ttt,
                                    gens, feature_head)
        if losses is not None:
            losses.extend([float(x) for x in r.losses] for r in results)
        return stack_lora([r.params for r in results])

    return adapt


@torch.no_grad()
def speculative_generate_batch(
    target,
    drafter,
    prompts: Sequence[torch.Tensor | Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rule: str = "exact",
    generators: Generators = None,
    greedy_draft: bool = False,
    lora: ParamDict | None = None,
    on_prefill: Callable[[list[torch.Tensor]], ParamDict | None] | None = None,
    online: Sequence[Any] | None = None,
    max_batch_size: int | None = MAX_BATCH_SIZE,
    compact_slack: int | None = None,
) -> list[GenerationResult]:
    """`metattt.spec.decode.speculative_generate` of R prompts in one batch -> one GenerationResult
    per prompt, in order (the cache design: module doc).

    prompts: R × (P_i,) or (1, P_i) token ids, lengths may differ; at most `max_batch_size` (None:
        no limit), each with room for its `max_new_tokens` in the target's context.
    max_new_tokens: one budget for every row, or one per row.
    temperature, top_p, rule, greedy_draft: as speculative_generate (rule "dflash" included).
    generators: one per row (each row then samples as its request alone would with it), or one
        shared by every row, or None.
    lora: each row's fast weights (R, ...) under peft's names (`stack_lora` / `repeat_lora`); the
        drafter must be peft-wrapped. None: every row drafts with the drafter's own weights.
    on_prefill(features): called once, with gradients enabled, with each row's prompt features
        [(1, P_i, n·H)] from the batched prefill; may return per-row fast weights (R, ...) that
        replace `lora` (prefill TTT: `prefill_ttt_batched`).
    online: one OnlineTTT (metattt.ttt.online) per row, or None. Row b's is called after each of its
        verification steps with its committed tokens (1, L), their features (1, L-1, n·H) and its
        context K/V of them (a one-request ContextCache, gathered from the batch's slots); its
        `params` (None: set here to the row's weights before the first call) go into row b after an
        update, and row b's context K/V is rebuilt when the call returns True.
    compact_slack: compact the caches once they hold more dead slots than this beyond the longest
        row; None: max(4·S, a quarter of the longest row's live slots); 0: after every step.
    """
    check_sampling_args(temperature, top_p)
    if temperature > 0:
        rule, greedy_draft = resolve_rule(rule, greedy_draft)
    if (on_prefill is not None or online is not None) and torch.is_inference_mode_enabled():
        raise RuntimeError("on_prefill / online (TTT) take gradients, which torch.inference_mode() forbids: call "
                           "speculative_generate_batch outside it (metattt.serve.TTTSpeculator.generate does)")
    prompts, limits = as_prompt_list(prompts, max_new_tokens, max_positions(target), max_batch_size)
    R = len(prompts)
    gens = row_generators(generators, R)
    if online is not None and len(online) != R:
        raise ValueError(f"{R} prompts but {len(online)} online updaters (one per row)")
    if compact_slack is not None and compact_slack < 0:
        raise ValueError(f"compact_slack must be >= 0, got {compact_slack}")
    eos = eos_token_set(eos_token_id)
    S = int(drafter.config.block_size)
    device = prompts[0].device
    clock = _Clock(device)
    start = clock()
    if max(limits) <= 0:
        return [GenerationResult([], 0, [], [0] * (S - 1), [0] * (S - 1), 0.0, clock() - start) for _ in prompts]

    tokens: list[list[int]] = [[] for _ in prompts]
    accepted: list[list[int]] = [[] for _ in prompts]
    pos_acc = [[0] * (S - 1) for _ in prompts]
    pos_reach = [[0] * (S - 1) for _ in prompts]
    step_starts: list[list[int]] = [[] for _ in prompts]
    draft_time, verify_time, online_time = [0.0] * R, [0.0] * R, [0.0] * R
    rebuilds, end = [0] * R, [0.0] * R

    batch, out, first = _prefill_batch(target, prompts, temperature, top_p, gens)
    C = batch.valid.shape[1]
    adapt_time = 0.0
    if on_prefill is not None:
        t0 = clock()
        with torch.enable_grad():
            adapted = on_prefill([out.features[b:b + 1, C - p.numel():] for b, p in enumerate(prompts)])
        if adapted is not None:
            lora = adapted
        adapt_time = clock() - t0
    if online is not None and lora is None:
        lora = repeat_lora(copy_lora(drafter), R)  # each row's updates need weights of their own
    if lora is not None:
        bad = {n: tuple(t.shape) for n, t in lora.items() if t.dim() < 1 or t.shape[0] != R}
        if bad:
            raise ValueError(f"lora must hold one row per prompt ({R}); got {bad}")
        lora = {n: t.detach().clone() for n, t in lora.items()}  # rows are rewritten in place by online updates
    seen: list[Any] = []
    if online is not None:
        for b, o in enumerate(online):
            if getattr(o, "params", None) is None:
                o.params = {n: t[b].clone() for n, t in lora.items()}
            seen.append(o.params)

    with batched_lora(drafter) if lora is not None else contextlib.nullcontext():
        batch.drafter = RowDrafter(drafter, lora)
        batch.ctx = batch.drafter("extend_cache", None, out.features, positions=batch.pos, valid=batch.valid)
        if online is not None:
            batch.feats = out.features  # (R, C, n·H): context rebuilds need every live slot's features
        prefill_done = clock()
        batch.commit_first(tokens, first, eos, limits, end, prefill_done)

        offsets = torch.arange(S, device=device)  # block position of each verified input
        while batch.rows:
            rows = batch.rows
            R = len(rows)
            for r in rows:
                step_starts[r].append(len(tokens[r]))
            t0 = clock()
            last = torch.tensor([tokens[r][-1] for r in rows], device=device)  # (R,)
            anchor = torch.tensor([prompts[r].numel() + len(tokens[r]) - 1 for r in rows], device=device)  # (R,)
            drafts, q = batch.drafter("draft_rows", last, anchor, batch.ctx,
                                      row_chooser(temperature, top_p, batch.gens, greedy_draft))  # (R, S-1), q
            t1 = clock()

            verify_ids = torch.cat([last[:, None], drafts], 1)  # (R, S)
            positions = anchor[:, None] + offsets  # (R, S)
            mask = torch.cat([batch.valid, batch.valid.new_ones(R, S)], 1)  # (R, T + S)
            out = target(verify_ids, attention_mask=mask.long(), past_key_values=batch.cache, use_cache=True,
                         position_ids=positions)  # logits (R, S, V)
            batch.cache = out.past_key_values
            a_rows, nxt_rows = accept_rows(out.logits, drafts, q, temperature, top_p, rule, batch.gens)
            drafted = drafts.tolist()
            kept, keep = [], []
            for i, r in enumerate(rows):
                a = a_rows[i]
                accepted[r].append(a)
                for k in range(min(a + 1, S - 1)):  # d_1..d_a accepted; d_{a+1} checked and rejected
                    pos_reach[r][k] += 1
                    pos_acc[r][k] += k < a
                m, done = commit_tokens(tokens[r], drafted[i][:a] + [nxt_rows[i]], eos, limits[r])
                kept.append(m)  # [last, d_1..d_{m-1}]: the committed inputs but the newest token
                if not done:
                    keep.append(i)
            live = offsets[None] < torch.tensor(kept, device=device)[:, None]  # (R, S)
            batch.append(positions, live, out.features)
            t2 = clock()
            for i, r in enumerate(rows):
                verify_time[r] += t2 - t1
                if i not in keep:
                    draft_time[r] += t1 - t0
                    end[r] = t2
            if not keep:
                break
            features = out.features
            if len(keep) < R:
                idx = torch.tensor(keep, device=device)
                batch.select(keep)
                features, live, positions = features[idx], live[idx], positions[idx]
            # the context cache gets the same slots as the target's (dead ones masked)
            batch.ctx = batch.drafter("extend_cache", batch.ctx, features, positions=positions, valid=live)
            t3 = clock()
            for r in batch.rows:
                draft_time[r] += (t1 - t0) + (t3 - t2)

            if online is not None:
                for i, r in enumerate(batch.rows):
                    t4 = clock()
                    ids = torch.cat([prompts[r], prompts[r].new_tensor(tokens[r])])[None]  # (1, P + n)
                    feats = batch.feats[i][batch.valid[i]][None]  # (1, P + n - 1, n·H), in position order
                    step = len(accepted[r]) - 1
                    cache = None
                    if online[r].due(step):  # the row's committed positions, in order, as `feats`
                        slots = batch.valid[i]
                        cache = ContextCache(kv=[(k[i:i + 1][:, :, slots], v[i:i + 1][:, :, slots])
                                                 for k, v in batch.ctx.kv], length=feats.shape[1])
                    with torch.enable_grad():
                        rebuild = online[r](step, ids, feats, cache)
                    if online[r].params is not seen[r]:  # an update: the row drafts with its new weights
                        seen[r] = online[r].params
                        batch.drafter.set_row(i, online[r].params)
                    if rebuild:
                        kv = batch.drafter.row(i)("context_kv", batch.feats[i:i + 1], batch.pos[i:i + 1])
                        for (k, v), (k1, v1) in zip(batch.ctx.kv, kv):
                            k[i], v[i] = k1[0], v1[0]
                        rebuilds[r] += 1
                    online_time[r] += clock() - t4

            slack = compact_slack if compact_slack is not None else max(4 * S, int(batch.valid.sum(1).max()) // 4)
            if batch.dead_slots() > slack:
                batch.compact()

    prefill_time = prefill_done - start - adapt_time
    return [GenerationResult(
        tokens=tokens[b], num_steps=len(accepted[b]), accepted=accepted[b], position_accepted=pos_acc[b],
        position_reached=pos_reach[b], prefill_time=prefill_time, wall_time=end[b] - start,
        draft_time=draft_time[b], verify_time=verify_time[b], adapt_time=adapt_time, step_starts=step_starts[b],
        online_time=online_time[b], online_updates=rebuilds[b], stop_reason=_stop_reason(tokens[b], eos))
        for b in range(len(prompts))]
