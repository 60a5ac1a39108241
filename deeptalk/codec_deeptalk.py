"""DeepTalk's speech codecs as remote code: the `SpeechCodec` interface, `MelVQCodec` and `SNACCodec`.

This file ships next to `modeling_deeptalk.py` in a saved model folder, so a folder exported with its
`codec/` can speak where the deeptalk package is not installed (`model.load_codec()`, then
`model.generate_speech(processor, conversation, codec=codec)`). It needs torch and safetensors;
`MelVQCodec` also needs torchaudio, `SNACCodec` the `snac` package (`pip install snac`), each imported
only when that codec is built. The deeptalk package re-exports everything here from
`deeptalk.processing.codecs` and adds the codecs that ship with transformers (Mimi, DAC, EnCodec).

The interface
-------------
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
  ``from_pretrained(dir_or_hub_id)`` reads them back, and :func:`load_codec` dispatches on the
  ``codec_type`` stored in ``codec_config.json``.

Codecs are frozen, inference-only modules: ``train()`` is a no-op that keeps them in eval mode
(some wrapped models, e.g. DAC, apply quantizer dropout in training mode).

MelVQCodec
----------
An offline "codec" that needs no downloaded weights, for CPU demos, tests and the quickstart: fitted
on the spot from whatever audio you have (seconds to a minute of speech is enough) with a small seeded
k-means, and saved in a few hundred kB. It is not a neural codec: log-mel frames, residual-vector-
quantised, inverted with torchaudio's ``InverseMelScale`` (least squares) + ``GriffinLim`` phase
reconstruction. Speech comes out intelligible-ish but robotic/phasey. Use SNAC (the paper's codec) or
Mimi for anything you want to listen to seriously.

Layout (defaults): 16 kHz audio, 80 slaney mel bins, FFT 1024, hop 320 (50 mel frames/s). One LLM step
carries ``frames_per_step = 2`` consecutive mel frames (640 samples, so ``frame_rate = 25`` steps/s),
each quantised by a ``num_quantizers = 2``-level residual VQ with ``codebook_size = 512`` entries, so
``num_streams = num_quantizers * frames_per_step = 4``. Streams are level-major:
``stream = level * frames_per_step + subframe`` (coarse codes of both sub-frames first, then the
residual codes), which suits the LLM's per-stream delay pattern (coarse before fine). All sub-frames of
one level share that level's codebook. Decoding interpolates the log-mel to a finer hop
(``griffin_lim_hop``, default hop/2) before Griffin-Lim, which improves the round trip over inverting
at the coarse hop.

SNACCodec
---------
SNAC (Multi-Scale Neural Audio Codec), the codec of DeepTalk / Mini-Omni / LUCY, quantises the latent
at several temporal resolutions. ``hubertsiuzdak/snac_24khz`` has ``vq_strides=[4, 2, 1]`` on a hop of
512 samples: level 0 at ~11.7 Hz, level 1 at ~23.4 Hz and level 2 at ~46.9 Hz, i.e. 1 + 2 + 4 = 7 codes
per coarse frame of 2048 samples (~85 ms). The LLM takes one step per coarse frame, so
``num_streams = 7`` and ``frame_rate = 24000 / 2048 ≈ 11.72``.

Stream order (``stream_order="depth_first"``, the default) is Mini-Omni's, which DeepTalk inherits;
for coarse frame ``f``::

    stream: 0        1         2         3           4           5           6
    code:   l0[f]    l1[2f]    l2[4f]    l2[4f+1]    l1[2f+1]    l2[4f+2]    l2[4f+3]

i.e. a depth-first walk of the tree in which each code of level ``k`` has ``stride_k / stride_{k+1}``
children at level ``k+1``. It generalises to 4-level SNACs (32/44 kHz, strides ``[8, 4, 2, 1]``:
15 streams). ``stream_order="level_major"`` gives ``l0[f], l1[2f], l1[2f+1], l2[4f], ..., l2[4f+3]``.
:func:`snac_flatten` and :func:`snac_unflatten` are exact inverses for either order.

Decoding is made deterministic: SNAC's decoder adds Gaussian noise (``NoiseBlock``), drawn here from
a forked RNG seeded with ``decode_seed`` (set ``decode_seed=None`` to use the global RNG instead).
"""

from __future__ import annotations

import abc
import json
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Union

import numpy as np
import torch
from torch import nn


def _torchaudio():
    """torchaudio, imported when a codec needs it (resampling, MelVQ's mel transforms)."""
    try:
        import torchaudio
        import torchaudio.functional  # noqa: F401
    except ImportError:
        raise ImportError(
            "This speech codec needs torchaudio (resampling and mel features): `pip install torchaudio`."
        ) from None
    return torchaudio


CODEC_CONFIG_NAME = "codec_config.json"
WEIGHTS_NAME = "model.safetensors"
CODEC_FORMAT_VERSION = 1

# codec_type -> class; filled by @register_codec
CODEC_REGISTRY: dict[str, type[SpeechCodec]] = {}

WaveformLike = Union[torch.Tensor, np.ndarray]


def register_codec(cls: type[SpeechCodec]) -> type[SpeechCodec]:
    """Class decorator: make ``cls`` loadable by :func:`load_codec` under ``cls.codec_type``."""
    key = cls.codec_type
    if not key:
        raise TypeError(f"{cls.__name__} must set a non-empty `codec_type` class attribute")
    CODEC_REGISTRY[key] = cls
    return cls


