"""The one interface every speech codec in deeptalk implements.

A :class:`SpeechCodec` turns one mono utterance into a ``[num_streams, frames]`` grid of integer
tokens (one column per LLM decoding step) and back into a waveform. The model never sees the codec's
own internal layout (SNAC's three levels, an RVQ's quantizers, ...): it only sees ``num_streams``
streams that share one ``codebook_size`` and advance at ``frame_rate`` steps per second.

Contract (checked by ``tests/test_codecs.py`` for every implementation):

* ``encode(waveform, sampling_rate)`` accepts a 1-D float ``torch.Tensor`` or ``numpy.ndarray``
  at any positive sampling rate (resampled to the codec's rate with
  :func:`torchaudio.functional.resample`) and returns a ``torch.long`` tensor ``[N, F]`` with
  ``F = ceil(num_samples_at_codec_rate / samples_per_frame)`` and values in ``[0, codebook_size)``.
* ``decode(codes)`` returns a 1-D ``float32`` waveform of exactly ``F * samples_per_frame`` samples
  at ``sampling_rate`` (codec padding is cropped / zero-filled so the length is predictable).
* ``decode_frames(codes, start, end)`` decodes frames ``[start, end)`` using a little context on
  both sides; this is the building block for chunked (streaming) decoding.
* ``layout()`` is a JSON-serialisable description of the frame layout to store in a model config.
* ``save_pretrained(dir)`` writes ``codec_config.json`` plus safetensors weights (never pickle);
  ``from_pretrained(dir_or_hub_id)`` reads them back, and :func:`deeptalk.processing.codecs.load_codec`
  dispatches on the ``codec_type`` stored in ``codec_config.json``.

Codecs are frozen, inference-only modules: ``train()`` is a no-op that keeps them in eval mode
(some wrapped models, e.g. DAC, apply quantizer dropout in training mode).
"""

from __future__ import annotations

import abc
import json
import math
import numbers
import os
from typing import Any, ClassVar, Dict, Optional, Type, Union

import numpy as np
import torch
from torch import nn

CODEC_CONFIG_NAME = "codec_config.json"
WEIGHTS_NAME = "model.safetensors"
CODEC_FORMAT_VERSION = 1

# codec_type -> class; filled by @register_codec
CODEC_REGISTRY: Dict[str, Type["SpeechCodec"]] = {}

WaveformLike = Union[torch.Tensor, np.ndarray]


def register_codec(cls: Type["SpeechCodec"]) -> Type["SpeechCodec"]:
    """Class decorator: make ``cls`` loadable by :func:`load_codec` under ``cls.codec_type``."""
    key = cls.codec_type
    if not key:
        raise TypeError(f"{cls.__name__} must set a non-empty `codec_type` class attribute")
    CODEC_REGISTRY[key] = cls
    return cls


def read_codec_config(directory: str) -> Optional[Dict[str, Any]]:
    """Return the parsed ``codec_config.json`` in ``directory``, or ``None`` if there is none."""
    path = os.path.join(directory, CODEC_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def write_codec_config(directory: str, config: Dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CODEC_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def save_state_dict_safetensors(state_dict: Dict[str, torch.Tensor], directory: str) -> str:
    """Write ``state_dict`` to ``directory/model.safetensors`` (tensors cloned so that no storage is shared)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    save_file(tensors, path, metadata={"format": "pt", "producer": "deeptalk.processing.codecs"})
    return path


def load_state_dict_safetensors(directory: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {directory!r}. deeptalk codecs store weights as safetensors only; "
            "save the codec with `codec.save_pretrained(directory)`."
        )
    return load_file(path, device="cpu")


def hub_download_codec_config(repo_id: str, **hub_kwargs: Any) -> Optional[Dict[str, Any]]:
    """Best effort: fetch ``codec_config.json`` from a Hub repo (``None`` if absent or offline)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=repo_id, filename=CODEC_CONFIG_NAME, **hub_kwargs)
    except Exception:  # offline, missing file, missing repo: the caller falls back to the native loader
        return None
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _check_sampling_rate(sampling_rate: Any) -> int:
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, numbers.Real):
        raise ValueError(
            f"sampling_rate must be a positive number of samples per second (e.g. 16000), got {sampling_rate!r}."
        )
    if not math.isfinite(float(sampling_rate)) or sampling_rate <= 0:
        raise ValueError(
            f"sampling_rate must be > 0, got {sampling_rate!r}. Pass the rate the audio was recorded/read at "
            "(e.g. the second value returned by soundfile.read)."
        )
    if float(sampling_rate) != int(sampling_rate):
        raise ValueError(f"sampling_rate must be a whole number of Hz, got {sampling_rate!r}.")
    return int(sampling_rate)


