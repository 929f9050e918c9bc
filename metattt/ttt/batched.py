"""Test-time training of R requests at once: one batched forward and one backward per inner step.

`ttt_adapt_batched` is R calls of `metattt.ttt.tasks.ttt_adapt` computed together. Prompts of
different lengths are right-padded to the longest and masked (`context_valid`); each row keeps its
own LoRA slice (metattt.models.batched_lora), so the gradient of the summed per-row losses is, row
by row, that row's own gradient. The update is `metattt.ttt.inner.inner_loop` itself, with each
row's gradient clipped by its own global norm and stepped with the same (Meta-SGD) lrs as alone.

What makes it equal to the single-request computation, row by row:
- anchors are drawn per row from that row's generator, from its own (1, P_i) prompt, exactly
  as `ttt_adapt` draws them (so a shared generator gives what R sequential calls give);
- each row's loss is normalised by its own weights (`batched_context_loss`), not the batch's;
- padding is never seen: a block sees context strictly before its anchor, and anchors lie
  inside their row's prompt. (RoPE types whose frequencies depend on the sequence length,
  dynamic NTK and longrope, see the padded length; below the length where they start to
  rescale they are unaffected.)
A row whose inner loss or gradient turns non-finite would make the summed loss non-finite and
`inner_loop` would drop the whole batch; then every row is recomputed alone with `ttt_adapt`
from the same generator states, so each row gets exactly what it would have got alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metattt.anchors import block_targets, valid_anchor_mask
from metattt.losses import draft_hidden
from metattt.models.batched_lora import batched_lora, repeat_lora, stack_lora, unstack_lora
from metattt.ttt.inner import Functional, InnerResult, ParamDict, inner_loop
from metattt.ttt.tasks import Task, TTTConfig, TTTObjective, context_anchors, feature_error, ttt_adapt


def pad_prompts(
    prompts: Sequence[torch.Tensor],  # R × (1, P_i)
    features: Sequence[torch.Tensor],  # R × (1, P_i, n·H)
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ragged prompts -> ids (R, C), features (R, C, n·H), valid (R, C) bool."""
    if not prompts:
        raise ValueError("no prompts: give at least one (1, P) prompt")
    if len(prompts) != len(features):
        raise ValueError(f"{len(prompts)} prompts but {len(features)} feature tensors")
    for i, (p, f) in enumerate(zip(prompts, features)):
        if p.dim() != 2 or p.shape[0] != 1:
            raise ValueError(f"prompt {i} has shape {tuple(p.shape)}: each prompt is (1, P)")
        if f.dim() != 3 or f.shape[:2] != p.shape:
            raise ValueError(f"features {i} have shape {tuple(f.shape)}, prompt {i} is {tuple(p.shape)}: "
                             "want (1, P, n·H)")
    R, C = len(prompts), max(p.shape[1] for p in prompts)
    ref = features[0]
    ids = torch.full((R, C), pad_id, dtype=prompts[0].dtype, device=prompts[0].device)
    feats = ref.new_zeros(R, C, ref.shape[-1])
    valid = torch.zeros(R, C, dtype=torch.bool, device=ids.device)
    for r, (p, f) in enumerate(zip(prompts, features)):
        P = p.shape[1]
        ids[r, :P], feats[r, :P], valid[r, :P] = p[0], f[0], True
    return ids, feats, valid