def read_codec_config(directory: str) -> dict[str, Any] | None:
    """Return the parsed ``codec_config.json`` in ``directory``, or ``None`` if there is none."""
    path = os.path.join(directory, CODEC_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_codec_config(directory: str, config: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CODEC_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def save_state_dict_safetensors(state_dict: dict[str, torch.Tensor], directory: str) -> str:
    """Write ``state_dict`` to ``directory/model.safetensors`` (tensors cloned so that no storage is shared)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    save_file(tensors, path, metadata={"format": "pt", "producer": "deeptalk.processing.codecs"})
    return path


def load_state_dict_safetensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {directory!r}. deeptalk codecs store weights as safetensors only; "
            "save the codec with `codec.save_pretrained(directory)`."
        )
    return load_file(path, device="cpu")


def hub_download_codec_config(repo_id: str, **hub_kwargs: Any) -> dict[str, Any] | None:
    """Best effort: fetch ``codec_config.json`` from a Hub repo (``None`` if absent or offline)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=repo_id, filename=CODEC_CONFIG_NAME, **hub_kwargs)
    except Exception:  # offline, missing file, missing repo: the caller falls back to the native loader
        return None
    with open(path, encoding="utf-8") as f:
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

    def __init__(self, codec_name: str | None = None):
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

    def layout(self) -> dict[str, Any]:
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
            wav = _torchaudio().functional.resample(wav, orig_freq=sr, new_freq=int(self.sampling_rate))
            if wav.numel() == 0:
                raise ValueError(
                    f"waveform is too short: resampling {waveform.shape[-1]} samples from {sr} Hz to "
                    f"{self.sampling_rate} Hz leaves no samples."
                )
        return wav

    def check_codes(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Validate a ``[num_streams, frames]`` integer code grid and return it as a long tensor on the codec device."""
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(np.ascontiguousarray(codes))
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a torch.Tensor or numpy.ndarray, got {type(codes).__name__}.")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(
                f"codes must be an integer tensor (torch.long), got dtype {codes.dtype}; use `codes.long()`."
            )
        if codes.ndim != 2:
            hint = " Drop the batch dimension (codes[0]); decode one utterance at a time." if codes.ndim == 3 else ""
            raise ValueError(
                f"codes must have shape [num_streams, frames] = [{self.num_streams}, F], "
                f"got shape {tuple(codes.shape)}.{hint}"
            )
        if codes.shape[0] != self.num_streams:
            raise ValueError(
                f"wrong number of streams: {self.codec_name} expects {self.num_streams} streams, got {codes.shape[0]} "
                f"(codes shape {tuple(codes.shape)}). Codes must be [num_streams, frames]; "
                "undelay the LLM output first."
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

    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.FloatTensor:
        """Decode ``[num_streams, frames]`` codes to a 1-D float32 waveform of ``frames * samples_per_frame``
        samples."""
        codes = self.check_codes(codes)
        n_out = codes.shape[1] * self.samples_per_frame
        if codes.shape[1] == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            audio = self._decode(codes).reshape(-1).to(torch.float32)
        return _fit_length(audio, n_out)

    def decode_frames(
        self,
        codes: torch.Tensor | np.ndarray,
        start: int = 0,
        end: int | None = None,
        context: int | None = None,
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

    def _extra_codec_config(self) -> dict[str, Any]:
        """Codec-specific options stored in ``codec_config.json`` (read back by ``_from_local_dir``)."""
        return {}

    @abc.abstractmethod
    def _save_weights(self, directory: str) -> None:
        """Write the weights (safetensors) and any native config files into ``directory``."""

    @classmethod
    @abc.abstractmethod
    def _from_local_dir(cls, directory: str, codec_config: dict[str, Any] | None, **kwargs: Any) -> SpeechCodec:
        """Build the codec from a local directory (``codec_config`` is ``None`` for native-format dirs)."""

    @classmethod
    def _from_hub(cls, repo_id: str, **kwargs: Any) -> SpeechCodec:
        raise NotImplementedError(f"{cls.__name__} cannot be loaded from the Hub id {repo_id!r}.")

    # ------------------------------------------------------------------ persistence
    def codec_config(self) -> dict[str, Any]:
        return {
            "codec_type": self.codec_type,
            "codec_name": self.codec_name,
            "format_version": CODEC_FORMAT_VERSION,
            "options": self._extra_codec_config(),
            "layout": self.layout(),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save to ``save_directory``: ``codec_config.json`` + safetensors weights (+ native config)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
        os.makedirs(save_directory, exist_ok=True)
        self._save_weights(save_directory)
        write_codec_config(save_directory, self.codec_config())

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: str | os.PathLike, **kwargs: Any) -> SpeechCodec:
        """Load from a directory written by ``save_pretrained`` or from a Hub id (through the native library).

        Called on :class:`SpeechCodec` itself it dispatches like :func:`load_codec`.
        """
        path = os.fspath(pretrained_name_or_path)
        if cls is SpeechCodec or getattr(cls, "__abstractmethods__", None):
            return load_codec(path, **kwargs)
        if os.path.isdir(path):
            cfg = read_codec_config(path)
            if cfg is not None and cfg.get("codec_type") not in (None, cls.codec_type):
                raise ValueError(
                    f"{path!r} holds a {cfg.get('codec_type')!r} codec, not {cls.codec_type!r}; "
                    "use load_codec(path) to load any codec."
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


# ======================================== MelVQ
_STATE_KEYS = ("codebooks", "feature_mean", "feature_std", "fitted")


# ---------------------------------------------------------------------------------------------- k-means
def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.T + c.pow(2).sum(1)[None, :]).clamp_min_(0.0)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean) for each row of ``x``; chunked to bound memory."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], chunk):
        out[i : i + chunk] = _sq_dists(x[i : i + chunk], centroids).argmin(1)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Seeded k-means (k-means++ init, Lloyd updates, empty clusters re-seeded at the worst-fit points).

    ``x``: ``[n, d]`` float. Returns ``[k, d]`` centroids. Deterministic for a given ``seed`` and device.
    Works for ``n < k`` too (some centroids then duplicate data points).
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [n, d] matrix, got shape {tuple(x.shape)}")
    x = x.float()
    n = x.shape[0]
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=g))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[first]
    # distance to each new centroid as |x|^2 - 2 x.c + |c|^2: one matrix-vector product a pick, no [n, d] temporary
    x_sq = x.pow(2).sum(1)
    d2 = (x_sq - 2.0 * (x @ x[first]) + x_sq[first]).clamp_min_(0.0)
    for j in range(1, k):
        total = float(d2.sum())
        probs = (d2 / total) if total > 0 else torch.full_like(d2, 1.0 / n)
        pick = int(torch.multinomial(probs.cpu(), 1, generator=g))
        centroids[j] = x[pick]
        d2 = torch.minimum(d2, (x_sq - 2.0 * (x @ x[pick]) + x_sq[pick]).clamp_min_(0.0))
    for _ in range(iters):
        assign = nearest_centroid(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None].to(x.dtype))
        if bool(empty.any()):
            err = (x - centroids[assign]).pow(2).sum(1)
            worst = torch.argsort(err, descending=True)[: int(empty.sum())]
            centroids[empty.nonzero().squeeze(1)[: worst.numel()]] = x[worst]
    return centroids


# ---------------------------------------------------------------------------------------------- codec
@register_codec
class MelVQCodec(SpeechCodec):
    """Offline log-mel + residual-VQ "codec" decoded with InverseMelScale + Griffin-Lim.

    For CPU demos, tests and the quickstart on machines with no downloaded weights; not a neural codec
    (speech is intelligible-ish but robotic). Call :meth:`fit` once on some speech, then use it like any
    :class:`SpeechCodec`; :meth:`save_pretrained` stores the codebooks as safetensors.
    """

    codec_type = "melvq"
    default_decode_context = 4

    def __init__(
        self,
        sampling_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 320,
        n_mels: int = 80,
        f_min: float = 0.0,
        f_max: float | None = None,
        frames_per_step: int = 2,
        num_quantizers: int = 2,
        codebook_size: int = 512,
        griffin_lim_iters: int = 32,
        griffin_lim_hop: int | None = None,
        log_floor: float = 1e-5,
        codec_name: str | None = None,
    ):
        super().__init__(codec_name=codec_name)
        torchaudio = _torchaudio()
        if hop_length <= 0 or n_fft < hop_length:
            raise ValueError(f"need 0 < hop_length <= n_fft, got hop_length={hop_length}, n_fft={n_fft}")
        if frames_per_step < 1 or num_quantizers < 1 or codebook_size < 2:
            raise ValueError("frames_per_step and num_quantizers must be >= 1 and codebook_size >= 2")
        griffin_lim_hop = int(griffin_lim_hop or max(1, hop_length // 2))
        self.settings = {
            "sampling_rate": int(sampling_rate),
            "n_fft": int(n_fft),
            "hop_length": int(hop_length),
            "n_mels": int(n_mels),
            "f_min": float(f_min),
            "f_max": None if f_max is None else float(f_max),
            "frames_per_step": int(frames_per_step),
            "num_quantizers": int(num_quantizers),
            "codebook_size": int(codebook_size),
            "griffin_lim_iters": int(griffin_lim_iters),
            "griffin_lim_hop": griffin_lim_hop,
            "log_floor": float(log_floor),
        }
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sampling_rate, n_fft=n_fft, win_length=n_fft, hop_length=hop_length, f_min=f_min,
            f_max=f_max, n_mels=n_mels, power=1.0, norm="slaney", mel_scale="slaney", center=True,
        )
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=n_fft // 2 + 1, n_mels=n_mels, sample_rate=sampling_rate, f_min=f_min, f_max=f_max,
            norm="slaney", mel_scale="slaney",
        )
        self.register_buffer("gl_window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("codebooks", torch.zeros(num_quantizers, codebook_size, n_mels))
        self.register_buffer("feature_mean", torch.zeros(n_mels))
        self.register_buffer("feature_std", torch.ones(n_mels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.eval()

    # ------------------------------------------------------------------ layout
    @property
    def sampling_rate(self) -> int:
        return self.settings["sampling_rate"]

    @property
    def num_streams(self) -> int:
        return self.settings["num_quantizers"] * self.settings["frames_per_step"]

    @property
    def codebook_size(self) -> int:
        return self.settings["codebook_size"]

    @property
    def samples_per_frame(self) -> int:
        return self.settings["hop_length"] * self.settings["frames_per_step"]

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def stream_info(self):
        k = self.settings["frames_per_step"]
        return [{"stream": s, "level": s // k, "subframe": s % k} for s in range(self.num_streams)]

    def layout(self) -> dict[str, Any]:
        out = super().layout()
        keys = ("n_mels", "n_fft", "hop_length", "frames_per_step", "num_quantizers")
        out.update({k: self.settings[k] for k in keys})
        out["mel_frame_rate"] = self.sampling_rate / self.settings["hop_length"]
        return out

    # ------------------------------------------------------------------ features
    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[samples]`` at ``sampling_rate`` -> ``[n_mels, frames]`` natural-log magnitude mel (slaney)."""
        return self.mel(waveform).clamp_min(self.settings["log_floor"]).log()

    def _frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """Pad to whole steps; return ``[F * frames_per_step, n_mels]`` log-mel frames."""
        spf = self.samples_per_frame
        n_steps = self.num_frames_for(waveform.numel())
        wav = torch.nn.functional.pad(waveform, (0, n_steps * spf - waveform.numel()))
        return self.log_mel(wav)[:, : n_steps * self.settings["frames_per_step"]].T

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        waveforms: WaveformLike | Iterable[WaveformLike],
        sampling_rate: int,
        *,
        iters: int = 20,
        seed: int = 0,
        max_frames: int = 100_000,
    ) -> MelVQCodec:
        """Fit normalisation statistics and the residual codebooks on ``waveforms`` (one or a list).

        Deterministic for a given ``seed``; at most ``max_frames`` mel frames (randomly chosen) are used.
        Returns ``self``.
        """
        if isinstance(waveforms, (torch.Tensor, np.ndarray)) and getattr(waveforms, "ndim", 0) == 1:
            waveforms = [waveforms]
        feats = []
        with torch.no_grad():
            for w in waveforms:
                feats.append(self.log_mel(self.prepare_waveform(w, sampling_rate)).T)
        if not feats:
            raise ValueError("fit() needs at least one waveform.")
        x = torch.cat(feats)
        if x.shape[0] > max_frames:
            g = torch.Generator().manual_seed(int(seed))
            x = x[torch.randperm(x.shape[0], generator=g)[:max_frames].to(x.device)]
        mean = x.mean(0)
        std = x.std(0, unbiased=False).clamp_min(1e-3) if x.shape[0] > 1 else torch.ones_like(mean)
        residual = (x - mean) / std
        books = []
        for level in range(self.settings["num_quantizers"]):
            c = kmeans(residual, self.codebook_size, iters=iters, seed=int(seed) + level)
            books.append(c)
            residual = residual - c[nearest_centroid(residual, c)]
        with torch.no_grad():
            self.codebooks.copy_(torch.stack(books))
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std)
            self.fitted.fill_(True)
        return self

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                "MelVQCodec has no codebooks yet: call `codec.fit(waveforms, sampling_rate)` on some speech, "
                "or load a fitted one with `MelVQCodec.from_pretrained(path)`."
            )

    # ------------------------------------------------------------------ codec
    def quantize(self, frames: torch.Tensor) -> torch.Tensor:
        """``[T, n_mels]`` log-mel frames -> ``[num_quantizers, T]`` residual-VQ indices."""
        residual = (frames - self.feature_mean) / self.feature_std
        codes = []
        for book in self.codebooks:
            idx = nearest_centroid(residual, book)
            codes.append(idx)
            residual = residual - book[idx]
        return torch.stack(codes)

    def dequantize(self, level_codes: torch.Tensor) -> torch.Tensor:
        """``[num_quantizers, T]`` -> ``[T, n_mels]`` log-mel frames."""
        z = sum(book[c] for book, c in zip(self.codebooks, level_codes))
        return z * self.feature_std + self.feature_mean

    def _encode(self, waveform: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        frames = self._frames(waveform)  # [F*k, M]
        level_codes = self.quantize(frames)  # [R, F*k]
        R, k = self.settings["num_quantizers"], self.settings["frames_per_step"]
        return level_codes.view(R, -1, k).permute(0, 2, 1).reshape(R * k, -1)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        self._require_fitted()
        R, k = self.settings["num_quantizers"], self.settings["frames_per_step"]
        n_steps = codes.shape[1]
        level_codes = codes.view(R, k, n_steps).permute(0, 2, 1).reshape(R, n_steps * k)
        return self.synthesize(self.dequantize(level_codes).T, n_steps * self.samples_per_frame)

    def synthesize(self, log_mel: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Invert a ``[n_mels, T]`` log-mel (hop ``hop_length``) to a waveform with InverseMelScale + Griffin-Lim.

        Also used for the un-quantised reference round trip (``synthesize(log_mel(x))``).
        """
        cfg = self.settings
        hop, gl_hop = cfg["hop_length"], cfg["griffin_lim_hop"]
        n_frames = log_mel.shape[1]
        if num_samples is None:
            num_samples = n_frames * hop
        if gl_hop != hop:  # linear interpolation of the log-mel onto the finer Griffin-Lim hop
            n_out = num_samples // gl_hop + 1
            pos = torch.arange(n_out, device=log_mel.device, dtype=torch.float32) * (gl_hop / hop)
            pos = pos.clamp_max(n_frames - 1)
            i0 = pos.floor().long()
            i1 = (i0 + 1).clamp_max(n_frames - 1)
            w = (pos - i0.to(pos.dtype))[None, :]
            log_mel = log_mel[:, i0] * (1 - w) + log_mel[:, i1] * w
        spec = self.inverse_mel(log_mel.exp())  # [n_freq, T'] linear magnitude (least squares, >= 0)
        return _torchaudio().functional.griffinlim(
            spec, window=self.gl_window, n_fft=cfg["n_fft"], hop_length=gl_hop, win_length=cfg["n_fft"],
            power=1.0, n_iter=cfg["griffin_lim_iters"], momentum=0.99, length=num_samples, rand_init=False,
        )

    # ------------------------------------------------------------------ persistence
    def _extra_codec_config(self) -> dict[str, Any]:
        return dict(self.settings)

    def _save_weights(self, directory: str) -> None:
        state = {k: getattr(self, k) for k in _STATE_KEYS}
        save_state_dict_safetensors(state, directory)

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [k for k in _STATE_KEYS if k not in tensors]
        if missing:
            raise ValueError(f"MelVQ weights are missing {missing}")
        with torch.no_grad():
            for k in _STATE_KEYS:
                buf = getattr(self, k)
                if tuple(tensors[k].shape) != tuple(buf.shape):
                    raise ValueError(
                        f"MelVQ weight {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(buf.shape)}"
                    )
                buf.copy_(tensors[k])

    @classmethod
    def _from_local_dir(cls, directory: str, codec_config: dict[str, Any] | None, **kwargs: Any) -> MelVQCodec:
        if codec_config is None:
            raise FileNotFoundError(
                f"{directory!r} has no {CODEC_CONFIG_NAME}; save a MelVQCodec with save_pretrained()."
            )
        opts = dict(codec_config.get("options", {}))
        opts.update(kwargs)
        codec = cls(codec_name=codec_config.get("codec_name"), **opts)
        codec._load_state(load_state_dict_safetensors(directory))
        return codec

    @classmethod
    def _from_hub(cls, repo_id: str, **kwargs: Any) -> MelVQCodec:
        from huggingface_hub import hf_hub_download

        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token") if k in kwargs}
        cfg_path = hf_hub_download(repo_id, CODEC_CONFIG_NAME, **hub_kwargs)
        hf_hub_download(repo_id, WEIGHTS_NAME, **hub_kwargs)
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        return cls._from_local_dir(os.path.dirname(cfg_path), cfg, **kwargs)


def log_mel_distance(
    reference: WaveformLike,
    estimate: WaveformLike,
    sampling_rate: int = 16000,
    n_fft: int = 1024,
    hop_length: int = 256,
    n_mels: int = 80,
    floor: float = 1e-5,
) -> float:
    """Mean absolute difference of natural-log magnitude mel spectrograms (nats), an L1 "mel distance".

    ``estimate`` is cropped / zero-padded to ``reference``'s length. Silence vs. speech is ~4-5 nats,
    a neural codec at a few kbps is typically well under 1.
    """
    torchaudio = _torchaudio()
    ref = torch.as_tensor(reference, dtype=torch.float32).reshape(-1).cpu()
    est = torch.as_tensor(estimate, dtype=torch.float32).reshape(-1).cpu()
    est = est[: ref.numel()]
    est = torch.nn.functional.pad(est, (0, ref.numel() - est.numel()))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=sampling_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, power=1.0,
        norm="slaney", mel_scale="slaney",
    )
    a = mel(ref).clamp_min(floor).log()
    b = mel(est).clamp_min(floor).log()
    return float((a - b).abs().mean())


# ======================================== SNAC
SNAC_CONFIG_NAME = "config.json"  # same file name and format as the Hub's snac repos
SNAC_PICKLE_NAME = "pytorch_model.bin"  # what the Hub's snac repos ship (a pickled state dict)
STREAM_ORDERS = ("depth_first", "level_major")


def snac_stream_table(vq_strides: Sequence[int], order: str = "depth_first") -> list[tuple[int, int]]:
    """``(level, offset)`` for each stream: stream ``j`` of coarse frame ``f`` holds ``codes[level][f * r + offset]``
    where ``r = vq_strides[0] // vq_strides[level]`` codes of that level fall in one coarse frame."""
    strides = [int(s) for s in vq_strides]
    if not strides or any(s <= 0 for s in strides):
        raise ValueError(f"vq_strides must be positive integers, got {list(vq_strides)}")
    for a, b in zip(strides, strides[1:]):
        if a % b:
            raise ValueError(f"each SNAC stride must divide the previous one, got {strides}")
    if order == "level_major":
        return [(lvl, o) for lvl, s in enumerate(strides) for o in range(strides[0] // s)]
    if order != "depth_first":
        raise ValueError(f"stream_order must be one of {STREAM_ORDERS}, got {order!r}")
    table: list[tuple[int, int]] = []

    def walk(level: int, offset: int) -> None:
        table.append((level, offset))
        if level + 1 < len(strides):
            branch = strides[level] // strides[level + 1]
            for c in range(branch):
                walk(level + 1, offset * branch + c)

    walk(0, 0)
    return table


def snac_flatten(codes: Sequence[torch.Tensor], vq_strides: Sequence[int], order: str = "depth_first") -> torch.Tensor:
    """SNAC's per-level codes (``[T_k]`` or ``[1, T_k]`` each, ``T_k = F * stride_0 / stride_k``) -> ``[N, F]``."""
    table = snac_stream_table(vq_strides, order)
    levels = [c.reshape(-1) for c in codes]
    if len(levels) != len(vq_strides):
        raise ValueError(f"expected {len(vq_strides)} SNAC levels, got {len(levels)}")
    n_frames = levels[0].numel()
    rows = []
    for level, offset in table:
        r = vq_strides[0] // vq_strides[level]
        if levels[level].numel() != n_frames * r:
            raise ValueError(
                f"SNAC level {level} has {levels[level].numel()} codes, "
                f"expected {n_frames * r} (= {n_frames} frames x {r})"
            )
        rows.append(levels[level].view(n_frames, r)[:, offset])
    return torch.stack(rows, dim=0)


def snac_unflatten(flat: torch.Tensor, vq_strides: Sequence[int], order: str = "depth_first") -> list[torch.Tensor]:
    """Inverse of :func:`snac_flatten`: ``[N, F]`` -> list of ``[1, F * stride_0 / stride_k]`` tensors."""
    table = snac_stream_table(vq_strides, order)
    if flat.ndim != 2 or flat.shape[0] != len(table):
        raise ValueError(f"expected codes of shape [{len(table)}, F], got {tuple(flat.shape)}")
    n_frames = flat.shape[1]
    out = [flat.new_empty(n_frames, vq_strides[0] // s) for s in vq_strides]
    for row, (level, offset) in zip(flat, table):
        out[level][:, offset] = row
    return [o.reshape(1, -1) for o in out]


@register_codec
class SNACCodec(SpeechCodec):
    """:class:`SpeechCodec` around a ``snac.SNAC`` model (the paper's codec).

    Build from a Hub id (``SNACCodec.from_pretrained("hubertsiuzdak/snac_24khz")``, through
    ``snac.SNAC.from_pretrained``), a directory saved by :meth:`save_pretrained`, or directly from a
    (possibly random, tiny) ``snac.SNAC`` via ``SNACCodec(model)`` / ``SNACCodec.from_config(**snac_kwargs)``.
    """

    codec_type = "snac"
    default_decode_context = 2

    def __init__(
        self,
        model: torch.nn.Module,
        stream_order: str = "depth_first",
        decode_seed: int | None = 0,
        codec_name: str | None = None,
        snac_config: dict[str, Any] | None = None,
    ):
        super().__init__(codec_name=codec_name)
        self.model = model.eval()
        self.stream_order = stream_order
        self.decode_seed = decode_seed
        self.vq_strides = [int(s) for s in model.vq_strides]
        self._table = snac_stream_table(self.vq_strides, stream_order)
        # full snac.SNAC kwargs (reconstructed from the module; explicitly given values take precedence)
        self._snac_config = {**_snac_config_of(model), **dict(snac_config or {})}
        attn = model.attn_window_size or 1
        # SNAC needs the latent length (coarse frames x stride_0) to be a multiple of lcm(stride_0, attn_window)
        self._frame_multiple = math.lcm(self.vq_strides[0], attn) // self.vq_strides[0]
        # chunked decoding needs whole attention windows of real codes around a chunk: two windows of
        # context (measured exact on window-32 SNAC) or the conv-only default of 2 frames
        self.default_decode_context = max(type(self).default_decode_context, 2 * self._frame_multiple)
        # Decoder noise as a fixed function of absolute position (see _positional_noise), so a chunk
        # decoded on its own gets the same noise as the same frames inside a full decode.
        self._noise_window = {"first_frame": 0, "frames": 1}
        noise_blocks = [m for m in model.decoder.modules() if type(m).__name__ == "NoiseBlock"]
        for index, block in enumerate(noise_blocks):
            block.forward = _PositionalNoiseForward(block, self, index)
        self.eval()

    @classmethod
    def from_config(
        cls, stream_order: str = "depth_first", decode_seed: int | None = 0, **snac_kwargs: Any
    ) -> SNACCodec:
        """Randomly initialised SNAC with ``snac.SNAC(**snac_kwargs)`` (tests, experiments)."""
        SNAC = _snac_class()

        return cls(SNAC(**snac_kwargs), stream_order=stream_order, decode_seed=decode_seed, snac_config=snac_kwargs)

    # ------------------------------------------------------------------ layout
    @property
    def sampling_rate(self) -> int:
        return int(self.model.sampling_rate)

    @property
    def num_streams(self) -> int:
        return len(self._table)

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)

    @property
    def samples_per_frame(self) -> int:
        return int(self.model.hop_length) * self.vq_strides[0]

    def stream_info(self):
        return [
            {
                "stream": i,
                "level": lvl,
                "offset": off,
                "codes_per_frame_at_level": self.vq_strides[0] // self.vq_strides[lvl],
            }
            for i, (lvl, off) in enumerate(self._table)
        ]

    def layout(self) -> dict[str, Any]:
        out = super().layout()
        hop = int(self.model.hop_length)
        out.update(
            {
                "stream_order": self.stream_order,
                "vq_strides": list(self.vq_strides),
                "level_frame_rates": [self.sampling_rate / (hop * s) for s in self.vq_strides],
                "stream_levels": [lvl for lvl, _ in self._table],
            }
        )
        return out

    # ------------------------------------------------------------------ flatten helpers
    def flatten(self, level_codes: Sequence[torch.Tensor]) -> torch.Tensor:
        return snac_flatten(level_codes, self.vq_strides, self.stream_order)

    def unflatten(self, codes: torch.Tensor) -> list[torch.Tensor]:
        return snac_unflatten(codes, self.vq_strides, self.stream_order)

    # ------------------------------------------------------------------ codec
    def _encode(self, waveform: torch.Tensor) -> torch.Tensor:
        level_codes = self.model.encode(waveform.view(1, 1, -1))  # SNAC.preprocess pads to hop * lcm(...)
        return self.flatten(level_codes)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        n = codes.shape[1]
        pad = (-n) % self._frame_multiple
        if pad:  # attention windows need whole windows: repeat the last frame, crop afterwards
            codes = torch.cat([codes, codes[:, -1:].expand(-1, pad)], dim=1)
        level_codes = self.unflatten(codes)
        self._noise_window["frames"] = codes.shape[1]
        if self.decode_seed is None:
            audio = self.model.decode(level_codes)
        else:
            # seed only the generator the decoder's noise is drawn from, restoring it afterwards
            dev = self.device
            if dev.type == "cuda":
                index = dev.index if dev.index is not None else torch.cuda.current_device()
                with torch.random.fork_rng(devices=[index], device_type="cuda"):
                    torch.cuda.default_generators[index].manual_seed(self.decode_seed)
                    audio = self.model.decode(level_codes)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.random.default_generator.manual_seed(self.decode_seed)
                    audio = self.model.decode(level_codes)
        return audio.reshape(-1)[: n * self.samples_per_frame]

    def _decode_window(self, lo: int, hi: int, total: int) -> tuple[int, int]:
        # local attention works on whole windows counted from frame 0: decode whole windows of real
        # codes (the last window of the answer is padded by `_decode`, as in a full decode)
        multiple = self._frame_multiple
        return lo - lo % multiple, min(total, hi + (-hi) % multiple)

    def _decode_at(self, codes: torch.Tensor, first_frame: int) -> torch.Tensor:
        self._noise_window["first_frame"] = first_frame
        try:
            return self.decode(codes)
        finally:
            self._noise_window["first_frame"] = 0

    # ------------------------------------------------------------------ persistence
    def _extra_codec_config(self) -> dict[str, Any]:
        return {"stream_order": self.stream_order, "decode_seed": self.decode_seed, "snac_config": self._snac_config}

    def _save_weights(self, directory: str) -> None:
        save_state_dict_safetensors(self.model.state_dict(), directory)
        with open(os.path.join(directory, SNAC_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self._snac_config, f, indent=2)

    @classmethod
    def _from_local_dir(cls, directory: str, codec_config: dict[str, Any] | None, **kwargs: Any) -> SNACCodec:
        SNAC = _snac_class()

        unknown = set(kwargs) - {"stream_order", "decode_seed"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments for SNACCodec.from_pretrained: {sorted(unknown)}")
        opts = dict((codec_config or {}).get("options", {}))
        opts.update(kwargs)
        has_safetensors = os.path.isfile(os.path.join(directory, WEIGHTS_NAME))
        if codec_config is None and not has_safetensors:
            # a native snac download (config.json + pytorch_model.bin)
            config_path, weights_path = (os.path.join(directory, n) for n in (SNAC_CONFIG_NAME, SNAC_PICKLE_NAME))
            model = _load_native_snac(config_path, weights_path)
            snac_config = None
        else:
            snac_config = opts.get("snac_config")
            if snac_config is None:
                with open(os.path.join(directory, SNAC_CONFIG_NAME), encoding="utf-8") as f:
                    snac_config = json.load(f)
            model = SNAC(**snac_config)
            model.load_state_dict(load_state_dict_safetensors(directory), strict=True)
        name = (codec_config or {}).get("codec_name") or directory
        return cls(
            model,
            stream_order=opts.get("stream_order", "depth_first"),
            decode_seed=opts.get("decode_seed", 0),
            codec_name=name,
            snac_config=snac_config,
        )

    @classmethod
    def _from_hub(cls, repo_id: str, **kwargs: Any) -> SNACCodec:
        """A deeptalk-format repo (``codec_config.json`` + safetensors) is read directly; any other id,
        e.g. ``hubertsiuzdak/snac_24khz``, is delegated to ``snac.SNAC.from_pretrained``."""
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token") if k in kwargs}
        cfg = hub_download_codec_config(repo_id, **hub_kwargs)
        if cfg is not None:
            from huggingface_hub import hf_hub_download

            local = os.path.dirname(hf_hub_download(repo_id, CODEC_CONFIG_NAME, **hub_kwargs))
            hf_hub_download(repo_id, WEIGHTS_NAME, **hub_kwargs)
            return cls._from_local_dir(local, cfg, **kwargs)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        config_path = hf_hub_download(repo_id, SNAC_CONFIG_NAME, **hub_kwargs)
        try:
            weights_path = hf_hub_download(repo_id, WEIGHTS_NAME, **hub_kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError):  # snac repos ship a pickle, read with weights_only=True
            weights_path = hf_hub_download(repo_id, SNAC_PICKLE_NAME, **hub_kwargs)
        return cls(_load_native_snac(config_path, weights_path), codec_name=repo_id, **kwargs)


def _snac_class():
    """Import ``snac.SNAC`` lazily, hiding its import-time ``torch.jit.script`` deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        try:
            from snac import SNAC
        except ImportError:
            raise ImportError("SNACCodec needs the snac package: `pip install snac`.") from None
    return SNAC


def _load_native_snac(config_path: str, weights_path: str) -> torch.nn.Module:
    """A ``snac.SNAC`` from its ``config.json`` and weights, read safely.

    ``snac.SNAC.from_pretrained`` calls ``torch.load`` without ``weights_only``, which unpickles arbitrary
    objects when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set; here a pickle is read with ``weights_only=True``
    (an explicit argument that environment variable cannot override) and safetensors are preferred.
    """
    import pickle

    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path!r} does not exist: a native SNAC checkpoint is {SNAC_CONFIG_NAME} plus {WEIGHTS_NAME} or "
                f"{SNAC_PICKLE_NAME} (as in hubertsiuzdak/snac_24khz)."
            )
    with open(config_path, encoding="utf-8") as f:
        model = _snac_class()(**json.load(f))
    if weights_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(weights_path, device="cpu")
    else:
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            reason = str(err).strip().splitlines()[0]
            raise ValueError(
                f"{weights_path!r} could not be read as plain tensors ({type(err).__name__}: {reason}). deeptalk only "
                "reads weights with torch.load(weights_only=True), never arbitrary pickled objects: re-download the "
                f"checkpoint, or convert a trusted one to {WEIGHTS_NAME} (safetensors.torch.save_file)."
            ) from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{weights_path!r} holds a {type(state_dict).__name__}, not a state dict of tensors.")
    model.load_state_dict(state_dict)
    return model.eval()


def _snac_config_of(model: torch.nn.Module) -> dict[str, Any]:
    """Reconstruct ``snac.SNAC.__init__`` kwargs from a built model (enough to rebuild it for loading)."""
    noise = any(type(m).__name__ == "NoiseBlock" for m in model.decoder.modules())
    depthwise = any(getattr(m, "groups", 1) > 1 for m in model.encoder.modules() if isinstance(m, torch.nn.Conv1d))
    return {
        "sampling_rate": int(model.sampling_rate),
        "encoder_dim": int(model.encoder_dim),
        "encoder_rates": [int(r) for r in model.encoder_rates],
        "latent_dim": int(model.latent_dim),
        "decoder_dim": int(model.decoder_dim),
        "decoder_rates": [int(r) for r in model.decoder_rates],
        "attn_window_size": model.attn_window_size,
        "codebook_size": int(model.codebook_size),
        "codebook_dim": int(model.codebook_dim),
        "vq_strides": [int(s) for s in model.vq_strides],
        "noise": bool(noise),
        "depthwise": bool(depthwise),
    }


class _PositionalNoiseForward:
    """`NoiseBlock.forward` with noise that depends on the absolute position, not on the call.

    SNAC's decoder adds `randn * linear(x)` after some upsampling layers. Drawn per call, that noise
    differs between one full decode and the same frames decoded in chunks, which makes streaming
    audible at the joins. Here position p of noise block b always gets the same value: the noise is
    cut from fixed 4096-sample pages, each drawn from a generator seeded by (decode_seed, b, page).
    With `decode_seed=None` the block keeps SNAC's own per-call noise.
    """

    PAGE = 4096

    def __init__(self, block, codec, index: int):
        self.block, self.codec, self.index = block, codec, index
        self.original_forward = block.forward

    def __call__(self, x):
        seed = self.codec.decode_seed
        if seed is None:
            return self.original_forward(x)
        window = self.codec._noise_window
        per_frame = x.shape[-1] // window["frames"]
        noise = self.noise(seed, window["first_frame"] * per_frame, x.shape[-1]).to(device=x.device, dtype=x.dtype)
        return x + noise.view(1, 1, -1) * self.block.linear(x)

    def noise(self, seed: int, start: int, length: int) -> torch.Tensor:
        first, last = start // self.PAGE, (start + length - 1) // self.PAGE
        pages = []
        for page in range(first, last + 1):
            generator = torch.Generator().manual_seed((seed * 1_000_003 + self.index * 65_537 + page) % (2**63))
            pages.append(torch.randn(self.PAGE, generator=generator))
        offset = start - first * self.PAGE
        return torch.cat(pages)[offset : offset + length]


# ======================================== loading any saved codec
# native (non-deeptalk) checkpoints: transformers `model_type` -> codec_type (registered by the deeptalk package)
_NATIVE_MODEL_TYPES = {"mimi": "mimi", "dac": "dac", "encodec": "encodec"}


def _registered(codec_type: str, where: str) -> type[SpeechCodec]:
    if codec_type not in CODEC_REGISTRY:
        raise ValueError(
            f"{where} names codec_type={codec_type!r}, which is not registered; known: {sorted(CODEC_REGISTRY)}. "
            "The codecs that ship with transformers (mimi, dac, encodec) are registered by the deeptalk package "
            "(`import deeptalk.processing.codecs`)."
        )
    return CODEC_REGISTRY[codec_type]


def _codec_class_for_native_config(config: dict, where: str) -> type[SpeechCodec]:
    model_type = config.get("model_type")
    if model_type in _NATIVE_MODEL_TYPES:
        return _registered(_NATIVE_MODEL_TYPES[model_type], where)
    if "vq_strides" in config and "encoder_rates" in config:  # snac's config.json
        return SNACCodec
    raise ValueError(
        f"Cannot tell which codec {where} holds: no {CODEC_CONFIG_NAME} and config.json has model_type="
        f"{model_type!r}. Known codec types: {sorted(CODEC_REGISTRY)}; load it with the codec class directly, "
        "e.g. MimiCodec.from_pretrained(path)."
    )


def _has_weights(directory: str) -> bool:
    names = os.listdir(directory)
    return any(n.endswith((".safetensors", ".safetensors.index.json")) or n == SNAC_PICKLE_NAME for n in names)


def _no_weights_message(directory: str, cfg: dict[str, Any]) -> str:
    """What to do about a codec folder that records a codec's configuration only (e.g. the SNAC 24 kHz of data
    prepared from VoiceAssistant-style `answer_snac` codes, whose weights are on the Hub)."""
    layout = cfg.get("layout") or {}
    name = cfg.get("codec_name") or cfg.get("codec_type")
    rate = f"{layout['sampling_rate'] / 1000:g} kHz, " if layout.get("sampling_rate") else ""
    shape = f"{layout.get('num_streams')} streams x {layout.get('codebook_size')} codes"
    where = "hubertsiuzdak/snac_24khz" if cfg.get("codec_type") == "snac" else name
    hint = (f"install snac (`pip install snac`) and point --codec at {where} (or at a local copy: "
            f"`hf download {where} --local-dir DIR`)") if cfg.get("codec_type") == "snac" else \
        f"point --codec at a saved copy of {where} with its weights"
    return (f"{directory!r} records this model's codec, {name} ({rate}{shape}), without its weights "
            f"(no {WEIGHTS_NAME}): "
            f"it cannot turn speech codes into audio here. To speak, {hint}.")


def load_codec(path_or_name: str | os.PathLike, **kwargs: Any) -> SpeechCodec:
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
            where = repr(os.path.join(path, CODEC_CONFIG_NAME))
            cls = _registered(cfg.get("codec_type"), where)
            if not _has_weights(path):
                raise FileNotFoundError(_no_weights_message(path, cfg))
            return cls.from_pretrained(path, **kwargs)
        native = os.path.join(path, "config.json")
        if not os.path.isfile(native):
            raise FileNotFoundError(
                f"{path!r} has neither {CODEC_CONFIG_NAME} nor config.json; it is not a saved codec."
            )
        with open(native, encoding="utf-8") as f:
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

    with open(hf_hub_download(path, "config.json", **hub_kwargs), encoding="utf-8") as f:
        native_cfg = json.load(f)
    return _codec_class_for_native_config(native_cfg, repr(path)).from_pretrained(path, **kwargs)