def as_mono_waveform(waveform: WaveformLike) -> torch.Tensor:
    """Validate ``waveform`` and return it as a 1-D float32 CPU/any-device tensor.

    Raises ``ValueError`` (with the fix in the message) for non-1-D input, empty input, integer PCM,
    complex values, NaN and inf.
    """
    if isinstance(waveform, np.ndarray):
        if waveform.dtype == object:
            raise ValueError("waveform must be a numeric array, got a numpy array of Python objects.")
        if np.iscomplexobj(waveform):
            raise ValueError("waveform must be real-valued, got complex values.")
        if not (np.issubdtype(waveform.dtype, np.floating)):
            raise ValueError(
                f"waveform must be floating point in [-1, 1], got numpy dtype {waveform.dtype}. "
                "For 16-bit PCM use `x.astype(np.float32) / 32768`, or read with soundfile.read(path, dtype='float32')."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(waveform))
    elif isinstance(waveform, torch.Tensor):
        tensor = waveform
        if tensor.is_complex():
            raise ValueError("waveform must be real-valued, got a complex tensor.")
        if not tensor.is_floating_point():
            raise ValueError(
                f"waveform must be floating point in [-1, 1], got torch dtype {tensor.dtype}. "
                "For 16-bit PCM use `x.float() / 32768`."
            )
    else:
        raise ValueError(
            f"waveform must be a 1-D torch.Tensor or numpy.ndarray, got {type(waveform).__name__}. "
            "Wrap lists with numpy.asarray(x, dtype=numpy.float32)."
        )
    if tensor.ndim != 1:
        raise ValueError(
            f"waveform must be 1-D mono audio [num_samples], got shape {tuple(tensor.shape)}. "
            "Mix multi-channel audio to mono first, e.g. `waveform.mean(dim=0)` for [channels, samples] "
            "(or `.mean(axis=1)` for soundfile's [samples, channels]), or squeeze a channel dimension of size 1."
        )
    if tensor.numel() == 0:
        raise ValueError("waveform is empty (0 samples): there is no audio to encode. Check the file or the slice.")
    tensor = tensor.detach().to(torch.float32)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise ValueError(
            f"waveform contains non-finite values ({n_nan} NaN, {n_inf} inf). "
            "Fix the audio source, or replace them first, e.g. `torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)`."
        )
    return tensor


