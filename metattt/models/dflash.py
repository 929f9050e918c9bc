"""The block drafter's checkpoint format, DFlash's layout: import released drafters, export ours so
that DFlash, SGLang and vLLM load them. (metattt.models.drafter reads and writes through these
functions; they take its classes as arguments, so this file imports no model.)

A DFlash drafter folder is a Qwen3-style `config.json` (`architectures: ["DFlashDraftModel"]`,
`block_size`, `num_target_layers`, `dflash_config: {mask_token_id, target_layer_ids}`) plus
safetensors weights with unprefixed names (`fc.weight`, `hidden_norm.weight`, `layers.*`,
`norm.weight`). Released checkpoints vary in what else they carry, and import copes with it:

* weights in one `model.safetensors`, or sharded as `model-0000x-of-0000y.safetensors` with a
  `model.safetensors.index.json` (only the files the index names are read);
* bf16 (or any float) weights: the drafter is built in the weights' dtype;
* extra config keys (`torch_dtype`/`dtype`, `layer_types`, `use_sliding_window`,
  `transformers_version`, `auto_map`, ...): kept verbatim and written back on export;
* RoPE settings (`rope_scaling`, or transformers 5's `rope_parameters`): applied, through
  transformers' own rope functions (`metattt.models.drafter.rotary_cos_sin`), and written back;
* fields read as DFlash's reader (transformers' `Qwen3Config`) reads them: a missing field takes
  Qwen3Config's default (`rope_theta` 10000, `head_dim` 128, `num_key_value_heads` 32, ...; see
  `reader_defaults`); `rope_theta` at the top level or in `rope_parameters`; `block_size` at the
  top level wins over `dflash_config.block_size` (a warning when both are there and disagree);
* weight names with a `model.` / `drafter.` prefix, and copies of the target's `embed_tokens` /
  `lm_head` (the drafter borrows the target's, so they are dropped).

What import refuses, loudly, instead of silently computing something else: DFlash variants with
other layers (`DFlash2DraftModel`: dynamic convolutions, candidate selector), causal or
sliding-window drafter layers, logit scaling / soft-capping, activations other than SiLU, a
separately trained `mask_embedding.pt`, RoPE types transformers does not implement and partial
rotary embeddings.

Export writes the same layout, optionally cast (`dtype="bfloat16"` as released drafters are) and
sharded (`max_shard_bytes`), and keeps the config keys an imported drafter came with, so
import → export is a byte-identical round trip on tensors and an equal one on config.json, except
that keys readers fill differently when missing are always written (`block_size` at the top
level, `head_dim`, `num_key_value_heads`, `rope_theta`: vLLM defaults rope_theta to 1e6, DFlash
to 10000). Re-exporting an imported drafter copies every other file of the folder it came from
(remote code such as `dflash.py`, README, licence) byte for byte; an `auto_map` entry whose code
file is not in the export is dropped, so `AutoModel.from_pretrained(..., trust_remote_code=True)`
never meets a reference it cannot follow. `export_merged` writes a drafter with a meta-learned
LoRA merged into its weights (what vLLM can serve of the `meta_static` condition).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metattt.atomic import atomic_dir
from metattt.errors import check_safetensors

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ARCHITECTURE = "DFlashDraftModel"

#: Weights a drafter folder may carry that the block drafter takes from the target instead.
BORROWED_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")
#: Name prefixes that wrappers add (a transformers `model.` base, a Lightning `drafter.` attribute).
_PREFIXES = ("model.", "drafter.", "draft_model.")
#: dflash_config keys of DFlash variants whose layers this drafter does not implement, with the
#: value that means "feature off".
_UNSUPPORTED_DFLASH_KEYS = {
    "output_multiplier": 1.0,
    "final_logit_softcapping": None,
    "input_embedding_scale": 1.0,
    "conv_kernel_size": None,
    "conv_group_size": None,
    "selector_rank": None,
    "selector_top_k": None,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# config.json <-> the block drafter's config
# --------------------------------------------------------------------------------------------


def check_supported(config: dict, source: str = "config.json") -> None:
    """Raise for DFlash variants whose computation the block drafter does not reproduce."""
    archs = config.get("architectures") or [ARCHITECTURE]
    if any(a != ARCHITECTURE for a in archs):
        raise ValueError(f"{source}: architectures {archs} is not {ARCHITECTURE!r}; only the DFlash block "
                         "drafter (Qwen3-style layers with KV injection) can be imported")
    dflash = config.get("dflash_config") or {}
    used = {k: dflash.get(k, config.get(k)) for k in _UNSUPPORTED_DFLASH_KEYS}
    used = {k: v for k, v in used.items() if v is not None and v != _UNSUPPORTED_DFLASH_KEYS[k]}
    if used:
        raise ValueError(f"{source}: uses DFlash features the block drafter does not implement: {used}")
    layer_types = config.get("layer_types") or []
    if config.get("is_causal") or dflash.get("causal") or dflash.get("use_swa") \
            or any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{source}: causal / sliding-window drafter layers (layer_types={layer_types}, "
                         f"is_causal={config.get('is_causal')}, dflash_config.causal={dflash.get('causal')}, "
                         f"dflash_config.use_swa={dflash.get('use_swa')}) are not supported; the block drafter "
                         "attends bidirectionally inside a block")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={config['hidden_act']!r}; the block drafter's MLP is SiLU-gated")


@functools.lru_cache(maxsize=1)
def reader_defaults() -> dict:
    """What transformers' Qwen3Config (the class DFlash's `DFlashDraftModel` reads config.json with)
    gives for fields config.json lacks, in the installed transformers."""
    from transformers import Qwen3Config

    c = Qwen3Config()
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    return {"head_dim": c.head_dim, "num_key_value_heads": c.num_key_value_heads,
            "intermediate_size": c.intermediate_size, "rms_norm_eps": c.rms_norm_eps,
            "max_position_embeddings": c.max_position_embeddings, "attention_bias": c.attention_bias,
            "num_hidden_layers": c.num_hidden_layers, "rope_theta": float(theta)}


def _scaling_in(rope_parameters) -> dict | None:
    """The RoPE settings of a transformers-5 `rope_parameters` dict beside rope_theta."""
    if not isinstance(rope_parameters, dict):
        return None
    return {k: v for k, v in rope_parameters.items() if k != "rope_theta"}


def _plain(scaling: dict | None) -> dict | None:
    """None for settings that mean plain RoPE ({"rope_type": "default"}), else the settings."""
    if scaling and (set(scaling) - {"rope_type", "type"} or scaling.get("rope_type", scaling.get("type")) != "default"):
        return scaling
    return None


def _derived(d: dict, dflash: dict, name: str, cls_defaults: dict):
    """What a field reads back as when config.json lacks it (mirrors `config_from_dflash`)."""
    if name == "block_size":
        return dflash.get("block_size", cls_defaults["block_size"])
    if name == "rope_theta":
        rope = d.get("rope_parameters") or {}
        return float(rope["rope_theta"]) if "rope_theta" in rope else reader_defaults()["rope_theta"]
    if name == "rope_scaling":
        return _scaling_in(d.get("rope_parameters"))
    if name == "num_target_layers":
        return max(dflash["target_layer_ids"]) + 4
    if name in reader_defaults():
        return reader_defaults()[name]
    return cls_defaults.get(name)


#: Config fields that are not config.json keys of their own.
_NOT_KEYS = {"extra", "mask_token_id", "target_layer_ids", "source_keys", "source_path", "attn_implementation"}
#: Keys whose absence readers fill differently (transformers' Qwen3Config, which DFlash reads with:
#: head_dim 128, num_key_value_heads 32; DFlash reads block_size only at the top level): export
#: writes them even where the source file lacked them. rope_theta likewise (DFlash 10000, vLLM 1e6),
#: unless `rope_parameters` carries it.
_ALWAYS_WRITTEN = ("block_size", "head_dim", "num_key_value_heads")


def config_from_dflash(d: dict, config_cls: type):
    """A DFlash `config.json` dict → `config_cls` (the block drafter's config; unknown keys kept
    in `extra`).

    Read as DFlash's reader reads it: a field the file lacks takes transformers' Qwen3Config default
    (`reader_defaults`), and a top-level `block_size` wins over `dflash_config.block_size` (warned
    about when both are there and disagree).
    """
    d = dict(d)
    dflash = dict(d.pop("dflash_config", None) or {})
    if "mask_token_id" not in dflash or "target_layer_ids" not in dflash:
        raise ValueError("config.json has no dflash_config.mask_token_id / target_layer_ids: not a DFlash drafter")
    for key in ("hidden_size", "vocab_size", "num_attention_heads"):
        if key not in d:
            raise ValueError(f"config.json lacks {key!r}")
    if "block_size" in d and "block_size" in dflash and d["block_size"] != dflash["block_size"]:
        log.warning("config.json has block_size %s at the top level and %s in dflash_config; using the top-level "
                    "one, as DFlash does (export writes it to both places)", d["block_size"], dflash["block_size"])
    defaults = {f.name: f.default for f in fields(config_cls) if f.default is not MISSING}
    source_keys = list(d)
    kwargs = {}
    for f in fields(config_cls):
        if f.name in _NOT_KEYS:
            continue
        value = d.pop(f.name, None)
        if f.name == "num_key_value_heads" and value is None and f.name in source_keys:
            value = kwargs["num_attention_heads"]  # an explicit null: Qwen3Config's "as many as query heads"
        if value is None and f.name != "rope_scaling":
            if f.name not in defaults and f.name not in reader_defaults() and f.name != "num_target_layers":
                raise ValueError(f"config.json lacks {f.name!r}")
            value = _derived({**d, **kwargs}, dflash, f.name, defaults)
        kwargs[f.name] = value
    if kwargs["rope_scaling"] is None:  # transformers 5 keeps rope_type and its parameters in rope_parameters
        kwargs["rope_scaling"] = _scaling_in(d.get("rope_parameters"))
    kwargs["rope_theta"] = float(kwargs["rope_theta"])
    dflash_extra = {k: v for k, v in dflash.items() if k not in ("mask_token_id", "target_layer_ids")}
    extra = dict(d)
    if dflash_extra:
        extra["dflash_config"] = dflash_extra
    return config_cls(mask_token_id=int(dflash["mask_token_id"]),
                      target_layer_ids=[int(i) for i in dflash["target_layer_ids"]],
                      extra=extra, source_keys=source_keys, **kwargs)


def config_to_dflash(cfg, dtype: torch.dtype | None = None) -> dict:
    """The block drafter's config → DFlash `config.json` dict.

    A drafter built here writes every field. One imported from a DFlash folder writes back the keys
    it was read from, in the places it found them (`rope_parameters.rope_theta` and its rope_type,
    `dflash_config.block_size`), so an import → export round trip gives an equal config.json; a
    field the file lacked is written only if its value no longer equals what reading would derive,
    or if readers disagree on its default (`_ALWAYS_WRITTEN`, and `rope_theta` wherever the file
    has no rope_theta at all). `dtype`: the dtype of the exported weights; updates
    `torch_dtype`/`dtype` where present.
    """
    extra = json.loads(json.dumps(cfg.extra))  # deep copy
    dflash = dict(extra.pop("dflash_config", None) or {})
    source = set(cfg.source_keys) if cfg.source_keys is not None else None
    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _NOT_KEYS}

    out: dict = {"architectures": [ARCHITECTURE], "model_type": "qwen3"}
    if source is None:  # what the layers are, for readers that build them from the file
        out["hidden_act"] = "silu"
    out.update(extra)
    if "block_size" in dflash:
        dflash["block_size"] = cfg.block_size
    rope = out.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            rope["rope_theta"] = _same_type(rope["rope_theta"], cfg.rope_theta)
        if source is not None and "rope_scaling" not in source:  # the scaling lives here too
            scaling = cfg.rope_scaling or {"rope_type": "default"}
            for k in [k for k in rope if k != "rope_theta" and k not in scaling]:
                del rope[k]
            rope.update(scaling)
    probe = {**values, "rope_parameters": rope}
    dflash_probe = {**dflash, "mask_token_id": cfg.mask_token_id, "target_layer_ids": cfg.target_layer_ids}
    for name, value in values.items():
        if source is not None and name not in source and name not in _ALWAYS_WRITTEN:
            # written only if reading the file back without it would give another value
            derived = _derived(probe, dflash_probe, name, defaults)
            if name == "rope_scaling":
                derived, value = _plain(derived), _plain(value)
            explicit_theta = name == "rope_theta" and isinstance(rope, dict) and "rope_theta" in rope
            if derived == value and (name != "rope_theta" or explicit_theta):
                continue
        out[name] = value
    out["dflash_config"] = {**dflash, "mask_token_id": cfg.mask_token_id,
                            "target_layer_ids": list(cfg.target_layer_ids)}
    if dtype is not None:
        name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        present = [k for k in ("torch_dtype", "dtype") if k in out]
        for k in present or ["torch_dtype"]:
            out[k] = name
    if source is not None:  # keep the source file's key order for the keys it had
        order = [k for k in cfg.source_keys if k in out] + [k for k in out if k not in source]
        out = {k: out[k] for k in order}
    return out


def _same_type(old, new):
    return int(new) if isinstance(old, int) and float(new).is_integer() else new


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a drafter folder: the index's shards, or model.safetensors, or
    (older exports) every `*.safetensors` but peft adapters."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {path}: {missing}")
        if not files:
            raise ValueError(f"{index} has an empty weight_map")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("adapter_"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def load_dflash_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Drafter weights by their unprefixed names, as stored (dtype unchanged)."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        check_safetensors(f)  # a truncated file: name it and the stage that writes it again
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                state[k] = sf.get_tensor(k)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            break
    dropped = [k for k in state if k in BORROWED_WEIGHTS]
    if dropped:
        log.info("%s: ignoring %s (the drafter borrows the target's embedding and head)", path, dropped)
        for k in dropped:
            del state[k]
    return state


def import_dflash(path: str | Path, model_cls: type, attn_implementation: str = "sdpa", strict: bool = True,
                  dtype: str | torch.dtype | None = None):
    """Load a DFlash-layout drafter folder (e.g. a released one) as `model_cls` (the block drafter,
    whose `config_class` reads config.json).

    The drafter is built in the dtype of its weights unless `dtype` is given. Attach the target
    (`drafter.attach_target(target)`) before running it.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no drafter at {path}: expected config.json + *.safetensors")
    raw = json.loads((path / CONFIG_NAME).read_text())
    check_supported(raw, str(path / CONFIG_NAME))
    if (path / "mask_embedding.pt").is_file():
        raise ValueError(f"{path} has a mask_embedding.pt (a separately trained mask embedding that vLLM puts in "
                         "place of the target's); the block drafter embeds its mask token with the target's "
                         "embedding, so it would compute something else")
    config = config_from_dflash(raw, model_cls.config_class)
    config.attn_implementation = attn_implementation
    config.source_path = str(path.resolve())
    state = load_dflash_state_dict(path)
    model = model_cls(config)
    expected = model.state_dict()
    bad_shapes = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape}
    if bad_shapes:
        raise ValueError(f"drafter weights in {path} do not fit its config.json (file, config): {bad_shapes}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"drafter weights in {path} do not match its config: missing {missing}, "
                         f"unexpected {unexpected}")
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    target_dtype = to_dtype(dtype) or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
    return model.to(target_dtype)


