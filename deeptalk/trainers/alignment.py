"""Phase 1 -- modality alignment: teach the audio adapter and the new audio rows of the vocabulary to
speak the frozen LLM's language (the paper trains on ASR: user audio -> transcript)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .base import DeepTalkTrainerMixin, stream_per_rank
from .freezing import plan_for_phase, unwrap_deeptalk

LOSS_TYPES = ("lm", "ctc")


@dataclass
class DeepTalkAlignmentConfig(TrainingArguments):
    """`TrainingArguments` for phase 1, with the paper's defaults (lr 2e-5, 1 epoch, cosine, 3% warm-up)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Paper: 2e-5 for alignment."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Paper: 1 epoch over WenetSpeech ASR."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Paper: 3% warm-up (a float < 1 is a fraction of the steps)."}
    )
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "Must stay 0: text rows of the embedding table get zero gradient, and decay would still move them."
        },
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep DeepTalk's audio columns."})
    train_embeddings: str | None = field(
        default=None,
        metadata={"help": "Embedding rows to train: 'audio_rows' (paper: the new rows only), 'all' or 'none'. "
                          "None: 'audio_rows', or 'none' with loss_type='ctc'."},
    )
    loss_type: str = field(
        default="lm",
        metadata={"help": "'lm': the LLM's next-token loss on the targets (transcripts, answers), plus the CTC "
                          "adapter's own loss times config.audio_ctc_loss_weight. 'ctc': the CTC adapter "
                          "(audio_adapter='ctc') on its CTC loss alone; the frozen LLM is not run, so only the "
                          "adapter (and a trainable encoder) learn. On the quickstart it hears as well in under half "
                          "the phase's time, but the final models kept less text (docs/quickstart_results.md)."},
    )
    train_audio_encoder: bool = field(
        default=False,
        metadata={"help": "Train the Whisper encoder too. The paper freezes a pre-trained Whisper; a randomly "
                          "initialised encoder (offline demos, tests) has to learn."},
    )


class DeepTalkAlignmentTrainer(DeepTalkTrainerMixin, Trainer):
    """Phase 1. Trains the adapter and the audio rows; the LLM and Whisper stay frozen."""

    phase = "align"
    _tag_names = DeepTalkTrainerMixin._tag_names + ["alignment"]

    def __init__(self, model, args: DeepTalkAlignmentConfig, *, peft_config=None, **kwargs):
        embeddings = _check_loss_type(model, args)
        if args.weight_decay and embeddings == "audio_rows":
            raise ValueError(
                "weight_decay must be 0 when training only the audio rows of the embedding table: decay would "
                "shrink the frozen text rows too. Set weight_decay=0.0 or train_embeddings='all'."
            )
        plan = plan_for_phase("align", train_embeddings=embeddings)
        plan.audio_encoder = args.train_audio_encoder
        model = self._setup_phase(model, plan, peft_config)
        kwargs["train_dataset"] = stream_per_rank(kwargs.get("train_dataset"), args)
        super().__init__(model=model, args=args, **kwargs)

    def phase_summary(self) -> dict:
        return {**super().phase_summary(), "loss_type": self.args.loss_type}

    def _model_kwargs(self, inputs: dict) -> dict:
        kwargs = super()._model_kwargs(inputs)
        if self.args.loss_type == "ctc":
            kwargs["audio_ctc_loss_only"] = True
        return kwargs


def _check_loss_type(model, args: DeepTalkAlignmentConfig) -> str:
    """The embedding rows phase 1 trains, once `args.loss_type` fits the model (refused before any work)."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={args.loss_type!r}: choose one of {LOSS_TYPES}.")
    if args.loss_type == "lm":
        return args.train_embeddings or "audio_rows"
    adapter = getattr(unwrap_deeptalk(model).config, "audio_adapter", None)
    if adapter != "ctc":
        raise ValueError(f"loss_type='ctc' trains the CTC adapter, but the model's adapter is {adapter!r}: use "
                         "loss_type='lm', or build the model with add_speech(audio_adapter='ctc').")
    if args.train_embeddings not in (None, "none"):
        raise ValueError(f"loss_type='ctc' does not run the LLM, so train_embeddings={args.train_embeddings!r} would "
                         "get no gradient: set train_embeddings='none' (or leave it unset), or use loss_type='lm'.")
    return "none"
