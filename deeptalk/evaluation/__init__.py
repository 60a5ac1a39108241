"""Evaluation: greedy text answers, QA accuracy, audio-token accuracy, relative drop, WER / CER."""

from .metrics import (
    answer_accuracy,
    asr_error_rates,
    audio_token_accuracy,
    character_error_rate,
    dataset_audio_token_accuracy,
    generate_text_answers,
    is_deeptalk_model,
    normalize_answer,
    relative_drop,
    spoken_qa_text_accuracy,
    stream_token_counts,
    text_qa_accuracy,
    word_error_rate,
)

__all__ = [
    "answer_accuracy",
    "asr_error_rates",
    "audio_token_accuracy",
    "character_error_rate",
    "dataset_audio_token_accuracy",
    "generate_text_answers",
    "is_deeptalk_model",
    "normalize_answer",
    "relative_drop",
    "spoken_qa_text_accuracy",
    "stream_token_counts",
    "text_qa_accuracy",
    "word_error_rate",
]
