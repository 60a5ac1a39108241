"""Speech codecs behind one interface (:class:`SpeechCodec`): waveform <-> ``[num_streams, frames]`` tokens.

==================  =========================================  ==============================================
class               backend                                    typical layout
==================  =========================================  ==============================================
:class:`SNACCodec`  ``snac`` package (the paper's codec)        24 kHz, 7 streams x 4096, ~11.7 steps/s
:class:`MimiCodec`  ``transformers.MimiModel``                  24 kHz, 8 streams x 2048, 12.5 steps/s
:class:`DacCodec`   ``transformers.DacModel``                   16 kHz, 12 streams x 1024, 50 steps/s
:class:`EncodecCodec` ``transformers.EncodecModel`` (24 kHz)    24 kHz, 8 streams x 1024 @6 kbps, 75 steps/s
:class:`MelVQCodec` offline log-mel RVQ + Griffin-Lim           16 kHz, 4 streams x 512, 25 steps/s
==================  =========================================  ==============================================

Heavy backends (``snac``, ``transformers``) are imported lazily, when a codec is built or loaded. SNAC,
MelVQ, the interface and :func:`load_codec` live in `deeptalk/codec_deeptalk.py` (saved model folders
carry it as remote code); importing this package also registers the transformers codecs.
"""

from ...codec_deeptalk import load_codec
from .base import (
    CODEC_CONFIG_NAME,
    CODEC_REGISTRY,
    WEIGHTS_NAME,
    SpeechCodec,
    hub_download_codec_config,
    read_codec_config,
    register_codec,
)
from .hf_codecs import DacCodec, EncodecCodec, MimiCodec
from .mel_vq import MelVQCodec, kmeans, log_mel_distance
from .snac_codec import SNACCodec, snac_flatten, snac_stream_table, snac_unflatten

__all__ = [
    "SpeechCodec",
    "SNACCodec",
    "MimiCodec",
    "DacCodec",
    "EncodecCodec",
    "MelVQCodec",
    "load_codec",
    "register_codec",
    "read_codec_config",
    "hub_download_codec_config",
    "CODEC_REGISTRY",
    "CODEC_CONFIG_NAME",
    "WEIGHTS_NAME",
    "snac_flatten",
    "snac_unflatten",
    "snac_stream_table",
    "kmeans",
    "log_mel_distance",
]
