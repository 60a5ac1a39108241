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

from .freezing import PhasePlan, _deeptalk_model, apply_phase, trainable_parameter_count

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
        self._stream_metrics: dict[str, list[float]] = defaultdict(list)
        return model

    # ---- loss --------------------------------------------------------------------------------
    def _model_kwargs(self, inputs: dict) -> dict:
        model_config = _deeptalk_model(self.model).config
        return {
            **inputs,
            "routing_mode": self.plan.routing_mode,
            "output_expert_load": True,
            "output_router_logits": model_config.router_aux_loss_coef > 0,
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**self._model_kwargs(inputs))
        if outputs.loss is None:
            raise ValueError("The batch has no labels: DeepTalk trainers need `labels` from DeepTalkDataCollator.")
        self._record(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

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
        if outputs.expert_load is not None:
            is_speech = self._speech_expert_mask(outputs.expert_load.device)
            for modality, name in ((0, "text"), (1, "speech")):
                load = outputs.expert_load[:, modality]  # [layers, experts]
                total = float(load.sum())
                if total > 0:
                    metrics[f"load/{name}_tokens_to_speech_experts"].append(float(load[is_speech].sum()) / total)

    def _speech_expert_mask(self, device) -> torch.Tensor:
        """`[layers, experts]` True for speech experts; rebuilt only when the expert map changes."""
        config = _deeptalk_model(self.model).config
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
        model = _deeptalk_model(self.model)
        return {
            "phase": self.phase,
            "routing_mode": self.plan.routing_mode,
            "trainable_parameters": trainable_parameter_count(self.model),
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
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
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self._append_phase_record(output_dir)

    def _append_phase_record(self, output_dir: str):
        """`deeptalk_phases.json` accumulates the phases a checkpoint went through (read by the Hub
        model card), carried over from the folder the model was loaded from."""
        path = os.path.join(output_dir, "deeptalk_phases.json")
        source = os.path.join(str(getattr(_deeptalk_model(self.model), "name_or_path", "") or ""), "deeptalk_phases.json")
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
