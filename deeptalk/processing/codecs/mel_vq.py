"""MelVQCodec: an offline log-mel residual-VQ "codec" that needs no downloaded weights (CPU demos, tests,
the quickstart). Defined in `deeptalk/codec_deeptalk.py`, which saved model folders carry as remote code."""

from ...codec_deeptalk import MelVQCodec, kmeans, log_mel_distance, nearest_centroid

__all__ = ["MelVQCodec", "kmeans", "log_mel_distance", "nearest_centroid"]
