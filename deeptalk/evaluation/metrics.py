"""Evaluation metrics: greedy text answers, QA accuracy, teacher-forced audio-token accuracy, the
paper's relative drop, and WER / CER.

Used by `deeptalk evaluate`, the quickstart and the benchmarks. The headline comparison of the paper
(§6 of ``paper.md``) is the *relative drop* of text ability after adding speech,
``(base - new) / base``: DeepTalk reports 5.45% against its backbone, other native speech LLMs 20-45%.
On the demo corpus the same number is :func:`relative_drop` of :func:`text_qa_accuracy` before and
after training.

Text answers are generated greedily from the *text stream* only: prompts are built with
``processor.encode_batch(..., add_generation_prompt=True)``, left-padded, embedded with
``model.model.embed_inputs`` (user audio spliced in) and passed to ``model.generate(inputs_embeds=...)``;
ids outside the text vocabulary are masked, so the answer is what the text head says.
"""

from __future__ import annotations

import functools
import inspect
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


# ---------------------------------------------------------------------------------------------- plain metrics
def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace."""
    return " ".join(_PUNCTUATION.sub(" ", str(text).lower()).split())


def answer_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact-match accuracy after :func:`normalize_answer` (1.0 = every prediction right)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not references:
        raise ValueError("answer_accuracy needs at least one reference.")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def relative_drop(base: float, new: float) -> float:
    """The paper's headline metric: ``(base - new) / base``, the fraction of `base`'s score lost.

    Positive when `new` is worse (0.0545 is DeepTalk's 5.45% text drop against its backbone; the paper
    prints it as "-5.45%"), negative when `new` is better.
    """
    base, new = float(base), float(new)
    if base == 0:
        raise ValueError("relative_drop is undefined for base == 0 (the baseline scores nothing).")
    return (base - new) / base


def _prepare_transcripts(references, hypotheses, normalize: bool):
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references.")
    if not references:
        raise ValueError("Error rates need at least one reference.")
    if normalize:
        references = [normalize_answer(r) for r in references]
        hypotheses = [normalize_answer(h) for h in hypotheses]
    if any(not r.strip() for r in references):
        raise ValueError("A reference is empty (after normalisation): word/character error rates are undefined for it.")
    return references, hypotheses


ERROR_RATE_METRIC_PATH = str(Path(__file__).with_name("error_rate"))
"""The shipped `evaluate` metric (WER, or CER with ``config_name="cer"``): ``evaluate.load(ERROR_RATE_METRIC_PATH)``
works offline because it is a local module, not the Hub's `wer` / `cer`."""


@functools.lru_cache(maxsize=None)
def load_error_rate_metric(rate: str = "wer"):
    """The shipped error-rate metric loaded with `evaluate.load` (config "wer" or "cer"), once per process.

    Kept in memory: `evaluate` would otherwise write an Arrow cache file for every `compute`."""
    if rate not in ("wer", "cer"):
        raise ValueError(f"Unknown error rate {rate!r}: use 'wer' or 'cer'.")
    import evaluate

    return evaluate.load(ERROR_RATE_METRIC_PATH, config_name=rate, keep_in_memory=True)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus-level WER (total edits / total reference words) through the shipped `evaluate` metric
    (jiwer). With `normalize`, both sides go through :func:`normalize_answer` first."""
    references, hypotheses = _prepare_transcripts(references, hypotheses, normalize)
    return load_error_rate_metric("wer").compute(predictions=hypotheses, references=references)["wer"]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> float:
    """Corpus-level CER through the shipped `evaluate` metric, normalised like :func:`word_error_rate`."""
    references, hypotheses = _prepare_transcripts(references, hypotheses, normalize)
    return load_error_rate_metric("cer").compute(predictions=hypotheses, references=references)["cer"]


# ---------------------------------------------------------------------------------------------- generation
def is_deeptalk_model(model) -> bool:
    """True for a DeepTalk model (multi-stream inputs), False for a plain transformers LM."""
    from ..modeling_deeptalk import DeepTalkForCausalLM

    return isinstance(model, DeepTalkForCausalLM) or hasattr(model, "moe_blocks")


class _TextVocabularyOnly:
    """Logits processor: only ids below `limit` (the text block the tokenizer knows) may be picked."""

    def __init__(self, limit: int):
        self.limit = int(limit)

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.limit:
            scores = scores.clone()
            scores[..., self.limit :] = torch.finfo(scores.dtype).min
        return scores


def _device(model):
    return next(model.parameters()).device


def _generate_accepts_inputs_embeds(model) -> bool:
    """`GenerationMixin.generate(inputs_embeds=...)` needs `prepare_inputs_for_generation` to name it."""
    return "inputs_embeds" in inspect.signature(model.prepare_inputs_for_generation).parameters


def _greedy_from_embeds(model, embeds, attention_mask, max_new_tokens, eot_id, pad_id, vocab_limit, pad_columns,
                        token_modality=None):
    """Greedy decoding with the KV cache from prompt embeddings (what `generate(inputs_embeds=...)`
    does), feeding each new text token as a `[tok, PAD_A x N]` column when `pad_columns` is given."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, token_modality=token_modality)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    tokens = []
    for _ in range(max_new_tokens):
        scores = _TextVocabularyOnly(vocab_limit)(None, out.logits[:, -1].float())
        token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), scores.argmax(-1))
        tokens.append(token)
        done |= token == eot_id
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        ids = token[:, None]
        if pad_columns is not None:
            ids = torch.cat([ids, pad_columns[None, :].expand(ids.shape[0], -1)], dim=1)[:, :, None]
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, cache=out.cache,
                    use_cache=True, logits_to_keep=1)
    return torch.stack(tokens, dim=1) if tokens else embeds.new_zeros(embeds.shape[0], 0, dtype=torch.long)