def pad_anchors(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (1, N_i) anchors and flags -> (R, N) with anchor 0 / flag False after each row's own."""
    N = max(1, max(a.shape[1] for a, _ in rows))
    anchors = torch.zeros(len(rows), N, dtype=torch.long, device=rows[0][0].device)
    ok = torch.zeros(len(rows), N, dtype=torch.bool, device=anchors.device)
    for r, (a, o) in enumerate(rows):
        anchors[r, : a.shape[1]], ok[r, : o.shape[1]] = a[0], o[0]
    return anchors, ok


@dataclass
class Scored:
    """The drafts a batched loss supervises. They depend on the anchors alone, so they are found once
    and every inner step reuses them: no step has to ask the device which drafts count (a sync)."""

    anchors: torch.Tensor  # (R, N)
    labels: torch.Tensor  # (R, N, K)
    weights: torch.Tensor  # (R, N, K), 0 where unsupervised
    index: torch.Tensor  # (M,) flat positions in R·N·K of the supervised drafts
    row: torch.Tensor  # (M,) the row of each
    block: int  # block length the drafter reads: S, or 2 for next-token (clm) blocks


def score_drafts(ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, anchor_ok: torch.Tensor,
                 block: int, gamma: float) -> Scored:
    """`block_targets` of (R, T) rows and the supervised drafts among them."""
    labels, w = block_targets(ids, loss_mask, anchors, anchor_ok, block, gamma)  # (R, N, K) each
    index = (w > 0).flatten().nonzero().flatten()  # (M,): the one sync, outside any inner loop
    row = index // (w.shape[1] * w.shape[2])
    return Scored(anchors, labels, w, index, row, block)


def chunk_rows(vocab_size: int) -> int:
    """Drafts per chunk of logits: about 4M logits, at least 256 drafts. R tasks' logits in one piece
    outgrow the CPU's caches, and the elementwise passes of a second-order backward then run from
    memory; one task alone stays inside them."""
    return max(256, (1 << 22) // vocab_size)


def _row_weighted_ce(
    hidden: torch.Tensor,  # (R, N, K, H) hidden state behind each draft
    lm_head,
    scored: Scored,
    chunk_size: int = 4096,
    correct: torch.Tensor | None = None,  # (R, N, K) bool, filled in: argmax == label where supervised
) -> torch.Tensor:
    """Per row Σ w·CE / Σ w -> (R,), `decayed_draft_ce` of each row alone (0 for a row without weight)."""
    R = hidden.shape[0]
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    # only supervised drafts get logits
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored.index)  # (M, H)
    y, w = scored.labels.flatten()[scored.index], scored.weights.flatten()[scored.index]  # (M,) each
    total = torch.zeros(R, device=hidden.device, dtype=acc_dtype)
    hits = torch.zeros_like(y, dtype=torch.bool) if correct is not None else None  # (M,)
    # chunks bound the live fp32 logits, as decayed_draft_ce does at real vocabulary sizes
    for start in range(0, h.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logits = lm_head(h[chunk]).to(acc_dtype)  # (m, V)
        ce = F.cross_entropy(logits, y[chunk], reduction="none")  # (m,)
        total = total.index_add(0, scored.row[chunk], ce * w[chunk])
        if hits is not None:
            hits[chunk] = logits.detach().argmax(-1) == y[chunk]
    if correct is not None:
        correct.view(-1)[scored.index] = hits
    if h.shape[0] == 0:  # nothing supervised anywhere: zero losses that still have a graph
        total = total + hidden.sum().to(acc_dtype) * 0.0
    return total / scored.weights.sum((1, 2)).clamp_min(1e-8)


@dataclass
class ContextTargets:
    """What `batched_context_loss` scores in the contexts, fixed for all inner steps."""

    block: Scored | None  # blocks at the anchors (block and feature objectives)
    clm: Scored | None  # next-token blocks at every trained position (clm objective; None: none or no such position)


def context_targets(
    ids: torch.Tensor,  # (R, C) context tokens, right-padded
    valid: torch.Tensor,  # (R, C) bool, False on padding
    anchors: torch.Tensor,  # (R, N)
    anchor_ok: torch.Tensor,  # (R, N)
    objective: TTTObjective,
    gamma: float,
    block_size: int,
    loss_mask: torch.Tensor | None = None,  # (R, C); None: every valid token (a prompt)
) -> ContextTargets:
    """The drafts each objective of `batched_context_loss` supervises (found once, see `Scored`)."""
    prompt = loss_mask is None
    loss_mask = valid.long() if prompt else loss_mask * valid
    block = clm = None
    if objective.block or objective.feature:
        block = score_drafts(ids, loss_mask, anchors, anchor_ok, block_size, gamma)
    if objective.clm:
        if prompt:
            # every position 1..P-2 of a row of P tokens has a next prompt token (valid_anchor_mask with blocks of 2)
            lengths = valid.sum(-1).tolist()
            per_row = [torch.arange(1, max(1, P - 1), device=ids.device)[None] for P in lengths]
            a, a_ok = pad_anchors([(p, torch.ones_like(p, dtype=torch.bool)) for p in per_row])
        else:  # context_loss's positions: a next token inside the row that its loss mask trains on
            a, a_ok = _clm_anchors(valid_anchor_mask(loss_mask, valid, 2))
        if a_ok.any():
            clm = score_drafts(ids, loss_mask, a, a_ok, 2, gamma)
    return ContextTargets(block, clm)


def batched_context_loss(
    f,  # drafter-like callable over R rows: Functional(model, batched fast weights) in batched_lora
    ids: torch.Tensor,  # (R, C) context tokens, right-padded
    features: torch.Tensor,  # (R, C, n·H)
    valid: torch.Tensor,  # (R, C) bool, False on padding
    anchors: torch.Tensor,  # (R, N)
    anchor_ok: torch.Tensor,  # (R, N)
    objective: TTTObjective,
    gamma: float,
    feature_head: torch.nn.Module | None = None,
    loss_mask: torch.Tensor | None = None,  # (R, C); None: every valid token (a prompt)
    targets: ContextTargets | None = None,  # `context_targets` of these arguments, found once for every step
) -> torch.Tensor:
    """`metattt.ttt.tasks.context_loss` of every row at once -> (R,), each row normalised alone."""
    if objective.attn_entropy:
        raise ValueError("objective.attn_entropy is a mean over the whole forward, not a sum of per-row terms: "
                         "batched TTT cannot give each row its own; adapt such requests with ttt_adapt")
    cfg = f.config
    S = cfg.block_size
    R = ids.shape[0]
    if targets is None:
        targets = context_targets(ids, valid, anchors, anchor_ok, objective, gamma, S, loss_mask)
    total = torch.zeros(R, device=ids.device, dtype=torch.promote_types(features.dtype, torch.float32))
    if targets.block is not None:
        hidden = draft_hidden(f, ids, anchors, S, cfg.mask_token_id, features, valid)  # (R, N, S-1, H)
        if objective.block:
            total = total + objective.block * _row_weighted_ce(hidden, f.logits, targets.block,
                                                               chunk_rows(cfg.vocab_size))
        if objective.feature:
            err = feature_error(feature_head, hidden, features, anchors, ids.shape[1])  # (R, N, S-1)
            m = targets.block.weights > 0
            total = total + objective.feature * (err * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)
    if targets.clm is not None:
        hidden = draft_hidden(f, ids, targets.clm.anchors, 2, cfg.mask_token_id, features, valid)
        total = total + objective.clm * _row_weighted_ce(hidden, f.logits, targets.clm, chunk_rows(cfg.vocab_size))
    return total


def _clm_anchors(ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) bool positions -> (R, M) anchors in increasing order and flags, M the most any row has."""
    C = ok.shape[1]
    key = torch.where(ok, torch.arange(C, device=ok.device), C)  # (R, C): invalid positions sort last
    M = max(1, int(ok.sum(-1).max()))
    anchors = key.sort(-1).values[:, :M]  # (R, M)
    flags = anchors < C
    return torch.where(flags, anchors, 0), flags


def batched_continuation_loss(
    f,  # drafter-like callable over R rows: the model (one adapter for every row) or batched fast weights
    ids: torch.Tensor,  # (R, T) whole sequences, right-padded
    features: torch.Tensor,  # (R, T, n·H)
    valid: torch.Tensor,  # (R, T) bool, False on padding
    scored: Scored,  # `score_drafts` of the continuation anchors
) -> tuple[torch.Tensor, torch.Tensor]:
    """`metattt.ttt.tasks.continuation_loss` of every row -> losses (R,) and correct (R, N, S-1)."""
    hidden = draft_hidden(f, ids, scored.anchors, scored.block, f.config.mask_token_id, features, valid)
    correct = torch.zeros_like(scored.labels, dtype=torch.bool)
    return _row_weighted_ce(hidden, f.logits, scored, chunk_rows(f.config.vocab_size), correct), correct


def _generators(generators, R: int) -> list[torch.Generator]:
    if generators is None:  # what ttt_adapt does without one: a fresh seed-0 generator per request
        return [torch.Generator().manual_seed(0) for _ in range(R)]
    if isinstance(generators, torch.Generator):  # shared: consumed row after row, as R sequential calls
        return [generators] * R
    if len(generators) != R:
        raise ValueError(f"{R} prompts but {len(generators)} generators")
    return list(generators)


def ttt_adapt_batched(
    model: torch.nn.Module,  # peft-wrapped drafter, either kind
    init: ParamDict | Sequence[ParamDict],  # one adapter for every row, or one per row (peft names)
    prompts: Sequence[torch.Tensor],  # R × (1, P_i), lengths may differ
    features: Sequence[torch.Tensor],  # R × (1, P_i, n·H)
    ttt: TTTConfig,
    generators: torch.Generator | Sequence[torch.Generator] | None = None,
    feature_head: torch.nn.Module | None = None,
) -> list[InnerResult]:
    """`ttt_adapt` of R prompts in one batched inner loop -> one InnerResult per prompt, in order.

    generators: one per prompt; or one shared, used row after row exactly as R sequential
        `ttt_adapt` calls would use it; None: each prompt gets ttt_adapt's default (seed 0).
    Each result holds that row's adapted LoRA under peft's names (detached), its inner losses,
    and `skipped` as ttt_adapt would report it. `init` is never modified.
    """
    ids, feats, valid = pad_prompts(prompts, features)
    R = ids.shape[0]
    inits = [dict(init)] * R if isinstance(init, dict) else list(init)
    if len(inits) != R:
        raise ValueError(f"{R} prompts but {len(inits)} initial adapters")
    if ttt.objective.attn_entropy:
        raise ValueError("objective.attn_entropy cannot be batched per row: adapt those requests with ttt_adapt")
    gens = _generators(generators, R)
    states = [g.get_state() for g in gens]  # to replay rows alone if the batch turns non-finite
    S = model.config.block_size
    rows = []
    for r, p in enumerate(prompts):
        task = Task(p, features[r], torch.ones_like(p), p.shape[1])
        rows.append(context_anchors(task, ttt.num_anchors, S, gens[r]))
    idle = [InnerResult(params={n: t.detach().clone() for n, t in inits[r].items()}) for r in range(R)]
    active = [r for r in range(R) if rows[r][1].any()] if ttt.steps > 0 else []
    if not active:
        return idle

    # rows with nothing to train on keep their init untouched, as ttt_adapt returns it early
    C = max(prompts[r].shape[1] for r in active)
    ids, feats, valid = ids[active, :C], feats[active, :C], valid[active, :C]
    anchors, ok = pad_anchors([rows[r] for r in active])
    shared = isinstance(init, dict)
    start = repeat_lora(inits[0], len(active)) if shared else stack_lora([inits[r] for r in active])
    start = {n: t.detach().clone().requires_grad_(True) for n, t in start.items()}  # (A, ...) each
    row_losses: list[torch.Tensor] = []
    gamma = ttt.gamma_for(S)  # None: by block size, as ttt_adapt reads it
    targets = context_targets(ids, valid, anchors, ok, ttt.objective, gamma, S)

    def loss_fn(params: ParamDict, step: int) -> torch.Tensor:
        per_row = batched_context_loss(Functional(model, params), ids, feats, valid, anchors, ok,
                                       ttt.objective, gamma, feature_head, targets=targets)  # (A,)
        row_losses.append(per_row.detach())
        return per_row.sum()  # row b's slice gets row b's gradient only

    with torch.enable_grad(), batched_lora(model):
        result = inner_loop(loss_fn, start, ttt.steps, ttt.lr_for(list(start)), ttt.clip,
                            create_graph=False, clip_per_row=True)
    if result.skipped:
        for g, state in zip(gens, states):
            g.set_state(state)
        return [ttt_adapt(model, inits[r], prompts[r], features[r], ttt, gens[r], feature_head) for r in range(R)]
    out = list(idle)
    for b, (r, params) in enumerate(zip(active, unstack_lora({n: t.detach() for n, t in result.params.items()}))):
        out[r] = InnerResult(params={n: t.clone() for n, t in params.items()},
                             losses=[step_losses[b] for step_losses in row_losses])
    return out
