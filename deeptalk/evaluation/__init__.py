"""Evaluation: greedy text answers, QA accuracy, audio-token accuracy, relative drop, ASR transcription, what a CTC
adapter hears, spoken-answer scoring (speech -> speech accuracy, TTS WER) and WER / CER through a local `evaluate`
metric."""

from .metrics import (
    ERROR_RATE_METRIC_PATH,
    answer_accuracy,
    asr_error_rates,
    audio_token_accuracy,
    character_error_rate,
    dataset_audio_token_accuracy,
    generate_text_answers,
    heard_error_rates,
    heard_transcripts,
    is_deeptalk_model,
    load_error_rate_metric,
    normalize_answer,
    relative_drop,
    spoken_qa_text_accuracy,
    stream_token_counts,
    text_qa_accuracy,
    transcribe,
    word_error_rate,
)
from .speech import OWN_ASR, SpeechRecognizer, load_speech_recognizer, spoken_answers, spoken_qa_speech_scores

__all__ = [
    "ERROR_RATE_METRIC_PATH",
    "OWN_ASR",
    "SpeechRecognizer",
    "answer_accuracy",
    "asr_error_rates",
    "audio_token_accuracy",
    "character_error_rate",
    "dataset_audio_token_accuracy",
    "generate_text_answers",
    "heard_error_rates",
    "heard_transcripts",
    "is_deeptalk_model",
    "load_error_rate_metric",
    "load_speech_recognizer",
    "normalize_answer",
    "relative_drop",
    "spoken_answers",
    "spoken_qa_speech_scores",
    "spoken_qa_text_accuracy",
    "stream_token_counts",
    "text_qa_accuracy",
    "transcribe",
    "word_error_rate",
]
