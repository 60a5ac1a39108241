"""Speaking: decode a text + speech answer (single-pass or batch-parallel), stream it as audio chunks,
and chat with a model (`SpeechChat`). The decoding itself is `deeptalk/generation_deeptalk.py`, the
remote-code file saved folders carry."""

from . import decoding
from .chat import ChatReply, SpeechChat, user_message
from .decoding import *  # noqa: F403  (the decoding names, listed once: generation_deeptalk.__all__)
from .streaming import AudioChunk, IncrementalSpeechDecoder, TextDelta

__all__ = ["AudioChunk", "ChatReply", "IncrementalSpeechDecoder", "SpeechChat", "TextDelta", "user_message",
           *decoding.__all__]
