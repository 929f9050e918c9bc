"""`metattt export`: drafter folders for serving engines (vLLM, SGLang, DFlash's own loop).

What a server can run of metattt's conditions is a fixed drafter: `static` (the distilled drafter
as it is) or `meta_static` (the meta-learned LoRA init merged into its weights, `--merge-lora`).
Test-time training adapts the LoRA per prompt, inside the decoding loop; no engine runs that
(vLLM disables LoRA on drafters, SGLang strips it from the draft worker), so `ttt_zero` /
`ttt_meta` are served by `metattt.serve.TTTSpeculator`, not by these folders.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from metattt.config import ExportConfig
from metattt.export.meta_lora import adapter_base_drafter
from metattt.models.drafter import BlockDrafter
from metattt.models.registry import DRAFTERS, kind_of_checkpoint

log = logging.getLogger("metattt")


def export_merged(drafter_path: str | Path, meta_lora_path: str | Path, path: str | Path,
                  dtype: str | torch.dtype | None = None, max_shard_bytes: int | None = None) -> Path:
    """The drafter of `drafter_path` with the peft LoRA of `meta_lora_path` merged into its weights
    (W + (alpha / r)·B·A), in DFlash layout: the `meta_static` condition as a plain drafter that a
    server loads. Test-time training is not in it (the merged LoRA is the meta-learned init, before
    any prompt). Merged in float32; written in the drafter's own dtype unless `dtype` is given."""
    from peft import PeftModel

    drafter = BlockDrafter.from_pretrained(drafter_path)
    own_dtype = next(drafter.parameters()).dtype
    model = PeftModel.from_pretrained(drafter.float(), str(meta_lora_path))
    merged = model.merge_and_unload()
    merged.config.source_path = drafter.config.source_path  # keep the base folder's other files
    return merged.save_pretrained(path, dtype=dtype or own_dtype, max_shard_bytes=max_shard_bytes)


def run_export(out_dir: Path, cfg: ExportConfig) -> Path:
    """Write the serving folder `cfg` describes under the run folder `out_dir`; returns it."""
    out_dir = Path(out_dir)
    meta_path = Path(cfg.meta_lora_path) if cfg.meta_lora_path else out_dir / "meta_lora"
    if cfg.drafter_path:
        drafter_path = Path(cfg.drafter_path)
    elif cfg.merge_lora:
        drafter_path = adapter_base_drafter(meta_path) or out_dir / "drafter"
    else:
        drafter_path = out_dir / "drafter"
    if not (drafter_path / "config.json").is_file():
        raise FileNotFoundError(f"no drafter at {drafter_path}: run distill (and meta-train) first")
    if kind_of_checkpoint(drafter_path) is not DRAFTERS["block"]:
        raise ValueError(f"{drafter_path} is an autoregressive drafter; serving engines load DFlash-layout block "
                         "drafters only (drafter.kind: block)")
    dest = Path(cfg.path) if cfg.path else out_dir / "serve" / ("meta_static" if cfg.merge_lora else "static")
    if cfg.merge_lora:
        if not (meta_path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no meta-learned adapter at {meta_path}: run meta-train first")
        export_merged(drafter_path, meta_path, dest, dtype=cfg.dtype)
        log.info("drafter %s with the LoRA of %s merged in written to %s", drafter_path, meta_path, dest)
    else:
        BlockDrafter.from_pretrained(drafter_path).save_pretrained(dest, dtype=cfg.dtype)
        log.info("drafter %s written to %s", drafter_path, dest)
    return dest
