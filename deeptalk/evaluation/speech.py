"""Scoring what the model *says*: spoken answers are decoded to audio, transcribed, and scored.

Two numbers, as speech-out LLM papers report them:

* **speech -> speech accuracy** (the paper's S2S): the transcript of the spoken answer to a spoken
  question, exact-match against the reference answer (:func:`~deeptalk.evaluation.answer_accuracy`);
* **TTS WER** (Mini-Omni's / LLaMA-Omni's speech-text consistency): WER of the transcript of the
  spoken answer against the model's own *text* answer from the same decoding pass, i.e. how faithfully
  the speech streams say what the text stream wrote.

Both need an ASR. :func:`load_speech_recognizer` turns the user's choice into a
:class:`SpeechRecognizer`: the DeepTalk model's own ASR path (the default, offline), a transformers ASR
checkpoint (Hub id or local folder, through ``transformers.pipeline("automatic-speech-recognition")``)
or any callable ``(waveform, sampling_rate) -> str``. An independent ASR (e.g. Whisper) is what papers
use; the model's own ASR keeps evaluation offline but lets the model grade its own speech.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..processing.audio import SILENCE_PEAK, WHISPER_SAMPLING_RATE, load_audio
from .metrics import _audio_source, _records_list, answer_accuracy, normalize_answer, transcribe, word_error_rate

OWN_ASR = "own"
"""The name results record for the DeepTalk model's own ASR path (also accepted as `asr="own"`)."""

JUDGE_ASR = "judge"
"""`asr="judge"`: the pretrained Whisper judge (:func:`~deeptalk.evaluation.judge.default_judge`, the `whisper`
extra)."""

AUTO_ASR = "auto"
"""`asr="auto"`: the Whisper judge when the `whisper` extra is installed, else the model's own ASR path."""

ASR_SPEC_HELP = (
    "pass asr=None (or 'own') for the DeepTalk model's own ASR path, 'judge' for the pretrained Whisper judge "
    "(pip install \"deeptalk[whisper]\"), 'auto' for the judge when it is installed and the own path otherwise, "
    "the name or local folder of a transformers ASR checkpoint (e.g. 'openai/whisper-small', loaded with "
    "transformers.pipeline('automatic-speech-recognition')), or a callable (waveform, sampling_rate) -> str"
)


