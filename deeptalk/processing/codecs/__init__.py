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

Heavy backends (``snac``, ``transformers``) are imported lazily, when a codec is built or loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any, Union

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
    "CODEC_REGISTRY",
    "CODEC_CONFIG_NAME",
    "WEIGHTS_NAME",
    "snac_flatten",
    "snac_unflatten",
    "snac_stream_table",
    "kmeans",
    "log_mel_distance",
]

# native (non-deeptalk) checkpoints: transformers `model_type` -> codec class
_MODEL_TYPE_TO_CODEC = {"mimi": MimiCodec, "dac": DacCodec, "encodec": EncodecCodec}


def _codec_class_for_native_config(config: dict, where: str):
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPE_TO_CODEC:
        return _MODEL_TYPE_TO_CODEC[model_type]
    if "vq_strides" in config and "encoder_rates" in config:  # snac's config.json
        return SNACCodec
    raise ValueError(
        f"Cannot tell which codec {where} holds: no {CODEC_CONFIG_NAME} and config.json has model_type="
        f"{model_type!r}. Known codec types: {sorted(CODEC_REGISTRY)}; load it with the codec class directly, "
        "e.g. MimiCodec.from_pretrained(path)."
    )


def load_codec(path_or_name: Union[str, os.PathLike], **kwargs: Any) -> SpeechCodec:
    """Load any codec: a directory saved by ``SpeechCodec.save_pretrained`` (dispatch on ``codec_type`` in
    ``codec_config.json``), a native checkpoint directory (transformers Mimi/DAC/EnCodec or snac), or a Hub id.

    Hub ids: a deeptalk-format repo is dispatched on its ``codec_config.json``; otherwise ids containing
    ``snac`` go to :class:`SNACCodec`, and anything else is tried as a transformers model (its ``config.json``
    ``model_type`` picks Mimi, DAC or EnCodec). Extra ``kwargs`` go to the codec's ``from_pretrained``
    (e.g. ``num_quantizers=8`` for Mimi). Set ``HF_HUB_OFFLINE=1`` to guarantee no network access.
    """
    path = os.fspath(path_or_name)
    if os.path.isdir(path):
        cfg = read_codec_config(path)
        if cfg is not None:
            codec_type = cfg.get("codec_type")
            if codec_type not in CODEC_REGISTRY:
                raise ValueError(
                    f"{os.path.join(path, CODEC_CONFIG_NAME)} names codec_type={codec_type!r}, which is not registered; "
                    f"known: {sorted(CODEC_REGISTRY)}."
                )
            return CODEC_REGISTRY[codec_type].from_pretrained(path, **kwargs)
        native = os.path.join(path, "config.json")
        if not os.path.isfile(native):
            raise FileNotFoundError(f"{path!r} has neither {CODEC_CONFIG_NAME} nor config.json; it is not a saved codec.")
        with open(native, "r", encoding="utf-8") as f:
            return _codec_class_for_native_config(json.load(f), repr(path)).from_pretrained(path, **kwargs)
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; load_codec expects a directory or a Hub id.")
    if path.lower() in CODEC_REGISTRY:
        raise ValueError(
            f"{path!r} is a codec type, not a checkpoint. Build it directly (e.g. MelVQCodec().fit(...)) "
            "or pass a directory / Hub id."
        )
    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token") if k in kwargs}
    cfg = hub_download_codec_config(path, **hub_kwargs)
    if cfg is not None and cfg.get("codec_type") in CODEC_REGISTRY:
        return CODEC_REGISTRY[cfg["codec_type"]].from_pretrained(path, **kwargs)
    if "snac" in path.lower():
        return SNACCodec.from_pretrained(path, **kwargs)
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(path, "config.json", **hub_kwargs), "r", encoding="utf-8") as f:
        native_cfg = json.load(f)
    return _codec_class_for_native_config(native_cfg, repr(path)).from_pretrained(path, **kwargs)