def export_dflash(drafter, path: str | Path, dtype: str | torch.dtype | None = None,
                  max_shard_bytes: int | None = None) -> Path:
    """Write `drafter` (a BlockDrafter, or a peft model around one: its base weights) in DFlash
    layout, atomically. `dtype`: cast the weights (e.g. "bfloat16"); `max_shard_bytes`: split into
    `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json` past that size."""
    base = drafter.get_base_model() if hasattr(drafter, "get_base_model") else drafter
    cast = to_dtype(dtype)
    state = {}
    for k, v in base.state_dict().items():
        v = v.detach()
        if cast is not None and v.is_floating_point():
            v = v.to(cast)
        state[k] = v.contiguous().cpu()
    if any("lora_" in k for k in state):
        raise ValueError("the drafter still carries LoRA tensors: merge them (merge_and_unload) or export the base")
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    saved_dtype = float_dtypes.pop() if len(float_dtypes) == 1 else None
    config = config_to_dflash(base.config, dtype=saved_dtype)
    shards = _shard(state, max_shard_bytes)
    path = Path(path)
    with atomic_dir(path) as tmp:
        copied = copy_source_files(getattr(base.config, "source_path", None), tmp, exclude=path)
        _drop_unhonoured_auto_map(config, copied)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def _is_weight_file(rel: Path) -> bool:
    """Files export writes itself (config, weights, their index) or that would be stale weights."""
    name = rel.name
    return len(rel.parts) == 1 and (name in (CONFIG_NAME, INDEX_NAME, "pytorch_model.bin.index.json")
                                    or name.endswith(".safetensors") or name.endswith(".bin"))


