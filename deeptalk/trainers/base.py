"""What every phase trainer shares: the phase's freezing and routing, the loss call, per-stream and
per-modality logging, PEFT wrapping and a model-card section about the phase.

Each phase is a thin subclass (TRL style) that sets `phase` / `_tag_names` and builds its
`PhasePlan` from its config dataclass.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch

from ..modeling_deeptalk import stream_num_items
from .engines import DtypeKeeper, check_launch, unsharded_class
from .freezing import PhasePlan, apply_phase, parameter_numel, trainable_parameter_count, unwrap_deeptalk

PAPER = {  # the shape TRL's trainers expect (`_paper` feeds their model cards)
    "title": "DeepTalk: Towards Seamless and Smart Speech Interaction with Adaptive Modality-Specific MoE",
    "id": "2506.21864",
    "citation": (
        "@article{deeptalk2025,\n  title   = {DeepTalk: Towards Seamless and Smart Speech Interaction with Adaptive "
        "Modality-Specific MoE},\n  journal = {arXiv preprint arXiv:2506.21864},\n  year    = {2025}\n}"
    ),
}


class DeepTalkTrainerMixin:
    """Mixed into `transformers.Trainer` (phases 1-2) or TRL trainers (phases 3-4)."""

    phase: str = ""
    _tag_names = ["deeptalk", "speech", "moe"]
    # compute_loss normalises by the accumulated batch's target counts (`num_items_in_batch`), so the Trainer
    # must not divide by the accumulation steps again (TRL's DPOTrainer declares the opposite)
    loss_is_scaled_for_ga = True
    _name = "DeepTalk"
    _paper = PAPER

    def _setup_phase(self, model, plan: PhasePlan, peft_config=None):
        """Freeze for `plan` and wrap with PEFT if asked. Runs before the optimizer exists, so the
        optimizer only ever sees trainable parameters."""
        self.plan = plan
        self.trainable_groups = apply_phase(model, plan)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        # counted now: a later phase's trainer on the same model object changes requires_grad
        self.trainable_parameters = trainable_parameter_count(model)
        self._stream_metrics: dict[str, list[float]] = defaultdict(list)
        return model

    # ---- engine ------------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        check_launch(self.accelerator)
        # before any engine wraps or casts the model: what `save_model` restores
        self._dtype_keeper = DtypeKeeper(unwrap_deeptalk(self.model), self.accelerator)

    # ---- loss --------------------------------------------------------------------------------
    def _model_kwargs(self, inputs: dict) -> dict:
        model_config = unwrap_deeptalk(self.model).config
        return {
            **inputs,
            "routing_mode": self.plan.routing_mode,
            "output_expert_load": True,
            "output_router_logits": model_config.router_aux_loss_coef > 0,
        }

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """Multi-stream labels: `[1 + N]` target counts per stream over the accumulated micro-batches (and,
        with `average_tokens_across_devices`, over all ranks), so each stream's CE is normalised as one large
        batch would be. Text labels: transformers' own count."""
        if not batch_samples or "labels" not in batch_samples[0] or batch_samples[0]["labels"].dim() != 3:
            return super()._get_num_items_in_batch(batch_samples, device)
        counts = sum(stream_num_items(batch["labels"]) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(dim=0)
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kwargs = self._model_kwargs(inputs)
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**kwargs)
        if outputs.loss is None:
            raise ValueError("The batch has no labels: DeepTalk trainers need `labels` from DeepTalkDataCollator.")
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # the counts cover every rank and DDP averages gradients over ranks: undo that average
            loss = loss * self.accelerator.num_processes
        self._record(outputs)
        return (loss, outputs) if return_outputs else loss

    def _record(self, outputs):
        """Per-stream losses, the balance loss and where each modality's tokens were routed."""
        if not self.model.training:
            return
        metrics = self._stream_metrics
        if outputs.stream_losses is not None:
            for stream, value in enumerate(outputs.stream_losses.tolist()):
                if value == value:  # skip NaN (no labels for this stream in the batch)
                    metrics["loss_text" if stream == 0 else f"loss_audio_{stream}"].append(value)
        if outputs.aux_loss is not None:
            metrics["aux_loss"].append(float(outputs.aux_loss.detach()))
        if getattr(outputs, "audio_ctc_loss", None) is not None:
            metrics["loss_audio_ctc"].append(float(outputs.audio_ctc_loss.detach()))
        if outputs.expert_load is not None:
            is_speech = self._speech_expert_mask(outputs.expert_load.device)
            for modality, name in ((0, "text"), (1, "speech")):
                load = outputs.expert_load[:, modality]  # [layers, experts]
                total = float(load.sum())
                if total > 0:
                    metrics[f"load/{name}_tokens_to_speech_experts"].append(float(load[is_speech].sum()) / total)

    def _speech_expert_mask(self, device) -> torch.Tensor:
        """`[layers, experts]` True for speech experts; rebuilt only when the expert map changes."""
        config = unwrap_deeptalk(self.model).config
        key = (json.dumps(config.speech_experts), str(device))
        if getattr(self, "_speech_mask_key", None) != key:
            layers = range(len(config.moe_layer_indices))
            self._speech_mask = torch.tensor([config.expert_modality(layer) for layer in layers], device=device).bool()
            self._speech_mask_key = key
        return self._speech_mask

    def log(self, logs: dict, *args, **kwargs):
        if self._stream_metrics and "loss" in logs:
            for key, values in self._stream_metrics.items():
                logs[key] = round(sum(values) / len(values), 6)
            self._stream_metrics.clear()
        return super().log(logs, *args, **kwargs)

    # ---- model card --------------------------------------------------------------------------
    def phase_summary(self) -> dict:
        model = unwrap_deeptalk(self.model)
        return {
            "phase": self.phase,
            "routing_mode": self.plan.routing_mode,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": sum(parameter_numel(p) for p in self.model.parameters()),
            "trainable_groups": self.trainable_groups,
            "learning_rate": self.args.learning_rate,
            "epochs": self.args.num_train_epochs,
            "max_steps": self.args.max_steps,
            "global_step": self.state.global_step,
            "speech_experts_per_layer": model.config.num_speech_experts if model.config.speech_experts else 0,
        }

    def model_card_section(self) -> str:
        s = self.phase_summary()
        groups = ", ".join(f"{k} ({v:,})" for k, v in s["trainable_groups"].items()) or "none"
        return (
            f"### Phase: {s['phase']}\n\n"
            f"- routing mode: `{s['routing_mode']}`\n"
            f"- trained: {groups}; {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters\n"
            f"- learning rate {s['learning_rate']}, {s['global_step']} optimizer steps\n"
            f"- trainer: `{type(self).__name__}` ({self._paper['title']}, arXiv {self._paper['id']})\n"
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        output_dir = output_dir or self.args.output_dir
        if self.is_deepspeed_enabled:
            self._dtype_keeper.gather_masters(unwrap_deeptalk(self.model_wrapped))
        fsdp_sharded = self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
            self.accelerator.state.fsdp_plugin.state_dict_type
        )
        if fsdp_sharded and not _internal_call:
            # sharded checkpoints stay sharded (resume); the model folder gets one full state dict
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
            if self.args.push_to_hub:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        else:
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self._append_phase_record(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None):
        # an engine's state dict (DeepSpeed's, FSDP's) in the model's own dtypes; PEFT saves its adapter only
        if state_dict is not None and not hasattr(type(self.model), "get_base_model"):
            state_dict = self._dtype_keeper.restore(state_dict)
        with unsharded_class(self.accelerator.unwrap_model(self.model, keep_torch_compile=False)):
            super()._save(output_dir, state_dict)

    def _append_phase_record(self, output_dir: str):
        """`deeptalk_phases.json` accumulates the phases a checkpoint went through (read by the Hub
        model card), carried over from the folder the model was loaded from."""
        path = os.path.join(output_dir, "deeptalk_phases.json")
        loaded_from = str(getattr(unwrap_deeptalk(self.model), "name_or_path", "") or "")
        source = os.path.join(loaded_from, "deeptalk_phases.json")
        history = []
        for candidate in (path, source):
            if os.path.isfile(candidate):
                history = json.load(open(candidate))
                break
        history = [h for h in history if h.get("phase_key") != self._phase_key()]
        history.append({**self.phase_summary(), "phase_key": self._phase_key(), "card": self.model_card_section()})
        with open(path, "w") as f:
            json.dump(history, f, indent=2)

    def _phase_key(self) -> str:
        return self.plan.routing_mode if self.phase == "experts" else self.phase


