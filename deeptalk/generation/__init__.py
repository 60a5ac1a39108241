"""Speaking: decode a text + speech answer (single-pass or batch-parallel), stream it as audio chunks,
and chat with a model (`SpeechChat`). The decoding itself is `deeptalk/generation_deeptalk.py`, the
remote-code file saved folders carry."""

from . import decoding
from .chat import ChatReply, SpeechChat, user_message
from .decoding import (
    STRATEGIES,
    DecodeResult,
    DecodeStep,
    SpeechAnswer,
    SpeechDecodingConfig,
    decode_steps,
    generate_speech_answer,
)
from .streaming import AudioChunk, IncrementalSpeechDecoder, TextDelta

__all__ = ["AudioChunk", "ChatReply", "IncrementalSpeechDecoder", "SpeechChat", "TextDelta", "user_message",
           *decoding.__all__]
