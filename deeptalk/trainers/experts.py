"""Phase 2 -- single-modality expert training: train one modality's bank of experts while only that
bank can be chosen (routing `speech_only` / `text_only`) and the other bank stays frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .base import DeepTalkTrainerMixin, stream_per_rank
from .freezing import plan_for_phase


@dataclass
class DeepTalkExpertsConfig(TrainingArguments):
    """`TrainingArguments` for phase 2 (paper: speech lr 1e-4, text lr 2e-5; 2 epochs; cosine; 3% warm-up)."""

    modality: str = field(
        default="speech", metadata={"help": "Which bank to train: 'speech' (phase 2a) or 'text' (2b)."}
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Paper: 1e-4 for speech experts, 2e-5 for text experts."}
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Paper: 2 epochs."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Paper: 3% warm-up (a float < 1 is a fraction of the steps)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep DeepTalk's audio columns."})
    train_router: bool = field(
        default=False,
        metadata={"help": "Train the router too. Paper text: frozen (our default); the authors' code: trainable."},
    )
    train_embeddings: str = field(
        default="all", metadata={"help": "'all' (paper: embeddings train in phase 2), 'audio_rows' or 'none'."}
    )
    train_dense_layers: bool = field(
        default=True, metadata={"help": "Train non-MoE decoder layers (paper: DeepSeek's dense layer 0)."}
    )
    train_moe_attention: bool = field(
        default=False, metadata={"help": "Train attention of MoE layers (paper: frozen)."}
    )
    train_shared_experts: bool = field(default=False, metadata={"help": "Train the shared experts (paper: frozen)."})


class DeepTalkExpertsTrainer(DeepTalkTrainerMixin, Trainer):
    """Phase 2a (`modality="speech"`) or 2b (`modality="text"`)."""

    phase = "experts"
    _tag_names = DeepTalkTrainerMixin._tag_names + ["modality-experts"]

    def __init__(self, model, args: DeepTalkExpertsConfig, *, peft_config=None, **kwargs):
        config = getattr(model, "config", None)
        if config is not None and not config.speech_experts:
            raise ValueError(
                "The experts phase needs a speech-expert map: run the assignment step "
                "(deeptalk.trainers.assignment / `deeptalk assign`) or convert with speech_experts=..."
            )
        plan = plan_for_phase(
            "experts",
            args.modality,
            train_router=args.train_router,
            train_embeddings=args.train_embeddings,
            train_dense_layers=args.train_dense_layers,
            train_moe_attention=args.train_moe_attention,
            train_shared_experts=args.train_shared_experts,
        )
        model = self._setup_phase(model, plan, peft_config)
        kwargs["train_dataset"] = stream_per_rank(kwargs.get("train_dataset"), args)
        super().__init__(model=model, args=args, **kwargs)
