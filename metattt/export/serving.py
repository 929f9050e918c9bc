"""`metattt export`: drafter folders for serving engines (vLLM, SGLang, DFlash's own loop).

What a server can run of metattt's conditions is a fixed drafter: `static` (the distilled drafter
as it is) or `meta_static` (the meta-learned LoRA init merged into its weights, `--merge-lora`).
Test-time training adapts the LoRA per prompt, inside the decoding loop; no engine runs that
(vLLM disables LoRA on drafters, SGLang strips it from the draft worker), so `ttt_zero` /
`ttt_meta` are served by `metattt.serve.TTTSpeculator`, not by these folders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("metattt")


@dataclass
class ExportConfig:
    """Serving exports (`metattt export`): DFlash-layout drafter folders that vLLM, SGLang and DFlash load."""

    merge_lora: bool = False
    """Merge the meta-learned LoRA into the drafter's weights (the `meta_static` condition as a plain
    drafter; also `--merge-lora`); false: the static drafter. TTT is per prompt: no server runs it."""
    drafter_path: str | None = None
    """Drafter folder; None: the adapter's base drafter when merging (meta_drafter/ when meta-training
    updated the base), else {out}/drafter."""
    meta_lora_path: str | None = None
    """Meta-learned adapter folder; None: {out}/meta_lora."""
    path: str | None = None
    """Output folder; None: {out}/serve/meta_static (merged) or {out}/serve/static."""
    dtype: str | None = None
    """Cast the exported weights (e.g. bfloat16, as released drafters are); None: the drafter's dtype."""


def run_export(out_dir: Path, cfg: ExportConfig) -> Path:
    """Write the serving folder `cfg` describes under the run folder `out_dir`; returns it."""
    from metattt.export.dflash import export_dflash, export_merged, import_dflash
    from metattt.models.ar_drafter import is_ar_checkpoint
    from metattt.models.lora import adapter_base_drafter

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
    if is_ar_checkpoint(drafter_path):
        raise ValueError(f"{drafter_path} is an autoregressive drafter; serving engines load DFlash-layout block "
                         "drafters only (drafter.kind: block)")
    dest = Path(cfg.path) if cfg.path else out_dir / "serve" / ("meta_static" if cfg.merge_lora else "static")
    if cfg.merge_lora:
        if not (meta_path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no meta-learned adapter at {meta_path}: run meta-train first")
        export_merged(drafter_path, meta_path, dest, dtype=cfg.dtype)
        log.info("drafter %s with the LoRA of %s merged in written to %s", drafter_path, meta_path, dest)
    else:
        export_dflash(import_dflash(drafter_path), dest, dtype=cfg.dtype)
        log.info("drafter %s written to %s", drafter_path, dest)
    return dest