def _as_mono_float(waveform) -> np.ndarray:
    """A 1-D float32 numpy copy of a decoded waveform, clipped to [-1, 1] as writing it to a 16-bit WAV
    would (codec decoders may overshoot full scale slightly)."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().to("cpu", torch.float32).numpy()
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(
            f"A spoken answer must be a 1-D waveform, got shape {waveform.shape}: decode one answer at a time."
        )
    if not np.isfinite(waveform).all():
        raise ValueError("A spoken answer holds NaN or inf samples: check the codec's decoder.")
    return np.clip(waveform, -1.0, 1.0)


class SpeechRecognizer:
    """A speech -> text function plus the name that evaluation results record for it.

    `transcribe_batch` receives `(waveform, sampling_rate)` pairs (1-D float32 numpy in [-1, 1]) and
    returns one transcript each. Clips with nothing to hear (no samples, or a peak below
    :data:`~deeptalk.processing.audio.SILENCE_PEAK`: a spoken answer that ended at once) get the
    empty transcript without calling the backend, so every backend scores them the same way (wrong).

    `normalize` is how its transcripts and their references are compared (both sides go through it before exact
    match and WER); None: :func:`~deeptalk.evaluation.normalize_answer`.
    """

    def __init__(self, name: str, transcribe_batch: Callable[[list[tuple[np.ndarray, int]]], list[str]],
                 normalize: Callable[[str], str] | None = None):
        self.name = name
        self.transcribe_batch = transcribe_batch
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"SpeechRecognizer({self.name!r})"

    def __call__(self, waveform, sampling_rate: int) -> str:
        return self.transcribe([(waveform, sampling_rate)])[0]

    def transcribe(self, clips: Sequence[tuple]) -> list[str]:
        """One transcript per `(waveform, sampling_rate)` pair, stripped; "" for silent or empty clips."""
        clips = [(_as_mono_float(waveform), int(sampling_rate)) for waveform, sampling_rate in clips]
        audible = [
            i for i, (waveform, _) in enumerate(clips) if waveform.size and np.abs(waveform).max() >= SILENCE_PEAK
        ]
        transcripts = [""] * len(clips)
        if audible:
            # clipped by us (see _as_mono_float): "lower the recording gain" does not apply
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".* is clipped: ")
                texts = list(self.transcribe_batch([clips[i] for i in audible]))
            if len(texts) != len(audible):
                raise ValueError(f"The ASR {self.name!r} returned {len(texts)} transcripts for {len(audible)} clips.")
            for i, text in zip(audible, texts):
                if not isinstance(text, str):
                    raise ValueError(f"The ASR {self.name!r} returned {type(text).__name__}, not str: an ASR callable "
                                     "takes (waveform, sampling_rate) and returns the transcript string.")
                transcripts[i] = text.strip()
        return transcripts


def _own_recognizer(model, processor, max_new_tokens: int, batch_size: int) -> SpeechRecognizer:
    if model is None or processor is None:
        raise ValueError("The model's own ASR path needs model= and processor=; or " + ASR_SPEC_HELP + ".")
    if getattr(model.config, "audio_config", None) is None:
        raise ValueError("The model has no audio encoder, so it has no own ASR path (add_speech first); or "
                         + ASR_SPEC_HELP + ".")
    longest = int(getattr(processor, "max_audio_seconds", 30.0) * WHISPER_SAMPLING_RATE)

    def transcribe_batch(clips):
        # Whisper hears one window: longer answers are cut to it rather than rejected
        clips = [(load_audio(waveform, rate, max_seconds=None, allow_silence=True)[:longest], WHISPER_SAMPLING_RATE)
                 for waveform, rate in clips]
        return transcribe(model, processor, clips, max_new_tokens=max_new_tokens, batch_size=batch_size)

    return SpeechRecognizer(OWN_ASR, transcribe_batch)


def _pipeline_recognizer(name: str, device) -> SpeechRecognizer:
    from transformers import pipeline

    if not os.path.isdir(name) and (os.path.exists(name) or os.path.isabs(name) or name.startswith(".")):
        raise ValueError(f"No ASR checkpoint folder at {name!r} (a transformers ASR checkpoint is a folder with "
                         f"config.json and weights); {ASR_SPEC_HELP}.")
    try:
        asr = pipeline("automatic-speech-recognition", model=name, device=device)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().rstrip(".")
        raise ValueError(
            f"Could not load {name!r} as a transformers ASR model ({type(error).__name__}: {reason}). A Hub id must be "
            f"cached or reachable (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); "
            f"otherwise {ASR_SPEC_HELP}."
        ) from error
    rate = asr.feature_extractor.sampling_rate

    def transcribe_batch(clips):
        texts = []
        for waveform, sampling_rate in clips:
            raw = load_audio(waveform, sampling_rate, target_sampling_rate=rate, max_seconds=None, allow_silence=True)
            texts.append(asr({"raw": raw, "sampling_rate": rate})["text"])
        return texts

    return SpeechRecognizer(name, transcribe_batch)


def load_speech_recognizer(asr=None, *, model=None, processor=None, max_new_tokens: int = 16, batch_size: int = 16,
                           device=None) -> SpeechRecognizer:
    """The :class:`SpeechRecognizer` that `asr` names.

    Args:
        asr: `"judge"`: the pretrained Whisper judge (:class:`~deeptalk.evaluation.judge.WhisperJudge`, tiny.en from
            the `whisper` extra, loaded once per process); `"auto"`: the judge when installed, else the own path;
            `None` or `"own"`: the DeepTalk `model`'s own ASR path (:func:`~deeptalk.evaluation.transcribe`,
            needs `model` with an audio encoder and `processor`); a `str` Hub id or local folder of a
            transformers ASR checkpoint (loaded with `transformers.pipeline("automatic-speech-recognition")`
            on `device`); a callable `(waveform, sampling_rate) -> str`; or a `SpeechRecognizer` (returned as is).
        max_new_tokens, batch_size: for the own ASR path's greedy decoding.

    Raises:
        ValueError: `asr` is none of these, the checkpoint cannot be loaded, or the own path is asked of a
            model without an audio encoder. The message lists what to pass instead.
    """
    if isinstance(asr, SpeechRecognizer):
        return asr
    if asr == AUTO_ASR:
        from .judge import judge_available

        asr = JUDGE_ASR if judge_available() else OWN_ASR
    if asr == JUDGE_ASR:
        from .judge import default_judge

        return default_judge()
    if asr is None or asr == OWN_ASR:
        return _own_recognizer(model, processor, max_new_tokens, batch_size)
    if isinstance(asr, (str, os.PathLike)):
        return _pipeline_recognizer(os.fspath(asr), device)
    if callable(asr):
        name = getattr(asr, "__qualname__", None) or type(asr).__qualname__
        return SpeechRecognizer(name, lambda clips: [asr(waveform, rate) for waveform, rate in clips])
    raise ValueError(f"asr={asr!r} ({type(asr).__name__}) is not an ASR: {ASR_SPEC_HELP}.")


def spoken_answers(model, processor, codec, records, *, max_steps: int = 200,
                   decoding: dict | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Text + spoken answers to spoken_qa records (`question_audio`), one decoding each
    (:func:`deeptalk.generation.generate_speech_answer`; `decoding` holds `SpeechDecodingConfig` fields,
    e.g. `{"strategy": "batch_parallel"}`; default: single-pass with the authors' sampling, and the
    model's first voice when it has voices); the speech
    is decoded with `codec` to 1-D float32 waveforms at `codec.sampling_rate` (empty when the answer
    has no frames)."""
    from ..generation import generate_speech_answer
    from ..recipes.demo_data import spoken_question_conversation

    decoding = dict(decoding or {})
    if decoding.get("voice") is None and processor.layout.voices:  # as SpeechChat: a voiced model expects one
        decoding["voice"] = processor.layout.voices[0]
    texts, waveforms = [], []
    for record in _records_list(records):
        conversation = spoken_question_conversation(_audio_source(record["question_audio"]))
        answer = generate_speech_answer(model, processor, conversation, max_steps=max_steps, **decoding)
        texts.append(answer.text)
        waveform = codec.decode(answer.codes) if answer.codes.shape[-1] else torch.zeros(0)
        waveforms.append(waveform.detach().to("cpu", torch.float32).numpy())
    return texts, waveforms


