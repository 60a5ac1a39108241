"""Phase 4 -- speech DPO (paper v3, "DeepOmni"): prefer spoken answers that an ASR model transcribes
correctly. DPO (beta 0.1) is applied to each audio stream separately -- sequence log-probabilities
summed over the stream's tokens, against a frozen reference model -- and the N stream terms are
averaged with the text cross-entropy of the chosen answer (the authors' code).

Preference pairs come from a ranking function: `rank_by_wer` orders candidate spoken answers by the
word error rate of their transcripts against the answer text (the paper ranks Whisper-large
transcripts); the transcriber is any callable `waveform, sampling_rate -> text`, by default the pretrained
Whisper judge that `deeptalk evaluate` scores spoken answers with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from ..modeling_deeptalk import stream_token_log_probs
from .base import DeepTalkTrainerMixin, drop_long_examples, refuse_options, stream_per_rank
from .freezing import plan_for_phase, unwrap_deeptalk
from .joint import bf16_supported


@dataclass
class DeepTalkSpeechDPOConfig(DPOConfig):
    """`DPOConfig` for phase 4 (paper: lr 2e-5, 1 epoch, beta 0.1, cosine, 3% warm-up). The loss is sigmoid
    DPO per audio stream (with `label_smoothing`, conservative DPO), averaged with the chosen answers'
    text cross-entropy; TRL options that choose other losses or data handling are refused."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Paper: 2e-5 for speech DPO."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Paper: 1 epoch."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature, applied per audio stream (paper: 0.1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine schedule."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Paper: 3% warm-up (fraction of the steps)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep DeepTalk's paired columns."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (off on CPU)."})
    train_embeddings: str = field(default="all", metadata={"help": "'all' (as phase 3), 'audio_rows' or 'none'."})

    def __post_init__(self):
        if self.bf16 is None:  # before TRL defaults it on (see DeepTalkJointConfig)
            self.bf16 = bf16_supported(self.use_cpu)
        super().__post_init__()
        refuse_options(self, "speech DPO", {
            "loss_type": ((["sigmoid"], "sigmoid"), "the paper's loss is sigmoid DPO per audio stream."),
            "precompute_ref_log_probs": ((False,), "reference log-probabilities are computed with each batch."),
            "ld_alpha": ((None,), "the paper sums log-probabilities over whole answers."),
            "use_weighting": ((False,), "the paper's loss is unweighted."),
            "f_divergence_type": (("reverse_kl",), "the paper's loss is standard DPO."),
            "loss_weights": ((None,), "one sigmoid DPO term per audio stream, averaged with the text CE."),
            "sync_ref_model": ((False,), "the paper keeps the reference frozen."),
            "padding_free": ((False,), "batches are padded multi-stream layouts."),
            "pad_to_multiple_of": (("auto", None), "batches are padded multi-stream layouts."),
            "truncation_mode": (("keep_start",), "pairs longer than max_length are dropped, never cut."),
            "pad_token": ((None,), "the processor pads with PAD_T / PAD_A."),
        })


def encode_preference_pairs(processor, prompts, chosen_turns, rejected_turns, *, codec=None) -> dict:
    """Column-wise encodings of (prompt, chosen assistant turn, rejected assistant turn) triples for
    `datasets.Dataset.from_dict`. Each prompt is a conversation ending with the user turn; each turn
    an assistant message (text + `audio_codes`, or + audio that `codec` encodes)."""
    out: dict[str, list] = {}
    for prompt, chosen, rejected in zip(prompts, chosen_turns, rejected_turns):
        for side, turn in (("chosen", chosen), ("rejected", rejected)):
            encoded = processor.encode_conversation(list(prompt) + [turn], codec=codec)
            for key, value in encoded.items():
                out.setdefault(f"{side}_{key}", []).append(value)
    return out


