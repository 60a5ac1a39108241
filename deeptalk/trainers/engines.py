"""What the phase trainers check and keep under a distributed engine (DDP, DeepSpeed ZeRO, FSDP).

- A launch that asks for an engine accelerate did not set up (FSDP on CPU processes, DeepSpeed with
  `use_cpu`, N processes that each became a single-process run) is refused with what would have run.
- The saved model keeps the dtypes it had before the engine: FSDP keeps fp32 master copies of what
  trains and DeepSpeed's bf16 mode casts every parameter, so the state dict an engine hands back is
  brought back to the model's own dtypes, with DeepSpeed's fp32 masters for trained fp32 parameters
  (the routers) and the untouched originals for frozen ones.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType

_WHAT_RUNS = {
    DistributedType.NO: "a single-process run in every launched process: unsynchronised copies writing one output folder",
    DistributedType.MULTI_CPU: "DDP over gloo on CPU (every process holds the whole model; nothing is sharded)",
    DistributedType.MULTI_GPU: "DDP (every process holds the whole model; nothing is sharded)",
}


def check_launch(accelerator) -> None:
    """Raise if the launcher asked for FSDP or DeepSpeed, or for several processes, and accelerate set up
    something else: training would go on without the sharding (or synchronisation) that was asked for."""
    got = accelerator.distributed_type
    running = _WHAT_RUNS.get(got, str(got))
    for flag, engine, name in (("ACCELERATE_USE_FSDP", DistributedType.FSDP, "FSDP"),
                               ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED, "DeepSpeed")):
        if os.environ.get(flag, "false").lower() == "true" and got != engine:
            why = ("accelerate attaches FSDP only on accelerator devices (GPU, XPU, NPU, ...)" if name == "FSDP"
                   else "accelerate skips DeepSpeed when the run is asked to use the CPU (use_cpu / --cpu)")
            raise ValueError(
                f"The launch asks for {name} ({flag}=true, e.g. `accelerate launch --config_file` a {name} config) but "
                f"accelerate set up {got.value} on {accelerator.device}: {why}. This would run {running}. Launch on "
                f"accelerator devices{', or drop use_cpu (DeepSpeed runs on CPU with DS_ACCELERATOR=cpu)' if name == 'DeepSpeed' else ''}, "
                "or use the DDP config (deeptalk/recipes/accelerate/ddp.yaml) to train without sharding."
            )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate set up {got.value} with one process "
            f"on {accelerator.device}: this would run {_WHAT_RUNS[DistributedType.NO]}. On a machine without GPUs set "
            "use_cpu=true (`--set use_cpu=true`) for DDP over gloo, or launch on GPUs."
        )


class DtypeKeeper:
    """Remembers a model's parameter dtypes before an engine wraps it, and restores them in the state
    dict the engine hands back for saving."""

    def __init__(self, model, accelerator):
        self.dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
        self.frozen_originals: dict[str, torch.Tensor] = {}
        self.masters: dict[str, torch.Tensor] = {}
        engine_dtype = _deepspeed_param_dtype(accelerator)
        if engine_dtype is None:
            return
        # DeepSpeed's mixed precision casts frozen parameters too, and keeps no fp32 copy of them
        cast = [(name, p) for name, p in model.named_parameters()
                if not p.requires_grad and p.is_floating_point() and p.dtype != engine_dtype and not hasattr(p, "ds_id")]
        kept_in_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        rounded = [name for name, _ in cast if not any(f".{module}." in f".{name}" for module in kept_in_fp32)]
        if rounded:
            raise ValueError(
                f"DeepSpeed's {engine_dtype} mode casts every parameter to {engine_dtype}, frozen ones included (it keeps "
                f"fp32 master copies only of what trains), so {len(rounded)} frozen parameters of this "
                f"{next(iter(model.parameters())).dtype} model (e.g. {rounded[0]}) would be rounded and the model saved in "
                f"{engine_dtype}. Load the model in {engine_dtype} (`from_pretrained(..., dtype=torch.{str(engine_dtype)[6:]})`; "
                "`deeptalk train` does so when the recipe sets bf16), or train without DeepSpeed mixed precision."
            )
        self.frozen_originals = {name: p.detach().to("cpu", copy=True) for name, p in cast}  # the routers: small

    def gather_masters(self, model) -> None:
        """DeepSpeed's fp32 masters of the trained parameters the engine holds in lower precision (all ranks
        call this: under ZeRO-3 it gathers)."""
        from deepspeed.utils import safe_get_full_fp32_param

        self.masters = {}
        for name, p in model.named_parameters():
            if p.requires_grad and self.dtypes.get(name) == torch.float32 and p.dtype != torch.float32:
                master = safe_get_full_fp32_param(p)
                if master is not None:
                    self.masters[name] = master.detach().to("cpu")

    def restore(self, state_dict: dict) -> dict:
        restored = {}
        for name, tensor in state_dict.items():
            want = self.dtypes.get(name)
            if want is None or tensor.dtype == want:
                restored[name] = tensor
            elif name in self.frozen_originals:
                restored[name] = self.frozen_originals[name]
            elif name in self.masters:
                restored[name] = self.masters[name]
            else:
                restored[name] = tensor.to(want)
        return restored


def _deepspeed_param_dtype(accelerator) -> torch.dtype | None:
    """The dtype DeepSpeed casts parameters to, or None when it keeps them (no DeepSpeed, fp32)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))


@contextmanager
def unsharded_class(model):
    """FSDP2 swaps a module's class for a generated `FSDP<Name>` subclass; `save_pretrained` would then write
    torch's FSDP source files as the model's remote code and name them in `auto_map`. Inside this
    context the model has its own class back."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if not issubclass(cls, FSDPModule):
        yield model
        return
    model.__class__ = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule) and issubclass(c, torch.nn.Module))
    try:
        yield model
    finally:
        model.__class__ = cls
