"""Run by tests/test_scale_out.py under `accelerate launch` (2 CPU processes): trains each phase the way
`deeptalk train` does (shipped tiny_cpu recipe, `from_pretrained`, `encode_dataset`, `build_trainer`,
`save_model`), then trains it again resumed from its step-2 checkpoint, in one process group.
Every rank writes `<output>/<phase>/rank<r>.json`: losses, what the optimizer holds, which parameters
the phase froze, which engine ran, and whether each of its batches had audio.

    scale_out_phases.py WORKDIR OUTPUT PHASE[,PHASE...] [KEY=VALUE ...]   (recipe overrides)

A phase written `dpo@zero_init` loads its model after the previous phase's ZeRO-3 config exists, so
DeepSpeed partitions it as it loads (zero.Init); its reports go to `<output>/dpo@zero_init/`.

With SCALE_OUT_FORCE_FSDP=1 the FSDP test shim runs first (see tests/test_scale_out.py).
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

if os.environ.get("SCALE_OUT_FORCE_FSDP") == "1":
    import fsdp_cpu_shim

    fsdp_cpu_shim.install()

from scale_out_setup import PHASES
from transformers import AutoModelForCausalLM, AutoProcessor
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import deeptalk  # noqa: F401
from deeptalk.trainers.freezing import unwrap_deeptalk
from deeptalk.trainers.recipes import build_trainer, encode_dataset, load_conversations, load_recipe, parse_overrides

STEPS, CHECKPOINT_STEP = 4, 2


class RecordingCollator:
    """The trainer's collator, noting for each batch whether it carries audio input."""

    def __init__(self, collate):
        self.collate, self.had_audio = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.had_audio.append("input_features" in batch)
        return batch


def optimizer_parameters(trainer) -> list:
    """The model parameters the optimizer updates, under any engine."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    if hasattr(optimizer, "bit16_groups"):  # DeepSpeed ZeRO-1/2: the originals of its flat partitions
        return [p for group in optimizer.bit16_groups for p in group]
    if hasattr(optimizer, "fp16_groups"):  # DeepSpeed ZeRO-3
        return [p for group in optimizer.fp16_groups for p in group]
    return [p for group in optimizer.param_groups for p in group["params"]]


def numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 partition knows its full size


def train_phase(workdir: Path, output: Path, name: str, overrides: dict, resume_from=None):
    name, _, variant = name.partition("@")
    phase, recipe_name, data_file = PHASES[name]
    recipe = load_recipe(recipe_name)
    args = {**recipe["args"], "max_steps": STEPS, "save_strategy": "steps", "save_steps": CHECKPOINT_STEP,
            "logging_steps": 1, "report_to": "none", "dataloader_num_workers": 0, "per_device_train_batch_size": 2,
            **overrides, "output_dir": str(output)}
    # `deeptalk train` runs one phase per process and loads the model before any DeepSpeed config exists; a
    # previous phase's ZeRO-3 config would make this load partition the model (zero.Init) instead. The
    # `PHASE@zero_init` variant keeps it: the Python API's way to load a large model under ZeRO-3.
    if variant != "zero_init":
        unset_hf_deepspeed_config()
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.bfloat16 if args.get("bf16") else None)
    processor = AutoProcessor.from_pretrained(workdir / "model")
    dataset = encode_dataset(processor, load_conversations(workdir / data_file), max_length=recipe["data"].get("max_length"))
    trainer = build_trainer(phase, model, processor, dataset, args)
    base = unwrap_deeptalk(trainer.model)
    frozen = sorted(n for n, p in base.named_parameters() if not p.requires_grad)
    trainable = sorted(n for n, p in base.named_parameters() if p.requires_grad)
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    in_optimizer = optimizer_parameters(trainer)
    if resume_from is None:
        trainer.save_model(str(output))
        if trainer.is_world_process_zero():
            processor.save_pretrained(str(output))
    return {
        "engine": str(trainer.accelerator.distributed_type),
        "world_size": trainer.args.world_size,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "logged_steps": [h["step"] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
        "optimizer_numel": sum(numel(p) for p in in_optimizer),
        "optimizer_all_trainable": all(p.requires_grad for p in in_optimizer),
        "trainable_numel": sum(trainer.trainable_groups.values()),
        "trainable_groups": trainer.trainable_groups,
        "frozen": frozen,
        "trainable": trainable,
        "had_audio": trainer.data_collator.had_audio,
        "train_seconds": seconds,
    }


def main(workdir: str, output: str, phases: str, *overrides: str):
    workdir, output = Path(workdir), Path(output)
    overrides = parse_overrides(list(overrides))
    for name in phases.split(","):
        start = time.perf_counter()
        report = train_phase(workdir, output / name, name, overrides)
        report["resumed"] = train_phase(workdir, output / name, name, overrides,
                                        resume_from=str(output / name / f"checkpoint-{CHECKPOINT_STEP}"))
        report["phase_seconds"] = time.perf_counter() - start
        rank = int(os.environ.get("RANK", "0"))
        (output / name / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
