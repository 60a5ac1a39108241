"""Conversions of third-party checkpoints into transformers models."""

from .whisper_ct2 import SHIPPED_WHISPER_MODELS, convert_ct2_whisper, load_pretrained_whisper, read_ct2_model

__all__ = ["SHIPPED_WHISPER_MODELS", "convert_ct2_whisper", "load_pretrained_whisper", "read_ct2_model"]
