"""The frozen target: any transformers causal LM, read through hidden-state taps.

The drafter never trains the target. It reads the raw outputs of a few decoder layers
(`target_layer_ids`) and borrows the target's token embedding and lm_head. In a
transformers forward with `output_hidden_states=True`, `hidden_states[0]` is the
embedding output and `hidden_states[i + 1]` the output of decoder layer `i`; the last
entry already has the final norm applied, which is why layer ids stop at L - 3 by default.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash's rule: rounded linspace from layer 1 to layer L-3 over the drafter's layers.

    For a 36-layer Qwen3-4B/8B and a 5-layer drafter this gives [1, 9, 17, 25, 33]. A target too
    shallow for n distinct taps in 1..L-3 (fewer than n + 3 layers) is tapped over 1..L-2 instead
    (4 layers, 2 taps: [1, 2]), then 0..L-2, then 0..L-1; the ids are always distinct, and a target
    with fewer layers than taps is refused.
    """
    L, n = num_target_layers, num_draft_layers
    if L < 2:
        raise ValueError(f"the target needs at least 2 decoder layers, it has {L}")
    if n == 1:
        return [L // 2]

    def spread(start: int, end: int) -> list[int]:
        return [int(round(start + i * (end - start) / (n - 1))) for i in range(n)]

    ids = spread(1, max(1, L - 3))
    if len(set(ids)) == n:
        return ids
    if n > L:
        raise ValueError(
            f"the default layer taps need {n} distinct decoder layers (one per drafter layer; DFlash's rule, layers "
            f"1..L-3, needs a target of at least {n + 3}), and this target has {L}: set target.layer_ids "
            f"(distinct ids in 0..{L - 1}) or lower drafter.num_hidden_layers to at most {L}")
    # Layer L-1 is left out while it can be, as in DFlash: transformers returns it after the final norm.
    start, end = (1, L - 2) if L - 2 >= n else (0, L - 2) if L - 1 >= n else (0, L - 1)
    log.warning("DFlash's layer rule needs %d target layers for %d distinct taps; this target has %d: tapping "
                "layers %d..%d instead", n + 3, n, L, start, end)
    return spread(start, end)


def validate_layer_ids(layer_ids: list[int], num_target_layers: int) -> None:
    if not layer_ids:
        raise ValueError("target.layer_ids is empty: give at least one decoder layer index")
    bad = [i for i in layer_ids if not 0 <= i < num_target_layers]
    if bad:
        raise ValueError(
            f"target.layer_ids {bad} out of range: the target has {num_target_layers} decoder layers "
            f"(valid ids 0..{num_target_layers - 1})"
        )
    repeated = sorted({i for i in layer_ids if list(layer_ids).count(i) > 1})
    if repeated:
        raise ValueError(f"target.layer_ids {list(layer_ids)} repeat layer(s) {repeated}: a second tap of the same "
                         "layer adds no information; give distinct ids")


_TRUE = ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a hub id can be tried at all: not in offline mode (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE),
    nor when the hub's host does not answer within `timeout` (no network). The probe runs in a
    thread because a name lookup on a machine without a network ignores socket timeouts."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if not url.hostname:
        return False
    port = url.port or (80 if url.scheme == "http" else 443)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def resolve_target_path(path: str | Path, key: str = "target.path") -> str:
    """A local checkpoint folder (tried first), or a hub id `org/name` where a network exists.

    Raises:
        FileNotFoundError: naming `key` and the path: no such local folder (and, for a name that
            could be a hub id, no network to try it), or a folder without config.json.
    """
    text = str(path)
    local = Path(text).expanduser()
    if (local / "config.json").is_file():
        return str(local)
    fix = (f"point {key} at a transformers model folder (config.json, weights, tokenizer; relative paths are "
           f"from {os.getcwd()})")
    if local.exists():
        raise FileNotFoundError(f"{key}={text}: the folder has no config.json: {fix}")
    could_be_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None
    if could_be_hub_id and hub_reachable():
        return text
    why = " (and no network to try it as a hub id)" if could_be_hub_id else ""
    raise FileNotFoundError(f"{key}={text}: no local folder `{text}`{why}, so no config.json: {fix}")


@dataclass
class TargetOutput:
    features: torch.Tensor  # (B, T, n·H): tapped layers concatenated on the last dim
    logits: torch.Tensor | None  # (B, T, V), or None when not asked for
    past_key_values: object | None = None
    final_hidden: torch.Tensor | None = None  # (B, T, H): last layer after the final norm (lm_head's input)


def _safetensors_files(folder: Path, keys: list[str]) -> dict[str, Path]:
    """Which safetensors file of a checkpoint folder holds each key (sharded or single-file)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = [k for k in keys if k not in weight_map]
        if missing:
            raise KeyError(f"{index} has no {missing}")
        return {k: folder / weight_map[k] for k in keys}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors(.index.json): loading the embedding and head "
                                "alone needs safetensors weights (re-save the model with save_pretrained)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        missing = [k for k in keys if k not in f.keys()]  # noqa: SIM118 - safe_open has no __iter__
    if missing:
        raise KeyError(f"{single} has no {missing}")
    return dict.fromkeys(keys, single)


def _num_layers(config: PretrainedConfig) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.num_hidden_layers)


class FrozenTarget(nn.Module):
    """A frozen causal LM that returns the hidden states of `layer_ids` (+ logits)."""

    def __init__(self, model: PreTrainedModel, layer_ids: list[int], heads_only: bool = False):
        super().__init__()
        validate_layer_ids(layer_ids, _num_layers(model.config))
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.layer_ids = list(layer_ids)
        self.heads_only = heads_only  # only the embedding and LM head hold weights (`load_heads_only`)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        layer_ids: list[int] | None = None,
        num_draft_layers: int = 5,
        dtype: torch.dtype | str = "auto",
        attn_implementation: str | None = "sdpa",
        **kwargs,
    ) -> FrozenTarget:
        """Load a local checkpoint folder (tried first), or a hub id (`org/name`) where a network exists."""
        source = resolve_target_path(path)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            **kwargs,
        )
        num_layers = _num_layers(model.config)
        ids = layer_ids if layer_ids is not None else default_target_layer_ids(num_layers, num_draft_layers)
        log.info("target %s: %d layers, tapping %s", path, num_layers, ids)
        return cls(model, ids)

    @classmethod
    def load_heads_only(
        cls,
        path: str | Path,
        layer_ids: list[int] | None = None,
        num_draft_layers: int = 5,
        dtype: torch.dtype | str = "auto",
    ) -> FrozenTarget:
        """Load only the input embedding and LM head of a local safetensors checkpoint.

        What the drafter borrows when training reads target features from `data.feature_cache`:
        the decoder layers are never read from disk nor allocated (for Qwen3-8B, about 2.5 GB of
        bf16 weights instead of 16 GB). Such a target cannot run (`forward` says so).
        """
        from safetensors import safe_open

        local = Path(path).expanduser()
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"target.path={path!s} has no config.json: training on data.feature_cache loads "
                                    "the target's embedding and head from a local folder")
        config = AutoConfig.from_pretrained(str(local))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        wanted = {f"{names[id(emb)]}.weight": emb}
        tied = head.weight is emb.weight
        if not tied:
            wanted[f"{names[id(head)]}.weight"] = head
        files = _safetensors_files(local, list(wanted))
        for key, module in wanted.items():
            with safe_open(str(files[key]), framework="pt") as f:
                weight = f.get_tensor(key)
            if dtype != "auto":
                weight = weight.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
            module.weight = nn.Parameter(weight, requires_grad=False)
        if tied:
            head.weight = emb.weight
        # Everything else stays on the meta device (no memory); drop the decoder layers so that
        # moving the module to a device touches only real tensors.
        for parent in model.modules():
            for child_name, child in list(parent.named_children()):
                if child is not emb and child is not head and not any(
                        p.device.type != "meta" for p in child.parameters()):
                    setattr(parent, child_name, nn.Identity())
        for m in model.modules():  # rotary inv_freq and similar buffers of kept modules
            for b_name, buf in list(m.named_buffers(recurse=False)):
                if buf.device.type == "meta":
                    delattr(m, b_name)
        num_layers = _num_layers(config)
        ids = layer_ids if layer_ids is not None else default_target_layer_ids(num_layers, num_draft_layers)
        log.info("target %s: embedding and LM head only (%s parameters; %d decoder layers not loaded), tapping %s",
                 path, f"{sum(p.numel() for p in model.parameters()):,}", num_layers, ids)
        return cls(model, ids, heads_only=True)

    @classmethod
    def from_config(cls, config: PretrainedConfig | dict, layer_ids: list[int] | None = None,
                    num_draft_layers: int = 2, seed: int = 0, dtype: torch.dtype | None = None) -> FrozenTarget:
        """Build a randomly initialised target from a config (tests, tiny recipes, benchmarks);
        `dtype` builds it in that dtype directly (a 4B model in bf16 never exists in fp32)."""
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
        num_layers = _num_layers(model.config)
        ids = layer_ids if layer_ids is not None else default_target_layer_ids(num_layers, num_draft_layers)
        return cls(model, ids)

    # The drafter borrows these, frozen.
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return _num_layers(self.model.config)

    def train(self, mode: bool = True) -> FrozenTarget:
        # Lightning calls .train() on the whole module tree; the target stays in eval (no dropout).
        return super().train(False)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        past_key_values: object | None = None,
        use_cache: bool = False,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        return_final_hidden: bool = False,
        position_ids: torch.Tensor | None = None,  # (B, T); batched decoding gives each row its own
    ) -> TargetOutput:
        if self.heads_only:
            raise RuntimeError("this target holds only its embedding and LM head (loaded for data.feature_cache), "
                               "so it cannot run; load it in full with FrozenTarget.from_pretrained")
        kwargs = {}
        if past_key_values is not None:
            kwargs[self._cache_kwarg] = past_key_values
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep if return_logits else 1,
            **kwargs,
        )
        features = torch.cat([out.hidden_states[i + 1] for i in self.layer_ids], dim=-1)  # (B, T, n·H)
        return TargetOutput(
            features=features,
            logits=out.logits if return_logits else None,
            past_key_values=(getattr(out, "cache", None) or getattr(out, "past_key_values", None)) if use_cache else None,
            final_hidden=out.hidden_states[-1] if return_final_hidden else None,  # transformers: already normed
        )

    @property
    def _cache_kwarg(self) -> str:
        # transformers 5.2x renamed the forward argument `past_key_values` to `cache`.
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
