"""Online test-time training during decoding: the drafter keeps learning from what the target
verifies, within one request.

Every verification forward already computed the target features of the tokens it committed, and
the committed tokens are the target's own outputs: exact supervision at no target cost. Every
`online.every` verification steps, `OnlineTTT` runs `online.steps` steps of the one inner loop
(metattt.ttt.inner) from the *current* fast weights, on blocks anchored in the most recent
`online.window` committed tokens (optionally mixed with blocks of the prompt), each block
predicting committed tokens from the features before its anchor — what the drafter will be asked
at the next steps. It sees only committed tokens: the caller passes nothing else.

Where LoRA sits on modules that compute the drafter's cached context keys/values (`fc`, `k_proj`,
`v_proj` for the block kind), an update changes that cache: `__call__` says so and the decoding
loop rebuilds the cache from the stored features (no target work), so drafts never mix old and
new weights. An update reads that cache too where it may (`OnlineConfig.detach_context`, or LoRA
off those modules): the drafter's K/V of older positions as constants, not recomputed from the
features. Nothing carries over to the next request: a new `OnlineTTT` starts from the weights
the request's prefill TTT produced (or its init).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from metattt.anchors import sample_anchors, valid_anchor_mask
from metattt.config import OnlineConfig, TTTConfig
from metattt.models.base import ContextCache
from metattt.models.lora import copy_lora, lora_parameters, set_lora
from metattt.models.registry import kind_of
from metattt.ttt.inner import Functional, ParamDict, inner_loop
from metattt.ttt.tasks import context_loss


def online_anchors(length: int, prompt_len: int, block_size: int, cfg: OnlineConfig,
                   generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors (1, N) and anchor_ok (1, N) of one online update over `length` committed tokens:
    up to `cfg.num_anchors` blocks whose every label is committed, anchored in the last
    `cfg.window` tokens, plus up to `cfg.prompt_anchors` blocks inside the prompt."""
    ones = torch.ones(1, length, dtype=torch.long, device=device)
    recent = valid_anchor_mask(ones, None, block_size, lo=max(1, length - cfg.window))
    anchors, ok = sample_anchors(recent, cfg.num_anchors, generator)
    if cfg.prompt_anchors > 0:
        in_prompt = valid_anchor_mask(ones, None, block_size, hi=prompt_len)
        pa, pok = sample_anchors(in_prompt, cfg.prompt_anchors, generator)
        anchors, ok = torch.cat([anchors, pa], 1), torch.cat([ok, pok], 1)
    return anchors, ok


class OnlineTTT:
    """The online updates of one request (a `speculative_generate(..., online=...)` hook).

    `start`: the fast weights decoding begins with; None: whatever LoRA `model` carries at the first
    update (what prefill TTT wrote, or the init). They are written into `model` on every update.
    `ttt` gives the inner lr(s), clip, objective and γ; `cfg` when, how much and on what to train
    (what it leaves at None comes from `ttt.online`, the online settings the init was trained for).
    """

    def __init__(self, model: nn.Module, start: ParamDict | None, ttt: TTTConfig, cfg: OnlineConfig,
                 prompt_len: int, seed: int = 0, feature_head: nn.Module | None = None):
        self.model, self.ttt, self.prompt_len = model, ttt, prompt_len
        self.cfg = cfg.resolved(ttt.online)
        self.params = None if start is None else {n: t.detach().clone() for n, t in start.items()}
        self.generator = torch.Generator().manual_seed(seed)
        self.feature_head = feature_head
        self.updates, self.skipped, self.time = 0, 0, 0.0
        lora_on = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_parameters(model)}
        self.changes_context = bool(lora_on & set(kind_of(model).context_modules))
        self.losses: list[float] = []

    def due(self, step: int) -> bool:
        """Whether the call after verification step `step` updates (every `every` steps)."""
        return self.cfg.every > 0 and (step + 1) % self.cfg.every == 0

    def constant_context(self, cache: ContextCache | None, length: int) -> ContextCache | None:
        """The slots of the decoding cache (`length` committed positions) an update reads as they
        are: all of them where LoRA does not reach the context K/V (they are what the update would
        compute), those before the window with `detach_context`, else none."""
        if cache is None or (self.changes_context and not self.cfg.detach_context):
            return None
        if cache.length != length:
            raise ValueError(f"the drafter's context cache holds {cache.length} positions, the committed features {length}")
        keep = length if not self.changes_context else max(0, length - self.cfg.window)
        return ContextCache(kv=[(k[:, :, :keep].detach(), v[:, :, :keep].detach()) for k, v in cache.kv], length=keep)

    def __call__(self, step: int, ids: torch.Tensor, features: torch.Tensor, cache: ContextCache | None = None) -> bool:
        """After verification step `step` (0-based): `ids` (1, L) every committed token (prompt
        included), `features` (1, ≥ L-1, n·H) the target features of committed positions, `cache`
        the drafter's context cache of those L-1 positions (None: every update recomputes the
        context K/V from `features`). Returns True when the drafter's context cache must be
        rebuilt (an update changed its K/V)."""
        if not self.due(step):
            return False
        t0 = time.perf_counter()
        if self.params is None:
            self.params = copy_lora(self.model)
        S = self.model.config.block_size
        L = ids.shape[1]
        anchors, ok = online_anchors(L, self.prompt_len, S, self.cfg, self.generator, ids.device)
        if not bool(ok.any()):
            return False
        loss_mask = torch.ones_like(ids)
        feats = features[:, : L - 1]  # every label of a block is committed; its features stop before the anchor
        constant = self.constant_context(cache, L - 1)
        gamma = self.ttt.gamma_for(S)
        lr = self.cfg.lr if self.cfg.lr is not None else self.ttt.lr_for(list(self.params))

        def loss_fn(params: ParamDict, _step: int) -> torch.Tensor:
            return context_loss(Functional(self.model, params), ids, feats, loss_mask, anchors, ok,
                                self.ttt.objective, gamma, self.feature_head, cache=constant)

        start = {n: t.detach().clone().requires_grad_(True) for n, t in self.params.items()}
        with torch.enable_grad():
            out = inner_loop(loss_fn, start, self.cfg.steps, lr, self.ttt.clip)
        if out.skipped:
            self.skipped += 1
            self.time += time.perf_counter() - t0
            return False
        self.params = {n: t.detach() for n, t in out.params.items()}
        self.losses.extend(float(x.detach()) for x in out.losses)
        set_lora(self.model, self.params)
        self.updates += 1
        self.time += time.perf_counter() - t0  # the cache rebuild is timed by the decoding loop
        return self.changes_context