class SpeechPreferenceCollator:
    """Pads chosen and rejected examples into one batch: the first half chosen, the second rejected."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: list[dict]) -> dict:
        rows = [{k[len(side) + 1 :]: v for k, v in e.items() if k.startswith(side + "_")}
                for side in ("chosen", "rejected") for e in examples]
        return dict(self.processor.pad(rows))


class DeepTalkSpeechDPOTrainer(DeepTalkTrainerMixin, DPOTrainer):
    """Phase 4: per-stream DPO on spoken answers, averaged with the chosen answers' text CE.

    The reference is a frozen copy of the model, or, for a PEFT model, the model with its adapter
    disabled (as TRL does). Losses are normalised over the accumulated batch (pairs for the DPO terms,
    chosen text tokens for the CE), so gradient accumulation equals a larger batch.
    """

    phase = "dpo"
    _tag_names = DeepTalkTrainerMixin._tag_names + ["dpo", "trl"]

    def __init__(self, model, args: DeepTalkSpeechDPOConfig, *, ref_model=None, peft_config=None, processing_class=None,
                 data_collator=None, **kwargs):
        if unwrap_deeptalk(model).config.num_audio_streams == 0:
            raise ValueError("Speech DPO needs a model with audio streams (model.add_speech).")
        plan = plan_for_phase("dpo", train_embeddings=args.train_embeddings)
        uses_peft = peft_config is not None or hasattr(type(model), "get_base_model")
        if ref_model is None and not uses_peft:
            ref_model = frozen_reference(unwrap_deeptalk(model))
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        model = self._setup_phase(model, plan, peft_config)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        collator = data_collator or SpeechPreferenceCollator(processing_class)
        train_dataset = drop_long_examples(kwargs.pop("train_dataset", None), args.max_length,
                                           ("chosen_audio_input_mask", "rejected_audio_input_mask"))
        train_dataset = stream_per_rank(train_dataset, args)
        super().__init__(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                         data_collator=collator, train_dataset=train_dataset, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already encoded by `encode_preference_pairs`

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """`[pairs, chosen text tokens]` over the accumulated micro-batches (and ranks)."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        counts = torch.zeros(2, dtype=torch.long)
        for batch in batch_samples:
            labels = batch["labels"]
            pairs = labels.shape[0] // 2
            counts += torch.stack([torch.tensor(pairs), (labels[:pairs, 0, 1:] != -100).sum().cpu()])
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(dim=0)
        return counts

    def _reference_logits(self, model, forward: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return self.ref_model(**forward).logits
            peft_model = self.accelerator.unwrap_model(model)
            adapter = "ref" if "ref" in getattr(peft_model, "peft_config", {}) else None
            with use_adapter(peft_model, adapter_name=adapter):  # the adapter-disabled model, as TRL does
                return model(**forward).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"} | {"routing_mode": "free", "use_cache": False}
        outputs = model(**forward, output_router_logits=False)
        reference = self._reference_logits(model, forward)
        layout = unwrap_deeptalk(model).config.layout
        policy_logps, valid = stream_token_log_probs(outputs.logits, labels, layout)  # [2P, 1 + N, T - 1]
        reference_logps, _ = stream_token_log_probs(reference, labels, layout)
        policy, ref = policy_logps.sum(-1), reference_logps.sum(-1)  # [2P, 1 + N]
        pairs = labels.shape[0] // 2
        margin = (policy[:pairs] - policy[pairs:]) - (ref[:pairs] - ref[pairs:])
        logits = self.args.beta * margin[:, 1:]  # [P, N]
        smoothing = self.args.label_smoothing
        per_pair = -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
        if num_items_in_batch is None:
            pair_total, text_total = pairs, valid[:pairs, 0].sum()
        else:
            pair_total, text_total = num_items_in_batch[0], num_items_in_batch[1]
        dpo_per_stream = per_pair.sum(dim=0) / pair_total
        text_ce = -policy_logps[:pairs, 0].sum() / torch.as_tensor(text_total).clamp(min=1)
        loss = torch.cat([text_ce.reshape(1), dpo_per_stream]).mean()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # counts cover every rank; DDP averages gradients
        if model.training:
            local_text = valid[:pairs, 0].sum().clamp(min=1)
            self._stream_metrics["loss_text"].append(float(-policy_logps[:pairs, 0].sum().detach() / local_text))
            for stream, value in enumerate(per_pair.mean(dim=0).tolist(), 1):
                self._stream_metrics[f"dpo_audio_{stream}"].append(value)
            self._stream_metrics["reward_margin"].append(float(logits.mean().detach()))
        return (loss, outputs) if return_outputs else loss


def frozen_reference(model):
    """A copy of `model` for the DPO reference. A model whose parameters DeepSpeed ZeRO-3 partitioned as it was
    loaded (`zero3_init_flag`) holds only this rank's shards, which a deep copy cannot duplicate: it is loaded
    again from its checkpoint, as TRL does for its own reference."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return copy.deepcopy(model)
    if not model.name_or_path:
        raise ValueError(
            "The model's parameters are partitioned by DeepSpeed ZeRO-3 and it has no checkpoint path to load the "
            "reference from: pass ref_model=... (the same checkpoint, loaded the same way)."
        )
    return type(model).from_pretrained(model.name_or_path, dtype=model.dtype)


def rank_by_wer(reference_text: str, candidates: list, transcribe=None, sampling_rate: int | None = None) -> list[int]:
    """Indices of `candidates` (waveforms at `sampling_rate`) from best to worst by the WER of `transcribe(waveform,
    sampling_rate)` against `reference_text`; ties keep the candidates' order. The first and last make a (chosen,
    rejected) pair. `transcribe` defaults to the Whisper judge (`deeptalk.evaluation.judge.default_judge`, the
    `whisper` extra); a recognizer with a `normalize` (the judge: Whisper's English normaliser) compares through it."""
    from ..evaluation.metrics import normalize_answer, word_error_rate

    if sampling_rate is None:
        raise ValueError("rank_by_wer needs the candidates' sampling_rate.")
    if transcribe is None:
        from ..evaluation.judge import default_judge

        transcribe = default_judge()
    normalize = getattr(transcribe, "normalize", None) or normalize_answer
    errors = [
        word_error_rate([normalize(reference_text)], [normalize(transcribe(c, sampling_rate))]) for c in candidates
    ]
    return sorted(range(len(candidates)), key=lambda i: (errors[i], i))


def model_asr_transcriber(model, processor, instruction: str | None = None):
    """A `transcribe(waveform, sampling_rate) -> text` callable that uses the DeepTalk model's own ASR
    path (the offline stand-in for the paper's Whisper-large; :func:`deeptalk.evaluation.transcribe`)."""
    from ..evaluation.metrics import transcribe

    def transcribe_one(waveform, sampling_rate):
        return transcribe(model, processor, [(waveform, sampling_rate)], instruction=instruction)[0]

    return transcribe_one


def demo_preference_pairs(processor, codec, records, transcribe=None, *, distractors=1, seed=0):
    """Preference pairs on the demo corpus, offline: for each spoken question, candidate spoken
    answers are the right answer's audio and `distractors` other answers' audio (all in the
    assistant voice); `rank_by_wer` against the answer text (`transcribe`: default the Whisper judge) picks chosen
    (best) and rejected (worst).
    Returns the columns of `encode_preference_pairs`."""
    import random

    import soundfile

    rng = random.Random(seed)
    answer_audio = sorted(
        {r["answer_audio"] if isinstance(r["answer_audio"], str) else r["answer_audio"]["path"] for r in records}
    )
    prompts, chosen, rejected = [], [], []
    for record in records:
        own = record["answer_audio"] if isinstance(record["answer_audio"], str) else record["answer_audio"]["path"]
        paths = [own] + rng.sample([p for p in answer_audio if p != own], distractors)
        waves = [soundfile.read(p, dtype="float32") for p in paths]
        order = rank_by_wer(record["answer_text"], [w for w, _ in waves], transcribe, waves[0][1])
        codes = [codec.encode(torch.from_numpy(w), sr) for w, sr in waves]
        question = record["question_audio"]
        question = question if isinstance(question, str) else question["path"]
        prompts.append([{"role": "user", "content": [{"type": "audio", "audio": question}]}])
        for side, index in ((chosen, order[0]), (rejected, order[-1])):
            side.append({"role": "assistant", "content": [{"type": "text", "text": record["answer_text"]},
                                                           {"type": "audio", "audio_codes": codes[index]}]})
    return encode_preference_pairs(processor, prompts, chosen, rejected)
