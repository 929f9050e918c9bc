"""Multi-process training: DDP over what trains, the frozen target kept out of DDP or sharded (FSDP2).

`trainer.strategy` in a recipe:

- `ddp`: `TargetAwareDDPStrategy`. The drafter (+ LoRA, + learned inner lrs, ...) is wrapped in
  DistributedDataParallel; the frozen target is not (each rank loads it from disk, so DDP neither
  broadcasts its weights at start-up nor its buffers every step). Exact for second-order
  meta-training: the inner `autograd.grad(create_graph=True)` runs inside `training_step`, and DDP
  all-reduces the gradients of the one outer backward (`manual_backward`).
- `fsdp`: the same, plus the target's decoder layers sharded across ranks with FSDP2 `fully_shard`
  (one unit per decoder layer, class found from the model's `_no_split_modules`, e.g.
  `Qwen3DecoderLayer` / `LlamaDecoderLayer`; parameters re-sharded after every forward). The target's
  embedding and lm_head stay whole on every rank (the drafter borrows them). The drafter stays on
  DDP: FSDP1 refuses gradients of gradients, and FSDP2 would need `set_reshard_after_backward(False)`.
  A target of P parameters then takes about P/world + embedding + lm_head per GPU.
- `auto` with more than one process: `ddp`. Any other Lightning strategy name passes through as is.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from metattt.models.target import FrozenTarget

log = logging.getLogger("metattt")

__all__ = ["TargetAwareDDPStrategy", "decoder_layers", "expected_processes", "make_strategy", "shard_target"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder-layer modules of a transformers model (`_no_split_modules` classes, else `*.layers`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        for m in model.modules():
            if isinstance(getattr(m, "layers", None), nn.ModuleList):
                layers = list(m.layers)
                break
    if not layers:
        raise ValueError(f"found no decoder layers to shard in {type(model).__name__}")
    return layers


def shard_target(target: FrozenTarget, device: torch.device, world_size: int) -> int:
    """FSDP2-shard every decoder layer of the frozen target over all ranks. Returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    layers = decoder_layers(target.model)
    kinds = sorted({type(m).__name__ for m in layers})
    for layer in layers:
        # each layer is its own root unit: re-shard after every forward (the target runs under no_grad)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    log.info("fsdp: target sharded over %d ranks, %d units of %s", world_size, len(layers), kinds)
    return len(layers)


def frozen_targets(module: nn.Module) -> list[tuple[str, FrozenTarget]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, FrozenTarget)]


class TargetAwareDDPStrategy(DDPStrategy):
    """DDP that leaves the frozen target(s) out of DDP and, with `shard_target=True`, FSDP2-shards them."""

    strategy_name = "metattt_ddp"

    def __init__(self, *args: Any, shard_target: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shard_target = shard_target

    def model_to_device(self) -> None:
        module = self.model
        assert module is not None
        ignore: list[str] = []
        for prefix, target in frozen_targets(module):
            if self.shard_target:
                shard_target(target, self.root_device, self.world_size)
            ignore += [f"{prefix}.{n}" for n, _ in target.named_parameters()]
            ignore += [f"{prefix}.{n}" for n, _ in target.named_buffers()]
        if ignore:
            # read by DistributedDataParallel and by Lightning's state sync outside fitting
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        elif self.shard_target:
            log.warning("strategy fsdp: the module has no FrozenTarget to shard; plain DDP")
        super().model_to_device()


def expected_processes(accelerator: str, devices: int | str, num_nodes: int) -> int:
    """How many processes Lightning will run for these flags (devices 'auto'/-1: all visible GPUs)."""
    if isinstance(devices, str):
        d = devices.strip()
        if d in ("auto", "-1"):
            n = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
        elif "," in d or d.startswith("["):
            n = len([x for x in d.strip("[]").split(",") if x.strip()])
        else:
            n = int(d)
    elif isinstance(devices, (list, tuple)):
        n = len(devices)
    elif devices == -1:
        n = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    else:
        n = int(devices)
    return max(1, n) * max(1, int(num_nodes))


def make_strategy(name: str, accelerator: str, devices: int | str, num_nodes: int,
                  find_unused_parameters: bool = False):
    """The Lightning strategy for a recipe's `trainer.strategy` value (see the module docstring).

    `find_unused_parameters`: for stages where a trainable tensor may get no gradient in a step
    (meta-training: first-order algorithms give learned inner lrs / the feature head none).
    """
    if name == "auto" and expected_processes(accelerator, devices, num_nodes) > 1:
        name = "ddp"
    if name in ("ddp", "fsdp"):
        return TargetAwareDDPStrategy(shard_target=name == "fsdp", find_unused_parameters=find_unused_parameters)
    return name