@torch.no_grad()
def generate_text_answers(model, processor, conversations: Sequence[list[dict]], max_new_tokens: int = 8,
                          batch_size: int = 16, audio=None) -> list[str]:
    """Greedy text answers to `conversations` (each ends with a user turn), one string each.

    Works for a DeepTalk model (text-only or spoken prompts; user audio goes through the model's
    Whisper encoder and adapter) and for a plain transformers causal LM given text-only prompts (its
    own `generate` on the text stream). Generation stops at `<|eot|>`; special tokens are dropped and
    only ids the tokenizer knows (the text block) can be picked. `audio` optionally fills empty audio
    parts, as in `processor.encode_batch`.

    DeepTalk prompts are left-padded, embedded with `model.model.embed_inputs` and decoded with
    `model.generate(inputs_embeds=...)`; if the model's `prepare_inputs_for_generation` does not
    accept `inputs_embeds`, an equivalent greedy KV-cache loop is used instead.
    """
    from transformers import LogitsProcessorList

    conversations = list(conversations)
    tokenizer, layout = processor.tokenizer, processor.layout
    eot_id, pad_id = layout.eot_id, layout.pad_t_id
    vocab_limit = len(tokenizer)
    deeptalk = is_deeptalk_model(model)
    multi_stream = deeptalk and getattr(model.config, "num_audio_streams", 0) > 0
    if multi_stream and model.config.num_streams != layout.num_streams:
        raise ValueError(
            f"The model has {model.config.num_streams} streams but the processor {layout.num_streams}: "
            "use the processor the model was built with (model_speech_kwargs)."
        )
    device = _device(model)
    pad_columns = None
    if multi_stream:
        pad_columns = torch.tensor([layout.audio_special_id("<|pad_a|>", i) for i in range(layout.num_audio_streams)],
                                   device=device)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            clips = None if audio is None else list(audio[start : start + batch_size])
            encoded = processor.encode_batch(chunk, audio=clips, add_generation_prompt=True)
            rows = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
            batch = processor.pad(rows, padding_side="left")
            attention_mask = batch["attention_mask"].to(device)
            has_audio = "input_features" in batch
            common = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eot_id, pad_token_id=pad_id,
                          logits_processor=LogitsProcessorList([_TextVocabularyOnly(vocab_limit)]))
            if deeptalk:
                ids = batch["input_ids"].to(device)
                if not multi_stream:
                    ids = ids[:, 0]  # a DeepTalk model without speech streams reads the text stream only
                features = lengths = mask = None
                if has_audio:
                    if not hasattr(model.model, "audio_encoder"):
                        raise ValueError("The prompts hold user audio but the model has no audio encoder (add_speech).")
                    features = batch["input_features"].to(device)
                    lengths = batch["audio_feature_lengths"].to(device)
                    mask = batch["audio_input_mask"].to(device)
                # the mask also leaves out the audio placeholders a CTC adapter hides
                embeds, attention_mask = model.model.embed_prompt(ids, attention_mask, features, lengths, mask)
                common["attention_mask"] = attention_mask
                if has_audio:  # embeddings hide where the audio is; by-token-modality routing needs it
                    common["token_modality"] = model.model.token_modality_from_inputs(
                        ids, None, attention_mask, None, mask).view(ids.shape[0], -1)
                if _generate_accepts_inputs_embeds(model):
                    new = model.generate(inputs_embeds=embeds, **common)  # only the new tokens come back
                else:
                    new = _greedy_from_embeds(model, embeds, attention_mask, max_new_tokens, eot_id, pad_id,
                                              vocab_limit, pad_columns, common.get("token_modality"))
            else:
                if has_audio:
                    raise ValueError("A plain text LM cannot read user audio: give text-only prompts.")
                ids = batch["input_ids"][:, 0].to(device)
                new = model.generate(input_ids=ids, **common)[:, ids.shape[1] :]
            for row in new.tolist():
                if eot_id in row:
                    row = row[: row.index(eot_id)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def _records_list(records) -> list[dict]:
    return [dict(r) for r in records]


def _audio_source(value):
    """A corpus audio field: an absolute path, or a decoded `{"path", "array", "sampling_rate"}` dict."""
    if isinstance(value, Mapping) and value.get("array") is not None:
        return {"array": value["array"], "sampling_rate": value["sampling_rate"]}
    if isinstance(value, Mapping):
        return value.get("path")
    return value


def text_qa_accuracy(model, processor, records, *, max_new_tokens: int = 8, batch_size: int = 16,
                     return_predictions: bool = False):
    """Text question -> text answer accuracy on corpus records (`question_text`, `answer_text`).

    Returns the accuracy, or `(accuracy, predictions)` with `return_predictions`."""
    from ..recipes.demo_data import text_qa_conversation

    records = _records_list(records)
    conversations = [text_qa_conversation(r["question_text"]) for r in records]
    predictions = generate_text_answers(model, processor, conversations, max_new_tokens, batch_size)
    accuracy = answer_accuracy(predictions, [r["answer_text"] for r in records])
    return (accuracy, predictions) if return_predictions else accuracy


def spoken_qa_text_accuracy(model, processor, records, *, max_new_tokens: int = 8, batch_size: int = 16,
                            return_predictions: bool = False):
    """Speech question -> text answer accuracy (the paper's S2T) on spoken_qa records
    (`question_audio` path or decoded dict, `answer_text`)."""
    from ..recipes.demo_data import spoken_question_conversation

    records = _records_list(records)
    conversations = [spoken_question_conversation(_audio_source(r["question_audio"])) for r in records]
    predictions = generate_text_answers(model, processor, conversations, max_new_tokens, batch_size)
    accuracy = answer_accuracy(predictions, [r["answer_text"] for r in records])
    return (accuracy, predictions) if return_predictions else accuracy


def _clip_source(clip):
    """A `(waveform, sampling_rate)` pair becomes the processor's `{"array", "sampling_rate"}` dict;
    paths and dicts pass through as :func:`_audio_source` reads them."""
    if isinstance(clip, tuple) and len(clip) == 2:
        waveform, sampling_rate = clip
        if isinstance(waveform, torch.Tensor):
            waveform = waveform.detach().to("cpu", torch.float32).numpy()
        return {"array": np.asarray(waveform, dtype=np.float32), "sampling_rate": sampling_rate}
    return _audio_source(clip)


def transcribe(model, processor, audio: Sequence, *, instruction: str | None = None, max_new_tokens: int = 16,
               batch_size: int = 16) -> list[str]:
    """Transcripts of `audio` through the DeepTalk model's own ASR path: the demo ASR prompt
    (`instruction` + the clip, :func:`~deeptalk.recipes.demo_data.asr_conversation`) answered greedily
    by the text head.

    Each clip is a `(waveform, sampling_rate)` pair (numpy or torch, 1-D), a `{"array",
    "sampling_rate"}` dict or an audio file path; the processor resamples it to Whisper's 16 kHz and
    rejects empty, silent or over-long clips with a message naming the fix.
    """
    from ..recipes.demo_data import ASR_INSTRUCTION, asr_conversation

    instruction = ASR_INSTRUCTION if instruction is None else instruction
    conversations = [asr_conversation(_clip_source(clip), instruction=instruction) for clip in audio]
    return generate_text_answers(model, processor, conversations, max_new_tokens, batch_size)


def heard_transcripts(model, processor, audio: Sequence, *, batch_size: int = 16) -> list[str]:
    """What a CTC-adapter model hears in each clip (clips as for :func:`transcribe`): its CTC head's greedy
    transcript, the words its LLM reads in place of the audio (`DeepTalkModel.heard_token_ids`). No text is
    generated, so this is the model's ears alone; :func:`transcribe` is the ears plus the LLM writing them out."""
    texts, device = [], next(model.parameters()).device
    for start in range(0, len(audio), batch_size):
        conversations = [[{"role": "user", "content": [{"type": "audio", "audio": _clip_source(clip)}]}]
                         for clip in audio[start:start + batch_size]]
        batch = processor(conversations, add_generation_prompt=True).to(device)
        heard = model.model.heard_token_ids(batch["input_features"], batch["audio_feature_lengths"])
        texts.extend(processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in heard)
    return texts


def heard_error_rates(model, processor, records, *, batch_size: int = 16, return_predictions: bool = False):
    """:func:`heard_transcripts` of asr records (`audio`, `text`) against their transcripts; `{"wer", "cer"}`."""
    return _asr_records_error_rates(
        records, lambda clips: heard_transcripts(model, processor, clips, batch_size=batch_size), return_predictions)


def asr_error_rates(model, processor, records, *, instruction: str | None = None, max_new_tokens: int = 16,
                    batch_size: int = 16, return_predictions: bool = False):
    """Transcribe asr records (`audio`, `text`) with :func:`transcribe`; `{"wer", "cer"}`."""
    return _asr_records_error_rates(
        records, lambda clips: transcribe(model, processor, clips, instruction=instruction,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size),
        return_predictions)


def _asr_records_error_rates(records, transcribe_clips, return_predictions: bool):
    """`{"wer", "cer"}` of `transcribe_clips(clips)` on asr records against their `text` (and the predictions)."""
    records = _records_list(records)
    predictions = transcribe_clips([_audio_source(r["audio"]) for r in records])
    references = [r["text"] for r in records]
    rates = {"wer": word_error_rate(references, predictions), "cer": character_error_rate(references, predictions)}
    return (rates, predictions) if return_predictions else rates


# ---------------------------------------------------------------------------------------------- audio tokens
def stream_token_counts(logits: torch.Tensor, labels: torch.Tensor, stream_ranges: Sequence[tuple[int, int]],
                        streams: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Teacher-forced argmax hits per stream: `{stream: (correct, total)}`.

    `logits` `[B, T, V]` over the extended vocabulary, `labels` `[B, 1 + N, T]` global ids (-100 =
    ignored), `stream_ranges[s]` = `[start, end)` of stream `s`. Causal shift: the logits at position
    t predict the labels at t + 1. The prediction is the argmax over the stream's own block.
    """
    counts = {}
    for s in streams:
        start, end = stream_ranges[s]
        target = labels[:, s, 1:]
        valid = target != IGNORE_INDEX
        prediction = logits[:, :-1, start:end].argmax(-1)
        local = target - start
        if valid.any() and ((local[valid] < 0) | (local[valid] >= end - start)).any():
            raise ValueError(f"labels of stream {s} hold ids outside its block [{start}, {end}).")
        correct = int(((prediction == local) & valid).sum())
        counts[s] = (correct, int(valid.sum()))
    return counts


def _ratio(correct: int, total: int) -> float:
    return correct / total if total else float("nan")


@torch.no_grad()
def audio_token_accuracy(model, batch, per_stream: bool = False):
    """Teacher-forced argmax accuracy over the audio streams' labels of a padded `batch` (from
    `processor.pad` / `DeepTalkDataCollator`), micro-averaged over streams (NaN without audio labels).

    With `per_stream`, returns `{"all": acc, 1: acc_1, ..., N: acc_N}`.
    """
    config = model.config
    if not getattr(config, "num_audio_streams", 0):
        raise ValueError("audio_token_accuracy needs a model with audio streams (add_speech).")
    device = _device(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k in (
        "input_ids", "attention_mask", "input_features", "audio_feature_lengths", "audio_input_mask")}
    was_training = model.training
    model.eval()
    try:
        logits = model(**inputs).logits
    finally:
        model.train(was_training)
    labels = batch["labels"].to(logits.device)
    ranges = [config.stream_range(s) for s in range(config.num_streams)]
    counts = stream_token_counts(logits, labels, ranges, range(1, config.num_streams))
    overall = _ratio(sum(c for c, _ in counts.values()), sum(t for _, t in counts.values()))
    if not per_stream:
        return overall
    return {"all": overall, **{s: _ratio(c, t) for s, (c, t) in counts.items()}}


@torch.no_grad()
def dataset_audio_token_accuracy(model, processor, dataset, batch_size: int = 8) -> float:
    """:func:`audio_token_accuracy` over encoded examples (a `datasets.Dataset` or a list of rows),
    micro-averaged over every audio label of every batch."""
    config = model.config
    ranges = [config.stream_range(s) for s in range(config.num_streams)]
    device = _device(model)
    correct = total = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = processor.pad(rows)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            counts = stream_token_counts(
                logits, batch["labels"].to(logits.device), ranges, range(1, config.num_streams)
            )
            correct += sum(c for c, _ in counts.values())
            total += sum(t for _, t in counts.values())
    finally:
        model.train(was_training)
    return _ratio(correct, total)