def copy_source_files(source: str | Path | None, dest: Path, exclude: Path | None = None) -> set[str]:
    """Copy every file of an imported drafter's folder but its config and weights (remote-code
    `dflash.py`, README, licence, generation config, ...) byte for byte into `dest`, as it is on
    disk now; `exclude`: a folder inside it to leave out (the export itself). Returns the copied
    paths, relative to the folder."""
    if source is None:
        return set()
    source = Path(source)
    exclude = Path(exclude).resolve() if exclude is not None else None
    if not source.is_dir():
        log.warning("the folder this drafter was imported from, %s, is gone: its other files (remote code, "
                    "README, ...) are not in the export", source)
        return set()
    copied = set()
    for f in sorted(source.rglob("*")):
        rel = f.relative_to(source)
        # hidden folders (.cache: huggingface_hub's bookkeeping, .git, an export's temp folder) are
        # not part of the model; hidden files (.gitattributes) are
        hidden_dir = len(rel.parts) > 1 and rel.parts[0].startswith(".")
        inside_export = exclude is not None and f.resolve().is_relative_to(exclude)
        if not f.is_file() or _is_weight_file(rel) or hidden_dir or inside_export:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest / rel)
        copied.add(rel.as_posix())
    return copied


def _drop_unhonoured_auto_map(config: dict, files: set[str]) -> None:
    """`auto_map` sends `AutoModel.from_pretrained(..., trust_remote_code=True)` to a code file
    beside the weights; without that file it fails, so an entry whose file is not in the export
    goes (entries naming another repository, `repo--module.Class`, stay)."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return
    kept = {}
    for auto_class, ref in auto_map.items():
        refs = ref if isinstance(ref, list) else [ref]
        local = [r for r in refs if isinstance(r, str) and "--" not in r]
        missing = [r for r in local if r.rsplit(".", 1)[0].replace(".", "/") + ".py" not in files]
        if missing:
            log.warning("dropping auto_map[%r] = %r from the export: %s is not in the drafter's folder",
                        auto_class, ref, ", ".join(r.rsplit(".", 1)[0] + ".py" for r in missing))
            continue
        kept[auto_class] = ref
    if kept:
        config["auto_map"] = kept
    else:
        del config["auto_map"]


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards
