"""`deeptalk evaluate`: the paper's metrics for a DeepTalk model, written as JSON.

Offline it scores the shipped demo corpus's test split:

* text ability: text QA accuracy, and with a base model its accuracy and the paper's relative drop;
* speech in: spoken question -> text answer accuracy (the paper's S2T) and ASR WER/CER through the
  model's own ASR path;
* speech out (needs the codec): audio-token accuracy on held-out spoken answers, spoken question ->
  spoken answer accuracy (S2S: the answer is generated, decoded, transcribed by an ASR and matched)
  and TTS WER (the transcript of the spoken answer against the model's own text answer). The ASR is
  the pretrained Whisper judge when the `whisper` extra is installed (`asr="auto"`), else the model's
  own ASR path; the same ASR's accuracy and WER on the reference answer recordings, and on their codec
  round trip, are the ceilings the model's figures are read against.

Keys of the JSON (each metric is either a number under its key or absent with its reason in
``"skipped"``): ``dataset``, ``text_qa_accuracy``, ``base_text_qa_accuracy``, ``text_relative_drop``,
``spoken_qa_text_accuracy``, ``asr`` (``{"wer", "cer"}`` of the model's own ASR), ``asr_heard`` (the same for
the CTC adapter's transcript, what the LLM reads), ``audio_token_accuracy``, ``spoken_qa_speech_accuracy``,
``tts_wer``, ``speech_answer_asr`` (which ASR transcribed the spoken answers: ``"own"``, the judge's name or the
checkpoint / callable name), ``judge`` (the judge's name,
padding, decoding and normaliser), ``ceilings`` (``{"answer_audio" | "answer_sentence_audio":
{"reference_audio" | "codec_round_trip": {"accuracy", "wer", "num_examples"}}}``: the same ASR on the
one-word and sentence reference answers), ``max_speech_steps``, ``num_examples``
(examples scored per metric) and ``skipped`` (metric -> reason). The same functions take other record lists.
"""

from __future__ import annotations

import json

from ..saving import atomic_write_text
from .judge import judge_reference_audio
from .metrics import (
    asr_error_rates,
    dataset_audio_token_accuracy,
    heard_error_rates,
    normalize_answer,
    relative_drop,
    spoken_qa_text_accuracy,
    text_qa_accuracy,
)
from .speech import AUTO_ASR, OWN_ASR, load_speech_recognizer, spoken_qa_speech_scores


def evaluate_on_demo_corpus(model, processor, *, base_model=None, codec=None, limit: int | None = None, asr=AUTO_ASR,
                            speech_answers: bool = True, max_speech_steps: int = 200, max_new_tokens: int = 8,
                            decoding: dict | None = None) -> dict:
    """Score `model` on the demo corpus's test split (the first `limit` records of each task).

    Args:
        base_model: the text LLM the model was built from; adds its text QA accuracy and the relative drop.
        codec: the model's speech codec; without it the speech-out metrics are skipped.
        asr: what transcribes the spoken answers: `"auto"` (the Whisper judge when the `whisper` extra is
            installed, else the model's own ASR path), `"judge"`, None or `"own"` (the model's own ASR path), a
            transformers ASR checkpoint id or folder, or a callable `(waveform, sampling_rate) -> str`
            (see :func:`~deeptalk.evaluation.load_speech_recognizer`).
        speech_answers: generate spoken answers for `spoken_qa_speech_accuracy` and `tts_wer` (the slow part).
        max_speech_steps: decoding steps per spoken answer.
        max_new_tokens: length limit of the greedy text answers (text QA and spoken question -> text).
        decoding: `SpeechDecodingConfig` fields for the spoken answers, e.g. `{"strategy": "batch_parallel"}`.
    """
    from ..data import load_demo_corpus

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of records per task, or None for all; got {limit!r}.")
    if speech_answers and codec is not None:
        # a wrong ASR fails here, before minutes of other metrics; a checkpoint runs where the model runs
        asr = load_speech_recognizer(asr, model=model, processor=processor, device=next(model.parameters()).device)

    def records(task):
        rows = [dict(r) for r in load_demo_corpus(task, decode_audio=False)["test"]]
        return rows if limit is None else rows[:limit]

    text_records = records("text_qa")
    results = {"dataset": "deeptalk demo corpus (test split)",
               "text_qa_accuracy": text_qa_accuracy(model, processor, text_records, max_new_tokens=max_new_tokens)}
    num_examples = {"text_qa_accuracy": len(text_records)}
    skipped, warnings = {}, {}
    if base_model is not None:
        base = text_qa_accuracy(base_model, processor, text_records, max_new_tokens=max_new_tokens)
        results["base_text_qa_accuracy"] = base
        num_examples["base_text_qa_accuracy"] = len(text_records)
        if base:
            results["text_relative_drop"] = relative_drop(base, results["text_qa_accuracy"])
        else:
            skipped["text_relative_drop"] = "the base model scores 0 on text QA, so a relative drop is undefined"
    else:
        skipped["text_relative_drop"] = "no base model given (deeptalk evaluate --base-model)"

    hears = getattr(model.config, "audio_config", None) is not None
    speaks = bool(getattr(model.config, "num_audio_streams", 0))
    if hears:
        spoken_records, asr_records = records("spoken_qa"), records("asr")
        results["spoken_qa_text_accuracy"] = spoken_qa_text_accuracy(model, processor, spoken_records,
                                                                     max_new_tokens=max_new_tokens)
        results["asr"] = asr_error_rates(model, processor, asr_records)
        num_examples.update(spoken_qa_text_accuracy=len(spoken_records), asr=len(asr_records))
        if model.config.audio_adapter == "ctc":
            results["asr_heard"] = heard_error_rates(model, processor, asr_records)
        else:
            skipped["asr_heard"] = f"the {model.config.audio_adapter!r} adapter hears no words (only 'ctc' does)"
    else:
        skipped["spoken_qa_text_accuracy"] = skipped["asr"] = skipped["asr_heard"] = \
            "the model has no audio encoder (add_speech)"

    speech_metrics = ("audio_token_accuracy", "spoken_qa_speech_accuracy", "tts_wer")
    if codec is None or not speaks:
        reason = ("no codec: pass codec= (deeptalk evaluate --codec) to encode and decode spoken answers" if speaks
                  else "the model has no audio streams (add_speech with a codec layout)")
        skipped.update(dict.fromkeys(speech_metrics, reason))
    else:
        from ..recipes.demo_data import build_demo_data

        data = build_demo_data(processor, codec, splits=("test",), tasks=("spoken_qa_speech",), limit=limit)
        results["audio_token_accuracy"] = dataset_audio_token_accuracy(model, processor, data.spoken_qa_speech["test"])
        num_examples["audio_token_accuracy"] = len(data.spoken_qa_speech["test"])
        if not speech_answers:
            skipped.update(dict.fromkeys(speech_metrics[1:], "speech_answers=False"))
        elif not hears:
            skipped.update(dict.fromkeys(speech_metrics[1:], "the model has no audio encoder to hear spoken questions"))
        else:
            spoken_records = records("spoken_qa")
            scores = spoken_qa_speech_scores(model, processor, codec, spoken_records, asr=asr,
                                             max_steps=max_speech_steps, decoding=decoding, return_predictions=True)
            warnings.update(degenerate_answer_warnings(scores, results.get("asr")))
            chosen = {k: v for k, v in (decoding or {}).items() if v is not None}
            results["speech_decoding"] = {"strategy": "single_pass", **chosen}
            results["spoken_qa_speech_accuracy"] = scores["accuracy"]
            num_examples["spoken_qa_speech_accuracy"] = scores["num_examples"]
            if scores["tts_wer"] is not None:
                results["tts_wer"] = scores["tts_wer"]
                num_examples["tts_wer"] = scores["num_tts_wer_examples"]
            else:
                skipped["tts_wer"] = "every text answer was empty, so WER against it is undefined"
            results["speech_answer_asr"] = scores["asr"]
            results["judge"] = getattr(asr, "judge_info", None) or {"name": scores["asr"]}
            results["ceilings"] = {
                column: judge_reference_audio(asr, spoken_records, codec, audio_column=column, text_column=text)
                for column, text in (("answer_audio", "answer_text"), ("answer_sentence_audio", "answer_sentence"))
                if all(r.get(column) for r in spoken_records)}
            results["max_speech_steps"] = max_speech_steps
    results["num_examples"] = num_examples
    results["skipped"] = skipped
    results["warnings"] = warnings
    return results


def degenerate_answer_warnings(scores: dict, own_asr_error_rates: dict | None) -> dict:
    """Say when a speech score cannot mean what its name says: every spoken question got the same
    answer (the accuracy is then that answer's share of the test set), or the ASR that transcribes
    the spoken answers is the model's own and fails on the test set's speech (so S2S accuracy and TTS WER only
    compare the model with itself)."""
    found = {}
    answers = {normalize_answer(t) for t in scores.get("text_answers", [])}
    if len(scores.get("text_answers", [])) > 1 and len(answers) == 1:
        found["spoken_qa_speech_accuracy"] = (
            f"every spoken question got the same answer ({answers.pop()!r}): the accuracy is that answer's share "
            "of the test set, not understanding")
    if scores.get("asr") == OWN_ASR and own_asr_error_rates and own_asr_error_rates.get("wer", 0.0) >= 0.5:
        found["tts_wer"] = (
            f"the spoken answers are transcribed by the model's own ASR path, whose WER on the ASR test clips is "
            f"{own_asr_error_rates['wer']:.2f}: S2S accuracy and TTS WER are not trustworthy; pass an ASR "
            "checkpoint (deeptalk evaluate --asr ...)")
    return found


def write_results(results: dict, path: str) -> dict:
    """Write `results` as strict JSON (atomically) and return what was written: a NaN or infinite number
    (a metric undefined on the examples scored) becomes null, with a note under ``"warnings"``."""
    import math

    undefined = []

    def finite(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            undefined.append(where)
            return None
        if isinstance(value, dict):
            return {k: finite(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    results = finite(results, "")
    if undefined:
        warnings = results.setdefault("warnings", {})
        for where in undefined:
            warnings[where] = "undefined (NaN or infinite) on the examples scored: written as null"
    atomic_write_text(path, json.dumps(results, indent=2, allow_nan=False) + "\n", what="--output")
    return results
