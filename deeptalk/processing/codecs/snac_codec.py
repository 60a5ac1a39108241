"""SNACCodec: SNAC (Multi-Scale Neural Audio Codec), the paper's codec, behind the `SpeechCodec` interface
(needs `pip install snac`). Defined in `deeptalk/codec_deeptalk.py`, which saved model folders carry as
remote code."""

from ...codec_deeptalk import (
    SNAC_CONFIG_NAME,
    SNAC_PICKLE_NAME,
    STREAM_ORDERS,
    SNACCodec,
    _snac_class,
    snac_flatten,
    snac_stream_table,
    snac_unflatten,
)

__all__ = [
    "SNAC_CONFIG_NAME",
    "SNAC_PICKLE_NAME",
    "STREAM_ORDERS",
    "SNACCodec",
    "_snac_class",
    "snac_flatten",
    "snac_stream_table",
    "snac_unflatten",
]
