"""Phase 3 -- joint multimodal collaborative training: free routing over both banks on interleaved
speech+text dialogue mixed with text-only data, so the modalities learn to cooperate. A
`trl.SFTTrainer` subclass; the loss is the mean of the text CE and the audio-stream CEs plus the
router's balance loss (paper §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from .base import DeepTalkTrainerMixin, drop_long_examples, refuse_options, stream_per_rank
from .freezing import plan_for_phase


@dataclass
class DeepTalkJointConfig(SFTConfig):
    """`SFTConfig` for phase 3 (paper: lr 5e-5, 2 epochs, cosine, 3% warm-up). Batches come from
    `DeepTalkDataCollator` over processor-encoded datasets, so TRL's own dataset preparation is off."""

    learning_rate: float = field(default=5e-5, metadata={"help": "Paper: 5e-5 for joint training."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Paper: 2 epochs."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Paper: 3% warm-up (a float < 1 is a fraction of the steps)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep DeepTalk's audio columns."})
    dataset_kwargs: dict | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "Datasets are already encoded by DeepTalkProcessor.encode_batch."},
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (TRL's default on; off on CPU)."})
    train_embeddings: str = field(default="all", metadata={"help": "'all' (paper), 'audio_rows' or 'none'."})

    def __post_init__(self):
        # TRL turns an unset bf16 on before transformers checks the hardware: decide here, so the
        # config builds on a CPU-only machine and trains in bf16 where the GPU supports it.
        if self.bf16 is None:
            self.bf16 = bf16_supported(self.use_cpu)
        super().__post_init__()
        why_layout = "batches are DeepTalkProcessor-encoded multi-stream layouts, padded by DeepTalkDataCollator."
        refuse_options(self, "joint", {
            "packing": ((False,), "packing would merge conversations across their audio segments."),
            "padding_free": ((False,), why_layout),
            "pad_to_multiple_of": (("auto", None), why_layout),
            "completion_only_loss": (
                (None, True), "the processor's labels cover the last assistant turn only (the paper)."
            ),
            "assistant_only_loss": ((False,), "the processor's labels cover the last assistant turn only (the paper)."),
            "loss_type": (("nll",), "the loss is the mean of the per-stream cross-entropies (the paper)."),
            "truncation_mode": (("keep_start",), "examples longer than max_length are dropped, never cut."),
            "chat_template_path": ((None,), "the chat template belongs to DeepTalkProcessor."),
            "eos_token": ((None,), "the processor's <|eot|> ends a turn."),
            "pad_token": ((None,), "the processor pads with PAD_T / PAD_A."),
        })


class DeepTalkJointTrainer(DeepTalkTrainerMixin, SFTTrainer):
    """Phase 3: everything but Whisper and the adapter trains; routing is free."""

    phase = "joint"
    _tag_names = DeepTalkTrainerMixin._tag_names + ["joint", "sft", "trl"]

    def __init__(self, model, args: DeepTalkJointConfig, *, peft_config=None, processing_class=None, **kwargs):
        plan = plan_for_phase("joint", train_embeddings=args.train_embeddings)
        model = self._setup_phase(model, plan, peft_config)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        train_dataset = kwargs.pop("train_dataset", None)
        if args.shuffle_dataset and train_dataset is not None:
            train_dataset = train_dataset.shuffle(seed=args.seed)
        train_dataset = stream_per_rank(drop_long_examples(train_dataset, args.max_length, ("audio_input_mask",)), args)
        super().__init__(model=model, args=args, processing_class=tokenizer, train_dataset=train_dataset, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # DeepTalk's loss is its own (per-stream CE mean + balance loss); TRL's token-level loss
        # paths (fused lm head, completion masks) do not apply to multi-stream labels.
        return DeepTalkTrainerMixin.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def bf16_supported(use_cpu: bool) -> bool:
    import torch

    return not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
