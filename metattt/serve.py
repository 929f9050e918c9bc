"""Speculative decoding with prefill TTT from Python: what a serving loop calls per request.

    spec = TTTSpeculator.from_pretrained("checkpoints/tiny/target", meta_lora_path="checkpoints/tiny/meta_lora")
    out = spec.generate(prompt_ids, max_new_tokens=128)        # TTT on the prompt, then draft + verify
    out.tokens, out.tau, out.adapt_time
    outs = spec.generate([prompt_a, prompt_b, prompt_c], max_new_tokens=128)  # one batch: a list of results

Every request adapts the drafter's LoRA from the meta-learned initialization on the features of
its own prefill (`speculative_generate(..., on_prefill=...)`), so a request costs one target
prefill, k TTT steps and the decoding loop, and nothing carries over between requests. The
output is the target's own (greedy: token for token; sampling: in distribution), whatever the
drafter does. This is the loop `metattt eval` measures as the `ttt_meta` condition.

A list of prompts is one batch (metattt.spec.batched): one batched prefill, one batched TTT
(every row its own LoRA, `ttt_adapt_batched`), then drafting and verification of every row
together, each row accepting its own drafts and leaving the batch when it ends. Each row's result
is what that prompt gives alone (greedy: the same tokens and acceptances).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metattt.config import OnlineConfig
from metattt.export.meta_lora import adapter_base_drafter, load_ttt_adapter
from metattt.models.batched_lora import repeat_lora
from metattt.models.lora import copy_lora, set_lora
from metattt.models.registry import load_drafter
from metattt.models.target import FrozenTarget
from metattt.spec.batched import MAX_BATCH_SIZE, prefill_ttt_batched, speculative_generate_batch
from metattt.spec.decode import GenerationResult, speculative_generate
from metattt.ttt.inner import ParamDict
from metattt.ttt.online import OnlineTTT
from metattt.ttt.tasks import TTTConfig, prefill_ttt


@dataclass
class TTTSpeculator:
    """A frozen target, a drafter with its meta-learned LoRA init, and the exported TTT settings."""

    target: FrozenTarget
    model: nn.Module  # peft-wrapped drafter; its LoRA is rewritten by every request
    ttt: TTTConfig  # steps, inner lr(s), anchors, objective: as meta-training exported them
    init: ParamDict  # the meta-learned LoRA every request adapts from
    feature_head: nn.Module | None = None  # only for the feature-prediction TTT objective
    max_batch_size: int = MAX_BATCH_SIZE  # the most prompts one `generate` call takes

    @classmethod
    def from_pretrained(
        cls,
        target_path: str | Path,
        meta_lora_path: str | Path,
        drafter_path: str | Path | None = None,
        dtype: torch.dtype | str = "auto",
        device: str | torch.device = "cpu",
    ) -> TTTSpeculator:
        """Load the target, the drafter (by default the base the adapter names) and the adapter
        folder `metattt meta-train` exported (`meta_lora/`: peft adapter + `ttt_config.json`)."""
        meta_lora_path = Path(meta_lora_path)
        if not (meta_lora_path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no peft adapter at {meta_lora_path} (adapter_config.json): run meta-train")
        if drafter_path is None:
            drafter_path = adapter_base_drafter(meta_lora_path)
            if drafter_path is None:
                raise FileNotFoundError(f"the drafter that {meta_lora_path} names is not a drafter folder here: "
                                        "pass drafter_path=")
        drafter = load_drafter(drafter_path)
        target = FrozenTarget.from_pretrained(target_path, layer_ids=list(drafter.config.target_layer_ids),
                                              dtype=dtype).to(device)
        drafter = drafter.to(device=device, dtype=target.embed_tokens.weight.dtype).attach_target(target)
        model, ttt, feature_head = load_ttt_adapter(drafter, meta_lora_path)
        model.eval()
        if feature_head is not None:
            feature_head = feature_head.to(device)
        return cls(target, model, ttt, copy_lora(model), feature_head)

    def generate(
        self,
        prompt_ids: torch.Tensor | list[int] | list[torch.Tensor] | list[list[int]],
        max_new_tokens: int = 256,
        eos_token_id: int | list[int] | None = None,
        *,
        adapt: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        rule: str = "exact",
        seed: int = 0,
        generator: torch.Generator | None = None,
        online: bool | OnlineConfig = False,
    ) -> GenerationResult | list[GenerationResult]:
        """One request, (P,) or (1, P) token ids; or a list of requests (each a list of ids or a
        tensor), decoded as one batch -> a list of results, in order (at most `max_batch_size`).
        `adapt=False` drafts with the meta init as is.

        `online`: keep adapting while decoding, on the tokens the target commits (metattt.ttt.online):
        True with the default `OnlineConfig`, or one; the updates start from the prefill-adapted
        weights (or the init with `adapt=False`) and end with the request.

        `eos_token_id`: None takes the target config's. `seed` drives TTT's anchor sampling (every
        request of a batch draws as it would alone); `generator` the sampling at temperature > 0
        (a batch: one generator shared by the rows, or a list with one per prompt).
        """
        if isinstance(prompt_ids, (list, tuple)) and prompt_ids and not isinstance(prompt_ids[0], int):
            return self._generate_batch(list(prompt_ids), max_new_tokens, eos_token_id, adapt=adapt,
                                        temperature=temperature, top_p=top_p, rule=rule, seed=seed,
                                        generator=generator, online=online)
        device = self.target.embed_tokens.weight.device
        ids = torch.as_tensor(prompt_ids, device=device)
        ids = ids[None] if ids.dim() == 1 else ids
        if eos_token_id is None:
            eos_token_id = self.target.config.eos_token_id
        # TTT takes gradients, which a caller's torch.inference_mode() would forbid: leave it here
        with torch.inference_mode(False):
            ids = ids.clone()
            hook = None
            if adapt:  # the hook adapts from self.init and writes the result before the drafter runs
                hook = prefill_ttt(self.model, self.init, ids, self.ttt, seed, self.feature_head, [])
            else:
                set_lora(self.model, self.init)
            updates = None
            if online:
                cfg = online if isinstance(online, OnlineConfig) else OnlineConfig()
                updates = OnlineTTT(self.model, None, self.ttt, cfg, ids.shape[1], seed, self.feature_head)
            return speculative_generate(self.target, self.model, ids, max_new_tokens, eos_token_id,
                                        temperature=temperature, top_p=top_p, rule=rule, generator=generator,
                                        on_prefill=hook, online=updates)

    def _generate_batch(self, prompts: list, max_new_tokens: int, eos_token_id: int | list[int] | None, *,
                        adapt: bool, temperature: float, top_p: float, rule: str, seed: int,
                        generator: torch.Generator | list[torch.Generator] | None,
                        online: bool | OnlineConfig) -> list[GenerationResult]:
        """`generate` of a list of prompts as one batch: batched TTT, then batched decoding."""
        device = self.target.embed_tokens.weight.device
        if eos_token_id is None:
            eos_token_id = self.target.config.eos_token_id
        with torch.inference_mode(False):
            ids = [torch.as_tensor(p, device=device).clone().reshape(1, -1) for p in prompts]
            hook = lora = None
            if adapt:  # each row adapts from self.init; its LoRA lives in the batch, not in the model
                hook = prefill_ttt_batched(self.model, self.init, ids, self.ttt, seed, self.feature_head)
            elif online:
                lora = repeat_lora(self.init, len(ids))
            else:
                set_lora(self.model, self.init)  # every row drafts with the init: no per-row weights needed
            updates = None
            if online:
                cfg = online if isinstance(online, OnlineConfig) else OnlineConfig()
                # start None: each row's updates begin from that row's (prefill-adapted) weights
                updates = [OnlineTTT(self.model, None, self.ttt, cfg, p.shape[1], seed, self.feature_head) for p in ids]
            return speculative_generate_batch(self.target, self.model, ids, max_new_tokens, eos_token_id,
                                              temperature=temperature, top_p=top_p, rule=rule, generators=generator,
                                              lora=lora, on_prefill=hook, online=updates,
                                              max_batch_size=self.max_batch_size)
