"""Speech in and out: audio loading, the multi-stream token layout, codecs, tokenizer specials."""

from .audio import WHISPER_SAMPLING_RATE, load_audio
from .layout import SpeechTokenLayout
from .tokenizer import TEXT_SPECIAL_TOKENS, add_deeptalk_tokens, train_demo_tokenizer

__all__ = [
    "WHISPER_SAMPLING_RATE",
    "SpeechTokenLayout",
    "TEXT_SPECIAL_TOKENS",
    "add_deeptalk_tokens",
    "load_audio",
    "train_demo_tokenizer",
]