def refuse_options(config, phase: str, allowed: dict[str, tuple]):
    """Raise for every inherited TRL option set to a value this phase's trainer does not implement.
    `allowed` maps option name -> (accepted values, why the others are refused)."""
    for name, (accepted, why) in allowed.items():
        value = getattr(config, name)
        if value not in accepted:
            raise ValueError(
                f"{type(config).__name__}.{name}={value!r} is not supported by DeepTalk's {phase} trainer: {why} "
                f"Leave it at {accepted[0]!r}."
            )


def stream_per_rank(dataset, args):
    """A streamed training set (`datasets.IterableDataset`) becomes one endless stream per process, each reading its
    own part (:func:`deeptalk.data.training.rank_stream`), so that uneven parts never leave a rank waiting for
    another; it is read round and round until `max_steps`. Other datasets are returned as they are."""
    import datasets

    if not isinstance(dataset, datasets.IterableDataset):
        return dataset
    if args.max_steps is None or args.max_steps <= 0:
        raise ValueError("A streamed training set has no length: set max_steps (e.g. `--set max_steps=1000`); the "
                         "stream is read round and round until then.")
    from ..data.training import rank_stream

    args.accelerator_config.dispatch_batches = False  # each rank reads its own part, rather than rank 0 all of it
    return rank_stream(dataset, world_size=args.world_size)


def drop_long_examples(dataset, max_length: int | None, length_columns: tuple[str, ...]):
    """Examples longer than `max_length` decoder steps are dropped, not truncated: a cut would split a
    spoken segment from its audio features. `length_columns` hold one entry per step."""
    if max_length is None or dataset is None:
        return dataset
    if not set(length_columns) <= set(dataset.column_names or []):
        return dataset
    return dataset.filter(
        lambda *columns: max(len(c) for c in columns) <= max_length, input_columns=list(length_columns)
    )
