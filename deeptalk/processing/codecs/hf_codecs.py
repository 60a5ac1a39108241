"""Neural codecs that ship with transformers, each through its own model class.

* :class:`MimiCodec` - ``transformers.MimiModel`` (``kyutai/mimi``: 24 kHz, 12.5 Hz, split RVQ with
  2048-entry codebooks; stream 0 is the semantic codebook). ``N = num_quantizers`` used (default 8,
  Moshi's choice, or all the model has if fewer).
* :class:`DacCodec` - ``transformers.DacModel`` (``descript/dac_16khz`` / ``_24khz`` / ``_44khz``).
  ``N = n_quantizers`` (default: all codebooks). Note the transformers API: ``decode(audio_codes=...)``,
  the first positional argument is the float latent.
* :class:`EncodecCodec` - ``transformers.EncodecModel`` (``facebook/encodec_24khz``, 75 Hz).
  ``N`` follows the chosen bandwidth (6 kbps -> 8 codebooks). Only the un-chunked, un-normalised
  models (24 kHz) fit the ``[N, F]`` interface; the 48 kHz model needs per-chunk scales and is refused.

``from_pretrained`` delegates to the transformers class's ``from_pretrained`` (Hub ids work online;
local directories never touch the network); ``save_pretrained`` uses the transformers model's
``save_pretrained`` (``config.json`` + ``model.safetensors``) plus deeptalk's ``codec_config.json``
recording the options (number of quantizers, bandwidth).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Optional

import torch

from .base import SpeechCodec, hub_download_codec_config, register_codec


class _TransformersCodec(SpeechCodec):
    """Shared plumbing: hold a transformers ``PreTrainedModel`` in ``self.model``."""

    model_class_name: ClassVar[str] = ""
    #: option names stored in codec_config.json and accepted by __init__ / from_pretrained
    option_names: ClassVar[tuple] = ()

    def __init__(self, model: "torch.nn.Module", codec_name: Optional[str] = None):
        super().__init__(codec_name=codec_name)
        self.model = model.eval()
        self.eval()

    @classmethod
    def _model_class(cls):
        import transformers

        return getattr(transformers, cls.model_class_name)

    @classmethod
    def _config_class(cls):
        import transformers

        return getattr(transformers, cls.model_class_name.replace("Model", "Config"))

    @classmethod
    def from_config(cls, config: Any = None, **options: Any) -> "_TransformersCodec":
        """Randomly initialised model from a transformers config object (or config kwargs)."""
        if config is None or isinstance(config, dict):
            config = cls._config_class()(**(config or {}))
        return cls(cls._model_class()(config), **options)

    @property
    def sampling_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    def _options(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names}

    def _extra_codec_config(self) -> Dict[str, Any]:
        return self._options()

    def layout(self) -> Dict[str, Any]:
        out = super().layout()
        out.update(self._options())
        out["model_type"] = getattr(self.model.config, "model_type", None)
        return out

    def _save_weights(self, directory: str) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)

    @classmethod
    def _load_model(cls, name_or_path: str, **kwargs: Any):
        return cls._model_class().from_pretrained(name_or_path, **kwargs)

    @classmethod
    def _split_kwargs(cls, kwargs: Dict[str, Any]):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.option_names}
        return options, kwargs

    @classmethod
    def _from_local_dir(cls, directory: str, codec_config: Optional[Dict[str, Any]], **kwargs: Any):
        options, model_kwargs = cls._split_kwargs(dict(kwargs))
        merged = dict((codec_config or {}).get("options", {}))
        merged.update(options)
        name = (codec_config or {}).get("codec_name") or directory
        return cls(cls._load_model(directory, **model_kwargs), codec_name=name, **merged)

    @classmethod
    def _from_hub(cls, repo_id: str, **kwargs: Any):
        options, model_kwargs = cls._split_kwargs(dict(kwargs))
        hub_kwargs = {k: model_kwargs[k] for k in ("revision", "cache_dir", "token") if k in model_kwargs}
        cfg = hub_download_codec_config(repo_id, **hub_kwargs) or {}
        merged = dict(cfg.get("options", {}))
        merged.update(options)
        return cls(cls._load_model(repo_id, **model_kwargs), codec_name=cfg.get("codec_name") or repo_id, **merged)


@register_codec
class MimiCodec(_TransformersCodec):
    """Mimi (Moshi's codec) through ``transformers.MimiModel``; ``N = num_quantizers``."""

    codec_type = "mimi"
    model_class_name = "MimiModel"
    option_names = ("num_quantizers",)
    default_decode_context = 4

    def __init__(
        self, model: "torch.nn.Module", num_quantizers: Optional[int] = None, codec_name: Optional[str] = None
    ):
        super().__init__(model, codec_name=codec_name)
        total = int(model.config.num_quantizers)
        if num_quantizers is None:
            num_quantizers = min(8, total)
        if not 1 <= int(num_quantizers) <= total:
            raise ValueError(f"num_quantizers must be in [1, {total}] for this Mimi model, got {num_quantizers}")
        self.num_quantizers = int(num_quantizers)

    @property
    def num_streams(self) -> int:
        return self.num_quantizers

    @property
    def samples_per_frame(self) -> int:
        return int(self.model.config.frame_size)

    def stream_info(self):
        n_sem = int(self.model.config.num_semantic_quantizers)
        return [{"stream": i, "quantizer": i, "semantic": i < n_sem} for i in range(self.num_streams)]

    def _encode(self, waveform: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(waveform.view(1, 1, -1), num_quantizers=self.num_quantizers, return_dict=True)
        return out.audio_codes[0]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes[None], return_dict=True).audio_values.reshape(-1)


@register_codec
class DacCodec(_TransformersCodec):
    """Descript Audio Codec through ``transformers.DacModel``; ``N = n_quantizers``."""

    codec_type = "dac"
    model_class_name = "DacModel"
    option_names = ("n_quantizers",)
    default_decode_context = 8

    def __init__(self, model: "torch.nn.Module", n_quantizers: Optional[int] = None, codec_name: Optional[str] = None):
        super().__init__(model, codec_name=codec_name)
        total = int(model.config.n_codebooks)
        n_quantizers = total if n_quantizers is None else int(n_quantizers)
        if not 1 <= n_quantizers <= total:
            raise ValueError(f"n_quantizers must be in [1, {total}] for this DAC model, got {n_quantizers}")
        self.n_quantizers = n_quantizers

    @property
    def num_streams(self) -> int:
        return self.n_quantizers

    @property
    def samples_per_frame(self) -> int:
        return int(self.model.config.hop_length)

    def stream_info(self):
        return [{"stream": i, "quantizer": i} for i in range(self.num_streams)]

    def _encode(self, waveform: torch.Tensor) -> torch.Tensor:
        hop = self.samples_per_frame
        pad = (-waveform.numel()) % hop  # DAC's convolutions need whole hops
        x = torch.nn.functional.pad(waveform, (0, pad)).view(1, 1, -1)
        out = self.model.encode(x, n_quantizers=self.n_quantizers, return_dict=True)
        return out.audio_codes[0, : self.n_quantizers]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        # keyword argument on purpose: DacModel.decode's first positional argument is the float latent
        return self.model.decode(audio_codes=codes[None], return_dict=True).audio_values.reshape(-1)


@register_codec
class EncodecCodec(_TransformersCodec):
    """EnCodec (24 kHz) through ``transformers.EncodecModel``; ``N`` = codebooks at ``bandwidth`` kbps."""

    codec_type = "encodec"
    model_class_name = "EncodecModel"
    option_names = ("bandwidth",)
    default_decode_context = 8

    def __init__(self, model: "torch.nn.Module", bandwidth: Optional[float] = None, codec_name: Optional[str] = None):
        super().__init__(model, codec_name=codec_name)
        cfg = model.config
        if cfg.chunk_length is not None or cfg.normalize:
            raise NotImplementedError(
                "This EnCodec model encodes in normalised chunks with per-chunk scales (e.g. facebook/encodec_48khz), "
                "which the [num_streams, frames] interface cannot carry; use facebook/encodec_24khz."
            )
        bandwidths = [float(b) for b in cfg.target_bandwidths]
        if bandwidth is None:
            bandwidth = 6.0 if 6.0 in bandwidths else bandwidths[-1]
        if float(bandwidth) not in bandwidths:
            raise ValueError(f"bandwidth must be one of the model's target_bandwidths {bandwidths}, got {bandwidth}")
        self.bandwidth = float(bandwidth)
        self._n_q = int(model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))

    @property
    def num_streams(self) -> int:
        return self._n_q

    @property
    def samples_per_frame(self) -> int:
        return int(math.prod(self.model.config.upsampling_ratios))

    def stream_info(self):
        return [{"stream": i, "quantizer": i} for i in range(self.num_streams)]

    def _encode(self, waveform: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(waveform.view(1, 1, -1), bandwidth=self.bandwidth, return_dict=True)
        return out.audio_codes[0, 0]  # [chunks=1, batch=1, N, F] -> [N, F]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(codes[None, None], [None], return_dict=True)
        return out.audio_values.reshape(-1)
