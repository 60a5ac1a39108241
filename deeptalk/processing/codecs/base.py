"""The one interface every speech codec in deeptalk implements (:class:`SpeechCodec`).

Defined in `deeptalk/codec_deeptalk.py`, the file saved model folders carry as remote code; see its
docstring for the contract every codec keeps.
"""

from ...codec_deeptalk import (
    CODEC_CONFIG_NAME,
    CODEC_FORMAT_VERSION,
    CODEC_REGISTRY,
    WEIGHTS_NAME,
    SpeechCodec,
    WaveformLike,
    as_mono_waveform,
    hub_download_codec_config,
    load_state_dict_safetensors,
    read_codec_config,
    register_codec,
    save_state_dict_safetensors,
    write_codec_config,
)

__all__ = [
    "CODEC_CONFIG_NAME",
    "CODEC_FORMAT_VERSION",
    "CODEC_REGISTRY",
    "WEIGHTS_NAME",
    "SpeechCodec",
    "WaveformLike",
    "as_mono_waveform",
    "hub_download_codec_config",
    "load_state_dict_safetensors",
    "read_codec_config",
    "register_codec",
    "save_state_dict_safetensors",
    "write_codec_config",
]