class SpeechCodec(nn.Module, abc.ABC):
    """Abstract speech codec: mono waveform <-> ``[num_streams, frames]`` integer tokens.

    Subclasses set ``codec_type`` (registry key), implement the five layout properties,
    ``_encode`` / ``_decode`` on validated inputs, ``_save_weights`` and ``_from_local_dir``.
    """

    codec_type: ClassVar[str] = ""
    #: frames of context decoded on each side by :meth:`decode_frames` when none is given.
    default_decode_context: ClassVar[int] = 4

    def __init__(self, codec_name: Optional[str] = None):
        super().__init__()
        self._codec_name = codec_name

    # ------------------------------------------------------------------ layout
    @property
    def codec_name(self) -> str:
        """Human-readable name: the Hub id / path it came from, or the codec type."""
        return self._codec_name or self.codec_type

    @property
    @abc.abstractmethod
    def sampling_rate(self) -> int:
        """Native sampling rate of the codec (Hz); ``decode`` returns audio at this rate."""

    @property
    @abc.abstractmethod
    def num_streams(self) -> int:
        """Number N of token streams fed to the LLM per step."""

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """Shared codebook size; every token is in ``[0, codebook_size)``."""

    @property
    @abc.abstractmethod
    def samples_per_frame(self) -> int:
        """Waveform samples (at ``sampling_rate``) covered by one LLM step / one column of codes."""

    @property
    def frame_rate(self) -> float:
        """LLM steps per second of audio."""
        return self.sampling_rate / self.samples_per_frame

    def stream_info(self):
        """Per-stream description (list of dicts), e.g. SNAC level and offset; override in subclasses."""
        return [{"stream": i} for i in range(self.num_streams)]

    def layout(self) -> Dict[str, Any]:
        """JSON-serialisable frame layout, meant to be stored in a model config."""
        return {
            "codec_type": self.codec_type,
            "codec_name": self.codec_name,
            "num_streams": int(self.num_streams),
            "codebook_size": int(self.codebook_size),
            "frame_rate": float(self.frame_rate),
            "sampling_rate": int(self.sampling_rate),
            "samples_per_frame": int(self.samples_per_frame),
            "streams": self.stream_info(),
        }

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def train(self, mode: bool = True):  # noqa: D401 - nn.Module API
        """Codecs are frozen and inference-only: always stay in eval mode."""
        return super().train(False)

    def num_frames_for(self, num_samples: int) -> int:
        """Frames ``encode`` returns for ``num_samples`` samples at the codec's own rate."""
        return max(1, math.ceil(num_samples / self.samples_per_frame))

    def prepare_waveform(self, waveform: WaveformLike, sampling_rate: Any) -> torch.Tensor:
        """Validate, convert to float32, move to the codec's device and resample to ``self.sampling_rate``."""
        sr = _check_sampling_rate(sampling_rate)
        wav = as_mono_waveform(waveform).to(self.device)
        if sr != self.sampling_rate:
            import torchaudio.functional as AF

            wav = AF.resample(wav, orig_freq=sr, new_freq=int(self.sampling_rate))
            if wav.numel() == 0:
                raise ValueError(
                    f"waveform is too short: resampling {waveform.shape[-1]} samples from {sr} Hz to "
                    f"{self.sampling_rate} Hz leaves no samples."
                )
        return wav

    def check_codes(self, codes: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """Validate a ``[num_streams, frames]`` integer code grid and return it as a long tensor on the codec device."""
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(np.ascontiguousarray(codes))
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a torch.Tensor or numpy.ndarray, got {type(codes).__name__}.")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor (torch.long), got dtype {codes.dtype}; use `codes.long()`.")
        if codes.ndim != 2:
            hint = " Drop the batch dimension (codes[0]); decode one utterance at a time." if codes.ndim == 3 else ""
            raise ValueError(
                f"codes must have shape [num_streams, frames] = [{self.num_streams}, F], got shape {tuple(codes.shape)}.{hint}"
            )
        if codes.shape[0] != self.num_streams:
            raise ValueError(
                f"wrong number of streams: {self.codec_name} expects {self.num_streams} streams, got {codes.shape[0]} "
                f"(codes shape {tuple(codes.shape)}). Codes must be [num_streams, frames]; undelay the LLM output first."
            )
        if codes.numel() > 0:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.codebook_size:
                bad = codes[(codes < 0) | (codes >= self.codebook_size)]
                raise ValueError(
                    f"codes out of range: every code must be in [0, {self.codebook_size}) (codebook_size) but found "
                    f"values in [{lo}, {hi}] ({bad.numel()} out of range, e.g. {int(bad[0])}). Strip special tokens "
                    "(PAD_A/EOA/BOA...) and subtract the per-stream vocabulary offset before decoding."
                )
        return codes.to(device=self.device, dtype=torch.long)

    # ------------------------------------------------------------------ public API
    def encode(self, waveform: WaveformLike, sampling_rate: int) -> torch.LongTensor:
        """Encode one mono utterance to codes ``[num_streams, frames]`` (long, on the codec's device)."""
        wav = self.prepare_waveform(waveform, sampling_rate)
        with torch.no_grad():
            codes = self._encode(wav)
        codes = codes.to(torch.long)
        n_frames = self.num_frames_for(wav.numel())
        if codes.ndim != 2 or codes.shape[0] != self.num_streams or codes.shape[1] < n_frames:
            raise RuntimeError(
                f"{type(self).__name__}._encode returned shape {tuple(codes.shape)}, expected "
                f"[{self.num_streams}, >= {n_frames}]"
            )
        return codes[:, :n_frames].contiguous()

    def decode(self, codes: Union[torch.Tensor, np.ndarray]) -> torch.FloatTensor:
        """Decode ``[num_streams, frames]`` codes to a 1-D float32 waveform of ``frames * samples_per_frame`` samples."""
        codes = self.check_codes(codes)
        n_out = codes.shape[1] * self.samples_per_frame
        if codes.shape[1] == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            audio = self._decode(codes).reshape(-1).to(torch.float32)
        return _fit_length(audio, n_out)

    def decode_frames(
        self,
        codes: Union[torch.Tensor, np.ndarray],
        start: int = 0,
        end: Optional[int] = None,
        context: Optional[int] = None,
    ) -> torch.FloatTensor:
        """Decode frames ``[start, end)`` of ``codes`` to ``(end - start) * samples_per_frame`` samples.

        Incremental / streaming decoding: as the LLM emits (undelayed) frames, call
        ``decode_frames(all_codes_so_far, start=next_unplayed, end=available - lookahead)`` and play the
        result. ``context`` frames on each side (default ``default_decode_context``) are decoded and then
        cropped so that chunk boundaries are smooth; with a context at least the decoder's receptive field
        the result equals slicing the full decode (up to the decoder's own stochasticity). This is a
        stateless, recompute-the-context scheme; a cached (stateful) decoder, e.g. Mimi's decoder cache,
        can replace it later without changing the call.
        """
        codes = self.check_codes(codes)
        total = codes.shape[1]
        end = total if end is None else int(end)
        start = int(start)
        if not 0 <= start <= end <= total:
            raise ValueError(f"need 0 <= start <= end <= frames ({total}), got start={start}, end={end}.")
        if start == end:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        ctx = self.default_decode_context if context is None else int(context)
        lo, hi = self._decode_window(max(0, start - ctx), min(total, end + ctx), total)
        audio = self._decode_at(codes[:, lo:hi], lo)
        spf = self.samples_per_frame
        return audio[(start - lo) * spf : (end - lo) * spf]

    def _decode_window(self, lo: int, hi: int, total: int) -> tuple[int, int]:
        """Widen the frames ``[lo, hi)`` a chunk is decoded from, e.g. to whole attention windows."""
        return lo, hi

    def _decode_at(self, codes: torch.Tensor, first_frame: int) -> torch.Tensor:
        """Decode a window of frames that starts at absolute frame ``first_frame`` (codecs whose
        decoder depends on absolute position, e.g. SNAC's seeded noise, override this)."""
        return self.decode(codes)

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def _encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """``waveform``: validated 1-D float32 at ``sampling_rate`` on the codec's device -> ``[N, >=F]`` ints."""

    @abc.abstractmethod
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes``: validated ``[N, F>0]`` long -> waveform with about ``F * samples_per_frame`` samples."""

    def _extra_codec_config(self) -> Dict[str, Any]:
        """Codec-specific options stored in ``codec_config.json`` (read back by ``_from_local_dir``)."""
        return {}

    @abc.abstractmethod
    def _save_weights(self, directory: str) -> None:
        """Write the weights (safetensors) and any native config files into ``directory``."""

    @classmethod
    @abc.abstractmethod
    def _from_local_dir(cls, directory: str, codec_config: Optional[Dict[str, Any]], **kwargs: Any) -> "SpeechCodec":
        """Build the codec from a local directory (``codec_config`` is ``None`` for native-format dirs)."""

    @classmethod
    def _from_hub(cls, repo_id: str, **kwargs: Any) -> "SpeechCodec":
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from the Hub id {repo_id!r}.")

    # ------------------------------------------------------------------ persistence
    def codec_config(self) -> Dict[str, Any]:
        return {
            "codec_type": self.codec_type,
            "codec_name": self.codec_name,
            "format_version": CODEC_FORMAT_VERSION,
            "options": self._extra_codec_config(),
            "layout": self.layout(),
        }

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Save to ``save_directory``: ``codec_config.json`` + safetensors weights (+ native config)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        self._save_weights(save_directory)
        write_codec_config(save_directory, self.codec_config())

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> "SpeechCodec":
        """Load from a directory written by ``save_pretrained`` or from a Hub id (through the native library).

        Called on :class:`SpeechCodec` itself it dispatches like :func:`load_codec`.
        """
        path = os.fspath(pretrained_name_or_path)
        if cls is SpeechCodec or getattr(cls, "__abstractmethods__", None):
            from . import load_codec  # late import: the package registers the implementations

            return load_codec(path, **kwargs)
        if os.path.isdir(path):
            cfg = read_codec_config(path)
            if cfg is not None and cfg.get("codec_type") not in (None, cls.codec_type):
                raise ValueError(
                    f"{path!r} holds a {cfg.get('codec_type')!r} codec, not {cls.codec_type!r}; "
                    "use deeptalk.processing.codecs.load_codec(path) to load any codec."
                )
            codec = cls._from_local_dir(path, cfg, **kwargs)
        else:
            codec = cls._from_hub(path, **kwargs)
        return codec.eval()

    def extra_repr(self) -> str:
        return (
            f"codec_name={self.codec_name!r}, sampling_rate={self.sampling_rate}, num_streams={self.num_streams}, "
            f"codebook_size={self.codebook_size}, frame_rate={self.frame_rate:.3f}"
        )


def _fit_length(audio: torch.Tensor, n: int) -> torch.Tensor:
    """Crop or zero-pad a 1-D tensor to exactly ``n`` samples."""
    if audio.numel() >= n:
        return audio[:n].contiguous()
    return torch.nn.functional.pad(audio, (0, n - audio.numel()))
