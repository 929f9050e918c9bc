"""Launch `python -m metattt <stage> ...` in a subprocess, on 1 or N CPU processes.

For tests that need real processes: DDP/FSDP over gloo (Lightning's subprocess launcher re-executes
the same command once per extra rank), signals, SIGKILL. Each run is pinned to one thread per
process (`OMP_NUM_THREADS=1`) so runs are comparable bit for bit, and cluster variables of an outer
Slurm / torchrun job are removed unless passed in `env`.

    from launch import run_metattt, exported_weights
    run_metattt("distill", recipe_args(ws, ...), devices=2)            # DDP, 2 CPU processes
    run_metattt("distill", recipe_args(ws, ...), devices=2, strategy="fsdp", launcher="torchrun")
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

_CLUSTER_VARS = ("SLURM_", "TORCHELASTIC_", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                 "GROUP_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "PL_")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARS)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def metattt_command(stage: str, args: list[str], devices: int = 1, strategy: str | None = None,
                    launcher: str = "lightning") -> list[str]:
    """launcher: "lightning" (one command; Lightning re-executes it for the other ranks) or "torchrun"
    (torch.distributed.run starts every rank; Lightning detects TorchElasticEnvironment)."""
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
                "-m", "metattt"]
    elif launcher == "lightning":
        head = [sys.executable, "-m", "metattt"]
    else:
        raise ValueError(f"launcher={launcher!r}: lightning or torchrun")
    cmd = [*head, stage, *args, "--trainer.accelerator=cpu", f"--trainer.devices={devices}"]
    if strategy or devices > 1:
        cmd.append(f"--trainer.strategy={strategy or 'ddp'}")
    return cmd


def run_metattt(stage: str, args: list[str], *, devices: int = 1, strategy: str | None = None,
                launcher: str = "lightning", env: dict[str, str] | None = None, timeout: float = 300,
                check: bool = True, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run a stage to completion; on failure (check=True) raise with the tail of its output."""
    cmd = command or metattt_command(stage, args, devices, strategy, launcher)
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def exported_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files in an export folder (drafter/ or meta_lora/)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise FileNotFoundError(f"no safetensors in {folder}")
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