def spoken_qa_speech_scores(model, processor, codec, records, *, asr=None, max_steps: int = 200,
                            asr_max_new_tokens: int = 16, return_predictions: bool = False,
                            decoding: dict | None = None) -> dict:
    """Speech question -> spoken answer scores on spoken_qa records (`question_audio`, `answer_text`).

    Every spoken answer (decoded with `codec`) is transcribed by `asr` (see :func:`load_speech_recognizer`).

    Returns:
        `{"accuracy": exact-match accuracy of the transcripts vs `answer_text`, "tts_wer": WER of the
        transcripts against the model's own text answers (None when every text answer is empty),
        "asr": the ASR's name, "num_examples": records scored, "num_tts_wer_examples": answers with a
        non-empty text answer (the only ones TTS WER is defined for)}`; with `return_predictions`, also
        `"text_answers"` and `"transcripts"`.
    """
    recognizer = load_speech_recognizer(asr, model=model, processor=processor, max_new_tokens=asr_max_new_tokens)
    records = _records_list(records)
    text_answers, waveforms = spoken_answers(model, processor, codec, records, max_steps=max_steps, decoding=decoding)
    transcripts = recognizer.transcribe([(waveform, codec.sampling_rate) for waveform in waveforms])
    normalize = recognizer.normalize or normalize_answer
    said = [i for i, text in enumerate(text_answers) if normalize(text)]
    references = [normalize(r["answer_text"]) for r in records]
    heard = [normalize(t) for t in transcripts]
    scores = {
        "accuracy": answer_accuracy(heard, references),
        "tts_wer": (
            word_error_rate([normalize(text_answers[i]) for i in said], [heard[i] for i in said]) if said else None
        ),
        "asr": recognizer.name,
        "num_examples": len(records),
        "num_tts_wer_examples": len(said),
    }
    if return_predictions:
        scores.update(text_answers=text_answers, transcripts=transcripts)
    return scores
