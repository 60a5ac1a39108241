"""The single entry point for user audio: :func:`load_audio`.

Every waveform that enters ``deeptalk`` from the outside (a file on disk, the
bytes of a file, an array you recorded, a ``datasets`` example) should pass
through :func:`load_audio`. It returns a fresh, C-contiguous, 1-D
``numpy.float32`` array at ``target_sampling_rate`` (16 kHz, what the Whisper
speech encoder expects) whose samples are finite and lie in ``[-1, 1]``, or it
raises an error that says what is wrong and how to fix it.

Example::

    from deeptalk.processing.audio import load_audio

    wav = load_audio("question.flac")                    # any rate / channels -> 16 kHz mono float32
    wav = load_audio(array, sampling_rate=44100)         # numpy array or torch tensor: the rate is required
    wav = load_audio(example["audio"])                   # {"array", "sampling_rate"} or {"path", "bytes"} dict
    wav = load_audio(open("q.wav", "rb").read())         # raw bytes of a file

Accepted sources
----------------
* ``str`` / :class:`pathlib.Path` (any ``os.PathLike``): an audio file, decoded with
  ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...).
  ``torchaudio.load`` and ``datasets.Audio`` decoding are deliberately *not* used: they
  need torchcodec + ffmpeg, which may be absent. Formats libsndfile cannot read
  (e.g. m4a/AAC) give a "could not be decoded as audio" error with a conversion hint.
* ``bytes`` / ``bytearray`` / ``memoryview``: the contents of an audio file.
* ``numpy.ndarray`` / ``torch.Tensor`` (also lists and other array-likes): raw samples;
  ``sampling_rate`` is then **required**. Meta tensors (no data) and sparse tensors are refused.
* a pair ``(samples, sampling_rate)`` or ``(sampling_rate, samples)`` (gradio's order); a pair whose
  rate is ``None`` is refused as a missing rate.
* a mapping in ``datasets`` style: ``{"array": ..., "sampling_rate": ...}`` (decoded audio,
  e.g. :func:`deeptalk.data.load_demo_corpus`) or ``{"path": ..., "bytes": ...}``
  (``datasets.Audio(decode=False)``). ``"array"`` wins over ``"bytes"``, which wins over ``"path"``.
* a torchcodec-style decoder (anything with ``.get_all_samples()`` returning an object with
  ``.data`` ``[channels, samples]`` and ``.sample_rate``; this is what ``datasets>=4``
  ``Audio()`` decoding returns), or such a samples object itself. Detected by duck typing;
  torchcodec is never imported.

Choices (documented behaviour)
------------------------------
* **Sampling rate.** For arrays, ``sampling_rate`` must be a whole number of Hz
  (``16000`` and ``16000.0`` are fine, ``22050.5``, ``"16000"``, ``True``, ``0`` and negatives
  are errors). Rates below 1000 Hz are rejected as a likely kHz/Hz mix-up (``16`` instead of
  ``16000``), rates above ``MAX_SAMPLING_RATE`` (768 kHz, the highest rate audio hardware records
  at) as a mistake (``1e9`` would squeeze a clip into one sample). For files / bytes / decoders
  the rate comes from the source; passing a *different* ``sampling_rate`` is an error (it
  describes the input, it does not choose the output rate - use ``target_sampling_rate`` for that).
* **Sample formats.** Integer PCM is scaled to ``[-1, 1)``: ``int16`` / 32768, ``int32`` / 2**31,
  ``int8`` / 128, ``uint8`` (8-bit WAV, centred at 128) as ``(x - 128) / 128``. ``float16``,
  ``float32``, ``float64`` (and ``bfloat16`` tensors) are cast to ``float32``. ``int64`` and
  other unsigned types are rejected because their scale is ambiguous (cast to the PCM width
  you actually have, e.g. ``x.astype(numpy.int16)``); ``bool``, complex, object and string
  arrays are rejected.
* **Float range.** Float input whose peak exceeds 1.0 (beyond a 1e-6 rounding tolerance) is
  an error - it is *not* silently rescaled, because that would hide a wrong scale (typically
  integer PCM stored as float). Normalise it (``x / abs(x).max()``) or pass integer PCM with
  its integer dtype. Files stored as float (``FLOAT`` WAV) are checked the same way.
* **Channels.** Multi-channel audio is mixed down to mono by averaging the channels. Files
  (soundfile: ``[samples, channels]``) and torchcodec decoders (``[channels, samples]``) have
  a known layout. For 2-D arrays / tensors the **channel axis is the smaller dimension**
  (so both ``[channels, samples]`` and ``[samples, channels]`` work); a square array with
  more than one row is ambiguous and rejected, and more than ``MAX_CHANNELS`` (16)
  channels is rejected as probably a batch of clips or a spectrogram. Arrays with more
  than 2 dimensions are rejected (pass one clip at a time).
* **Resampling** uses ``torchaudio.functional.resample`` (windowed-sinc, default settings);
  the output has ``ceil(n * target / rate)`` samples so the duration is preserved. Sinc
  ringing can overshoot by a hair near full scale, so the output is clipped to ``[-1, 1]``.
* **Checks**, in this order, each a ``ValueError`` naming the problem and the fix: empty
  audio; NaN / inf samples; float peak > 1; duration > ``max_seconds`` (checked from the
  header before a file is decoded; ``max_seconds=None`` disables it); duration <
  ``min_seconds`` (default ``MIN_SECONDS`` = 25 ms, one analysis window of Whisper's feature
  extractor: 400 samples at 16 kHz; shorter clips cannot be turned into log-mel features);
  silence (peak of the mono mix below ``SILENCE_PEAK`` = 1e-4) unless ``allow_silence=True``.
  Missing files raise ``FileNotFoundError``; undecodable files (corrupt, truncated, not audio)
  raise ``ValueError`` naming the file. An unsupported *kind* of source raises ``TypeError``.
* **Truncated files.** libsndfile derives the length of a WAV / AIFF from the file size, so a file
  cut short (an interrupted download or copy) would load as partial audio. Before decoding, the
  container's own declared sizes are read instead: the RIFF / RIFX / RF64 / BW64 / Wave64 / CAF
  ``data`` chunk and RIFF size, and the AIFF / AIFC ``SSND`` chunk and FORM size, against the
  bytes present (streaming placeholders such as ``0xFFFFFFFF`` mean "unknown" and are not
  checked). FLAC is checked against the sample count of its STREAMINFO header. A truncated
  file is a ``ValueError`` that says so. Formats without a declared length (OGG, MP3) are not
  checked.
* **Clipping** is not an error: when more than 0.1 % of the samples belong to flat runs of
  at least 3 consecutive samples at ``|x| >= 0.999`` (in any channel), a ``UserWarning``
  says the audio is clipped and recognition may suffer. Requiring runs (rather than single
  samples) keeps a clean full-scale sine from being flagged.
* **No aliasing with the input.** The caller's array / tensor is never modified and the
  result never shares memory with it.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

__all__ = [
    "WHISPER_SAMPLING_RATE",
    "MAX_CHANNELS",
    "MIN_SAMPLING_RATE",
    "MAX_SAMPLING_RATE",
    "MIN_SECONDS",
    "SILENCE_PEAK",
    "CLIP_LEVEL",
    "CLIP_MIN_RUN",
    "CLIP_FRACTION",
    "load_audio",
    "audio_duration_seconds",
]

WHISPER_SAMPLING_RATE = 16000
"""Sampling rate (Hz) the Whisper speech encoder, and so DeepTalk, consumes."""

MAX_CHANNELS = 16
"""More channels than this in a 2-D array is treated as a batch / spectrogram mistake."""

MIN_SAMPLING_RATE = 1000
"""Rates below this are rejected as a likely kHz-vs-Hz mix-up."""

MAX_SAMPLING_RATE = 768_000
"""Rates above this (the highest rate audio hardware records at) are rejected as a mistake."""

WHISPER_N_FFT = 400
MIN_SECONDS = WHISPER_N_FFT / WHISPER_SAMPLING_RATE
"""Default shortest clip (25 ms): Whisper's feature extractor needs one 400-sample analysis window."""

SILENCE_PEAK = 1e-4
"""Mono peak below this counts as silence (about 3 LSB of 16-bit PCM)."""

CLIP_LEVEL = 0.999
CLIP_MIN_RUN = 3
CLIP_FRACTION = 1e-3

_FLOAT_TOLERANCE = 1e-6
# Formats whose header frame count is exact, so a short read means a truncated file.
_EXACT_LENGTH_FORMATS = {"FLAC", "WAV", "WAVEX", "RF64", "W64", "AIFF", "CAF"}
# libsndfile reports SF_COUNT_MAX frames when the header does not say.
_UNKNOWN_FRAMES = 2**62

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, "torch.Tensor", Mapping, Any]  # noqa: F821


# --------------------------------------------------------------------------------------------- helpers
def _check_rate(value: Any, what: str = "sampling_rate") -> int:
    """A whole, positive, plausible number of Hz, as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{what} must be a whole number of samples per second (e.g. 16000), got {value!r} "
            f"({type(value).__name__}). Pass it as an int, e.g. {what}=16000."
        )
    f = float(value)
    if not math.isfinite(f) or f <= 0:
        raise ValueError(
            f"{what} must be > 0, got {value!r}. Pass the rate the audio was recorded at in Hz "
            "(e.g. the second value returned by soundfile.read)."
        )
    if f != int(f):
        raise ValueError(
            f"{what} must be a whole number of Hz, got {value!r}. Round it (e.g. {what}={round(f)}) "
            "or resample the audio to a standard rate first."
        )
    rate = int(f)
    if rate < MIN_SAMPLING_RATE:
        raise ValueError(
            f"{what}={rate} Hz is implausibly low for audio (minimum {MIN_SAMPLING_RATE} Hz). If you meant "
            f"kHz, pass Hz instead (e.g. {what}={rate * 1000})."
        )
    if rate > MAX_SAMPLING_RATE:
        raise ValueError(
            f"{what}={rate} Hz is implausibly high for audio (maximum {MAX_SAMPLING_RATE} Hz, the highest rate audio "
            f"hardware records at). Pass the rate the audio was recorded at in Hz, e.g. {what}=16000 or 48000."
        )
    return rate


def _check_min_seconds(min_seconds: Any) -> Optional[float]:
    if min_seconds is None:
        return None
    if isinstance(min_seconds, bool) or not isinstance(min_seconds, numbers.Real) or not min_seconds >= 0:
        raise ValueError(
            f"min_seconds must be a non-negative number of seconds or None (no minimum), got {min_seconds!r}."
        )
    return float(min_seconds)


def _check_max_seconds(max_seconds: Any) -> Optional[float]:
    if max_seconds is None:
        return None
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, numbers.Real) or not max_seconds > 0:
        raise ValueError(
            f"max_seconds must be a positive number of seconds or None (no limit), got {max_seconds!r}."
        )
    return float(max_seconds)


def _too_long(name: str, seconds: float, max_seconds: float) -> ValueError:
    return ValueError(
        f"{name} is {seconds:.2f} s long, longer than the limit max_seconds={max_seconds:g} s "
        f"(the Whisper encoder sees 30 s windows). Split it into chunks of at most {max_seconds:g} s "
        f"(e.g. on pauses), or raise the limit with load_audio(..., max_seconds={math.ceil(seconds)}) "
        "or max_seconds=None."
    )


def _check_rate_agrees(name: str, native_rate: int, sampling_rate: Any) -> None:
    if sampling_rate is None:
        return
    given = _check_rate(sampling_rate)
    if given != native_rate:
        raise ValueError(
            f"sampling_rate={given} was passed but {name} is at {native_rate} Hz. sampling_rate describes "
            "the *input* (it is read from the source here), it does not choose the output rate: drop it, "
            f"and use target_sampling_rate=... to choose the rate load_audio returns (default "
            f"{WHISPER_SAMPLING_RATE})."
        )


def _describe_path(path: Union[str, os.PathLike]) -> str:
    return f"audio file '{os.fspath(path)}'"


# --------------------------------------------------------------------------------------------- container sizes
# Writers that stream to a pipe cannot seek back to fill in sizes; they leave one of these (ffmpeg: 0xFFFFFFFF,
# sox: 0x7FFFF000-ish), which means "unknown length", not "truncated".
_PLACEHOLDER_MIN = 0x7FFFF000
_W64_RIFF_GUID = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
# Some writers count the 8-byte RIFF / FORM header in its own size field; libsndfile tolerates it, so do we.
_FORM_SIZE_SLACK = 8


def _is_placeholder(size: int, width: int) -> bool:
    return size == 0 or (width == 4 and size >= _PLACEHOLDER_MIN)


def _declared_truncation(f: Any) -> Optional[str]:
    """Why the container's own header says the binary, seekable file ``f`` is cut short, or ``None``.

    Covers RIFF/RIFX/RF64/BW64 WAVE, Sony Wave64, CAF and AIFF/AIFC: the audio chunk's declared size and the
    declared file size are compared with the bytes present. Other formats give ``None``.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    head = f.read(40)
    try:
        magic, form = head[:4], head[8:12]
        if magic in (b"RIFF", b"RIFX", b"RF64", b"BW64") and form == b"WAVE":
            endian = ">" if magic == b"RIFX" else "<"
            (declared,) = struct.unpack(endian + "I", head[4:8])
            return _chunk_truncation(f, size, kind=magic.decode(), declared_end=declared + 8, start=12, id_len=4,
                                     size_format=endian + "I", align=2, size_counts_header=False, audio_id=b"data")
        if magic == b"FORM" and form in (b"AIFF", b"AIFC"):
            (declared,) = struct.unpack(">I", head[4:8])
            return _chunk_truncation(f, size, kind=form.decode(), declared_end=declared + 8, start=12, id_len=4,
                                     size_format=">I", align=2, size_counts_header=False, audio_id=b"SSND")
        if magic == b"caff":  # sizes are signed 64-bit; the data chunk's -1 means "unknown length"
            return _chunk_truncation(f, size, kind="CAF", declared_end=None, start=8, id_len=4, size_format=">q",
                                     align=1, size_counts_header=False, audio_id=b"data")
        if head[:16] == _W64_RIFF_GUID and head[24:28] == b"wave":
            (declared,) = struct.unpack("<Q", head[16:24])
            return _chunk_truncation(f, size, kind="Wave64", declared_end=declared, start=40, id_len=16,
                                     size_format="<Q", align=8, size_counts_header=True, audio_id=b"data")
        return None
    finally:
        f.seek(0)


def _chunk_truncation(f: Any, size: int, *, kind: str, declared_end: Optional[int], start: int, id_len: int,
                      size_format: str, align: int, size_counts_header: bool, audio_id: bytes) -> Optional[str]:
    width = struct.calcsize(size_format)
    header = id_len + width
    rf64_sizes = None  # (riff size, data size) from an RF64/BW64 ds64 chunk
    pos = start
    while pos + header <= size:
        f.seek(pos)
        raw = f.read(header)
        chunk_id = raw[:4]
        (declared,) = struct.unpack(size_format, raw[id_len:header])
        payload = declared - header if size_counts_header else declared
        if payload < 0:
            return None  # not a size at all: let the decoder judge the file
        present = size - pos - header
        if chunk_id == b"ds64" and kind in ("RF64", "BW64") and present >= 16:
            rf64_sizes = struct.unpack("<QQ", f.read(16))
            declared_end = rf64_sizes[0] + 8
        if chunk_id == audio_id:
            if rf64_sizes is not None and declared == 0xFFFFFFFF:
                payload = rf64_sizes[1]
            elif _is_placeholder(declared, width):
                return None  # written as a stream of unknown length
            if payload > present:
                return (
                    f"its {kind} header declares {payload} bytes of audio data but only {present} are present "
                    f"({100 * present / payload:.0f}%)"
                )
        elif payload > present:
            name = chunk_id.decode("latin-1")
            return f"its '{name}' chunk declares {payload} bytes but only {present} are present"
        pos += header + payload + (-payload) % align
    if declared_end is None or _is_placeholder(declared_end - 8, width):
        return None
    if declared_end > size + _FORM_SIZE_SLACK:
        return f"its {kind} header declares a file of {declared_end} bytes but only {size} are present"
    return None


# --------------------------------------------------------------------------------------------- decoding
def _truncation_error(name: str, why: str) -> ValueError:
    return ValueError(
        f"{name} is truncated or corrupt: {why}. It was probably cut short (an interrupted download, copy or "
        "recording): re-download or re-export it. (Decoders would silently read only the part that is present.)"
    )


def _decode_file(file: Any, name: str, max_seconds: Optional[float]) -> Tuple[np.ndarray, int]:
    """Decode a path or file-like with soundfile to ``([samples, channels] float32, rate)``."""
    import soundfile as sf

    if isinstance(file, (str, bytes, os.PathLike)):
        with open(file, "rb") as f:
            why, is_flac = _declared_truncation(f), f.read(4) == b"fLaC"
    else:
        why, is_flac = _declared_truncation(file), file.read(4) == b"fLaC"
        file.seek(0)
    if why is not None:
        raise _truncation_error(name, why)

    hint = (
        "The file may be corrupt, truncated or not an audio file at all. soundfile/libsndfile reads WAV, FLAC, "
        "OGG (Vorbis/Opus), MP3, AIFF and similar, but not e.g. m4a/AAC or video containers: convert it "
        "(e.g. `ffmpeg -i input -ac 1 -ar 16000 output.wav`), or decode it yourself and pass the array "
        "with its sampling_rate."
    )
    errors = (sf.SoundFileError, RuntimeError, TypeError, ValueError, EOFError)
    try:
        handle = sf.SoundFile(file)
    except errors as err:
        if is_flac:  # a FLAC stream that cannot be parsed is cut short or damaged, not of an unknown format
            raise _truncation_error(name, f"the FLAC decoder could not read its header ({err})") from None
        raise ValueError(f"{name} could not be decoded as audio ({err}). {hint}") from None
    with handle:
        rate, frames, fmt = int(handle.samplerate), int(handle.frames), str(handle.format)
        if frames >= _UNKNOWN_FRAMES:  # e.g. a FLAC stream whose STREAMINFO leaves the total at 0
            raise ValueError(
                f"{name} could not be decoded as audio: its {fmt} header does not give the stream's length (it was "
                "written as a stream), which libsndfile cannot read. Re-encode it, e.g. `ffmpeg -i input output.wav`, "
                "or decode it yourself and pass the array with its sampling_rate."
            )
        if rate <= 0 or rate > MAX_SAMPLING_RATE:
            raise ValueError(
                f"{name} could not be decoded as audio: its header gives sampling rate {rate} Hz (accepted: 1 to "
                f"{MAX_SAMPLING_RATE} Hz), so the header is corrupt. {hint}"
            )
        if max_seconds is not None and frames / rate > max_seconds:
            raise _too_long(name, frames / rate, max_seconds)
        try:
            data = handle.read(dtype="float32", always_2d=True)
        except errors as err:
            if fmt == "FLAC":
                raise _truncation_error(name, f"the FLAC decoder failed before the end of the stream ({err})") from None
            raise ValueError(f"{name} could not be decoded as audio ({err}). {hint}") from None
    if fmt in _EXACT_LENGTH_FORMATS and data.shape[0] < frames:
        raise _truncation_error(name, f"its {fmt} header announces {frames} samples, {data.shape[0]} could be decoded")
    return data, rate


def _read_path(path: Union[str, os.PathLike], max_seconds: Optional[float]) -> Tuple[np.ndarray, int, str]:
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    name = _describe_path(raw)
    if not raw.strip():
        raise ValueError("the audio path is an empty string: pass the path of an audio file.")
    p = Path(raw)
    if not p.exists():
        if "://" in raw:
            fix = "load_audio only reads local files: download it first (e.g. huggingface_hub.hf_hub_download)"
        else:
            fix = f"check the spelling; relative paths are resolved against the current directory {os.getcwd()!r}"
        raise FileNotFoundError(f"{name} does not exist: {fix}.")
    if p.is_dir():
        raise ValueError(f"{name} is a directory, not an audio file: pass the path of one audio file.")
    if p.stat().st_size == 0:
        raise ValueError(f"{name} is empty (0 bytes), so it could not be decoded as audio: re-record or re-export it.")
    data, rate = _decode_file(raw, name, max_seconds)
    return data, rate, name


def _read_bytes(blob: Union[bytes, bytearray, memoryview], name: str, max_seconds: Optional[float]):
    blob = bytes(blob)
    if len(blob) == 0:
        raise ValueError(f"{name} is empty (0 bytes), so it could not be decoded as audio: pass a whole audio file.")
    return _decode_file(io.BytesIO(blob), name, max_seconds)


def _tensor_to_numpy(t: Any, name: str) -> np.ndarray:
    import torch

    if t.is_meta:
        raise ValueError(
            f"{name} is a meta tensor (shape {tuple(t.shape)}): it has a shape but no samples, e.g. because it was "
            "created under device='meta' or init_empty_weights. Pass a tensor that holds the recorded samples."
        )
    if t.layout != torch.strided:
        raise ValueError(
            f"{name} is a {str(t.layout).replace('torch.', '')} tensor; load_audio takes dense samples: pass "
            "x.to_dense() (audio is rarely sparse: check that this is the waveform)."
        )
    t = t.detach()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()  # bfloat16 / float8: numpy has no such dtype; float32 holds them exactly
    return t.cpu().numpy()


def _is_tensor(x: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return isinstance(x, torch.Tensor)


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if _is_tensor(x):
        return _tensor_to_numpy(x, name)
    if isinstance(x, np.ndarray):
        return x
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} could not be turned into an array of samples ({err}). Pass a 1-D numpy array "
            "or torch tensor of samples (one clip at a time)."
        ) from None
    return arr


# --------------------------------------------------------------------------------------------- conversion
def _to_float32(x: np.ndarray, name: str) -> np.ndarray:
    """Scale/cast to float32 (always a copy). Float input is range-checked here."""
    kind, size = x.dtype.kind, x.dtype.itemsize
    if kind == "f":
        bad = ~np.isfinite(x)
        if bad.any():
            n_nan = int(np.isnan(x).sum())
            n_inf = int(bad.sum()) - n_nan
            first = int(np.flatnonzero(bad.reshape(-1))[0])
            raise ValueError(
                f"{name} contains non-finite samples ({n_nan} NaN, {n_inf} inf; first at flat index {first}). "
                "The recording or an earlier processing step is broken: fix the source, or replace them "
                "(e.g. numpy.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)) before calling load_audio."
            )
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > 1.0 + _FLOAT_TOLERANCE:
            if peak <= 2**31 and np.all(x == np.round(x)):
                guess = "int16" if peak <= 32768 else "int32"
                extra = (
                    f" The samples are whole numbers, so this looks like integer PCM stored as float: pass "
                    f"x.astype(numpy.{guess}) (it is then scaled for you) or divide by "
                    f"{32768 if guess == 'int16' else 2**31}."
                )
            else:
                extra = ""
            raise ValueError(
                f"{name} is floating point with peak |x| = {peak:.6g} > 1.0, but float audio must lie in [-1, 1]. "
                "Normalise it (x / numpy.abs(x).max()) or, if it is integer PCM, pass it with its integer dtype "
                f"(int16 / int32 / uint8) so it is scaled correctly.{extra}"
            )
        out = x.astype(np.float32)  # always a copy
        np.clip(out, -1.0, 1.0, out=out)  # only affects values within the rounding tolerance
        return out
    if kind == "i" and size in (1, 2, 4):
        scale = {1: 128.0, 2: 32768.0, 4: 2.0**31}[size]
        return (x.astype(np.float64) / scale).astype(np.float32)
    if kind == "u" and size == 1:
        return ((x.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if kind in ("i", "u"):
        raise ValueError(
            f"{name} has dtype {x.dtype}, whose full scale is ambiguous for audio. Cast it to the PCM width you "
            "actually have - int16 for 16-bit (x.astype(numpy.int16)), int32 for 32-bit, uint8 for 8-bit WAV - "
            "or convert to float32 in [-1, 1]."
        )
    kinds = {"b": "boolean", "c": "complex", "O": "Python-object", "U": "string", "S": "bytes-string",
             "V": "structured", "M": "datetime", "m": "timedelta"}
    raise ValueError(
        f"{name} has unsupported dtype {x.dtype} ({kinds.get(kind, 'non-audio')} values). Pass real-valued samples "
        "as float32/float64 in [-1, 1] or integer PCM (int16, int32, int8, uint8)"
        + (" - for complex data take the real part (x.real) if that is really the waveform." if kind == "c" else ".")
    )


def _channel_axis(shape: Tuple[int, ...], layout: str, name: str) -> Optional[int]:
    """Axis of channels for a 2-D array (None for 1-D)."""
    if len(shape) == 1:
        return None
    if layout == "channels_first":
        return 0
    if layout == "channels_last":
        return 1
    rows, cols = shape
    if rows == cols:
        if rows == 1:
            return 0
        raise ValueError(
            f"{name} has square shape {shape}, so it is ambiguous which axis holds the channels. Pass a 1-D "
            "array, or mix it down yourself (x.mean(axis=channel_axis))."
        )
    return 0 if rows < cols else 1


def _clipped_fraction(x: np.ndarray, channel_axis: Optional[int]) -> float:
    hot = np.abs(x) >= CLIP_LEVEL
    if channel_axis is not None:
        hot = hot.any(axis=channel_axis)
    if not hot.any():
        return 0.0
    edges = np.diff(np.concatenate(([0], hot.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    runs = ends - starts
    return float(runs[runs >= CLIP_MIN_RUN].sum()) / hot.size


def _resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    if orig == new:
        return x
    import torch
    import torchaudio.functional as AF

    with torch.no_grad():
        out = AF.resample(torch.from_numpy(x), orig_freq=orig, new_freq=new).numpy()
    out = np.array(out, dtype=np.float32, copy=True)
    np.clip(out, -1.0, 1.0, out=out)  # windowed-sinc ringing can overshoot near full scale
    return out


def _finish(
    x: np.ndarray,
    rate: int,
    name: str,
    layout: str,
    target: int,
    max_seconds: Optional[float],
    min_seconds: Optional[float],
    allow_silence: bool,
) -> np.ndarray:
    if x.ndim == 0:
        raise ValueError(
            f"{name} is a single number (0-d array), not a waveform: pass a 1-D array of samples."
        )
    if x.ndim > 2:
        raise ValueError(
            f"{name} has {x.ndim} dimensions {tuple(x.shape)}; load_audio takes one clip, as [samples] or "
            "[channels, samples] / [samples, channels]. If this is a batch, call load_audio once per clip "
            "(e.g. x[0]); squeeze singleton dimensions (x.squeeze()) otherwise."
        )
    if x.size == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(x.shape)}, 0 samples). Check the recording / file, and any trimming "
            "or voice-activity detection that ran before load_audio."
        )
    axis = _channel_axis(tuple(x.shape), layout, name)
    if layout == "auto" and axis is not None and x.shape[axis] > MAX_CHANNELS:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, i.e. {x.shape[axis]} channels of {x.shape[1 - axis]} samples "
            f"(the channel axis of a 2-D array is its smaller dimension); more than {MAX_CHANNELS} channels "
            "looks like a batch of clips or a spectrogram. Pass one raw waveform at a time."
        )
    x = _to_float32(x, name)  # dtype checks, NaN/inf, float range; a fresh copy from here on

    n_samples = x.shape[0] if axis is None else x.shape[1 - axis]
    seconds = n_samples / rate
    if max_seconds is not None and seconds > max_seconds:
        raise _too_long(name, seconds, max_seconds)
    if min_seconds is not None and seconds < min_seconds:
        raise ValueError(
            f"{name} is only {1000 * seconds:.2f} ms long ({n_samples} samples at {rate} Hz), shorter than the minimum "
            f"min_seconds={min_seconds:g} s: Whisper's feature extractor analyses audio in {WHISPER_N_FFT}-sample "
            f"({1000 * WHISPER_N_FFT / WHISPER_SAMPLING_RATE:g} ms) windows and cannot turn less into features. "
            "Check that sampling_rate is right and that trimming / voice-activity detection did not cut the clip; "
            "if it really is this short, pad it with silence (numpy.pad(x, (0, n)))."
        )

    clipped = _clipped_fraction(x, axis)
    mono = x if axis is None else x.mean(axis=axis, dtype=np.float32)
    peak = float(np.max(np.abs(mono)))
    if peak < SILENCE_PEAK and not allow_silence:
        extra = ""
        if axis is not None and float(np.max(np.abs(x))) >= SILENCE_PEAK:
            extra = " (its channels cancel out when averaged to mono - is one channel phase-inverted?)"
        raise ValueError(
            f"{name} is silent: peak |x| = {peak:.3g} after conversion to mono float, below {SILENCE_PEAK:g}{extra}. "
            "Check the microphone / input device and gain, or pass allow_silence=True if silence is intended."
        )
    if clipped > CLIP_FRACTION:
        warnings.warn(
            f"{name} is clipped: {100 * clipped:.2f}% of its samples are stuck at full scale (|x| >= {CLIP_LEVEL}). "
            "Speech recognition may suffer; lower the recording gain if you can.",
            UserWarning,
            stacklevel=3,
        )
    out = _resample(np.ascontiguousarray(mono, dtype=np.float32), rate, target)
    return np.ascontiguousarray(out, dtype=np.float32)


def _samples_rate_pair(source: Any) -> Optional[Tuple[Any, Any]]:
    """``(samples, rate)`` from a 2-tuple in either order (gradio gives ``(rate, samples)``), else ``None``."""
    if not isinstance(source, tuple) or len(source) != 2:
        return None

    def is_rate(v: Any) -> bool:
        return v is None or isinstance(v, numbers.Real)

    def is_samples(v: Any) -> bool:
        return _is_tensor(v) or isinstance(v, (np.ndarray, list))

    first, second = source
    if is_samples(first) and is_rate(second):
        return first, second
    if is_rate(first) and is_samples(second):
        return second, first
    return None


# --------------------------------------------------------------------------------------------- public API
def load_audio(
    source: Source,
    sampling_rate: Optional[Union[int, float]] = None,
    *,
    target_sampling_rate: int = WHISPER_SAMPLING_RATE,
    max_seconds: Optional[float] = 30.0,
    min_seconds: Optional[float] = MIN_SECONDS,
    allow_silence: bool = False,
) -> np.ndarray:
    """Load / validate / convert one audio clip to a mono float32 waveform at ``target_sampling_rate``.

    Args:
        source: a file path (``str`` / ``os.PathLike``), the ``bytes`` of an audio file, a numpy array or
            torch tensor of samples (``[samples]``, or 2-D with the smaller dimension as channels), a
            ``datasets``-style dict (``{"array", "sampling_rate"}`` or ``{"path", "bytes"}``), a
            ``(samples, sampling_rate)`` pair (either order), or a torchcodec-style decoder with
            ``get_all_samples()``.
        sampling_rate: rate of ``source`` in Hz. Required for arrays / tensors (and ``{"array"}`` dicts
            without ``"sampling_rate"``); for files, bytes and decoders it is read from the source and, if
            given anyway, must agree.
        target_sampling_rate: rate of the returned waveform (default 16000, Whisper's rate).
        max_seconds: longest accepted duration in seconds (default 30, one Whisper window); ``None`` for
            no limit.
        min_seconds: shortest accepted duration in seconds (default ``MIN_SECONDS``, 25 ms: one Whisper
            analysis window); ``None`` for no minimum (only for audio that does not go to Whisper).
        allow_silence: accept audio whose peak is below ``SILENCE_PEAK`` (default: error).

    Returns:
        A new C-contiguous 1-D ``numpy.float32`` array at ``target_sampling_rate`` with finite samples in
        ``[-1, 1]``. The caller's data is never modified or aliased.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: undecodable or truncated file, empty / non-finite / silent / too long / too short /
            out-of-range audio, bad or missing sampling rate, meta or sparse tensor, unsupported dtype or shape.
            The message names the fix.
        TypeError: ``source`` is of an unsupported kind.

    Warns:
        UserWarning: the audio is clipped (recognition may suffer).

    See the module docstring for the exact conversions and choices.
    """
    target = _check_rate(target_sampling_rate, "target_sampling_rate")
    max_seconds = _check_max_seconds(max_seconds)
    min_seconds = _check_min_seconds(min_seconds)
    layout = "auto"
    pair = _samples_rate_pair(source)

    if callable(getattr(source, "get_all_samples", None)):  # torchcodec AudioDecoder (datasets>=4 Audio)
        name = f"audio decoder {type(source).__name__}"
        samples = source.get_all_samples()
        data, rate = getattr(samples, "data", None), getattr(samples, "sample_rate", None)
        if data is None or rate is None:
            raise TypeError(
                f"{name}.get_all_samples() returned {type(samples).__name__} without .data / .sample_rate; "
                "decode the audio yourself and pass (array, sampling_rate)."
            )
        rate = _check_rate(rate, "the decoder's sample_rate")
        _check_rate_agrees(name, rate, sampling_rate)
        x, layout = _as_numpy(data, name), "channels_first"
    elif hasattr(source, "data") and hasattr(source, "sample_rate") and not isinstance(source, (Mapping, np.ndarray)) \
            and not _is_tensor(source):  # torchcodec AudioSamples
        name = f"audio samples {type(source).__name__}"
        rate = _check_rate(source.sample_rate, "the samples' sample_rate")
        _check_rate_agrees(name, rate, sampling_rate)
        x, layout = _as_numpy(source.data, name), "channels_first"
    elif pair is not None:
        samples, pair_rate = pair
        name = "audio (samples, sampling_rate) pair"
        if pair_rate is None and sampling_rate is None:
            raise ValueError(
                f"{name} has sampling rate None: give the rate the audio was recorded at in Hz, e.g. (samples, 16000) "
                "(the second value soundfile.read returns)."
            )
        if pair_rate is not None:
            rate = _check_rate(pair_rate, "the pair's sampling rate")
            _check_rate_agrees(name, rate, sampling_rate)
        else:
            rate = _check_rate(sampling_rate)
        x = _as_numpy(samples, name)
    elif isinstance(source, Mapping):
        path = source.get("path")
        if source.get("array") is not None:
            name = f"audio dict['array'] (path {path!r})" if path else "audio dict['array']"
            dict_rate = source.get("sampling_rate")
            if dict_rate is None and sampling_rate is None:
                raise ValueError(
                    f"{name} has no 'sampling_rate': add it to the dict ({{'array': ..., 'sampling_rate': 16000}}) "
                    "or pass load_audio(d, sampling_rate=...)."
                )
            if dict_rate is not None:
                rate = _check_rate(dict_rate, "dict['sampling_rate']")
                _check_rate_agrees(name, rate, sampling_rate)
            else:
                rate = _check_rate(sampling_rate)
            x = _as_numpy(source["array"], name)
        elif source.get("bytes") is not None:
            name = f"audio bytes of {path!r}" if path else f"audio bytes ({len(source['bytes'])} bytes)"
            data, rate = _read_bytes(source["bytes"], name, max_seconds)
            _check_rate_agrees(name, rate, sampling_rate)
            x, layout = data, "channels_last"
        elif path is not None:
            data, rate, name = _read_path(path, max_seconds)
            _check_rate_agrees(name, rate, sampling_rate)
            x, layout = data, "channels_last"
        else:
            raise ValueError(
                f"audio dict with keys {sorted(map(str, source.keys()))} has none of 'array' (+ 'sampling_rate'), "
                "'bytes' or 'path' set. Pass {'array': samples, 'sampling_rate': rate}, {'path': file}, "
                "or {'bytes': file_contents}."
            )
    elif isinstance(source, (str, os.PathLike)):
        data, rate, name = _read_path(source, max_seconds)
        _check_rate_agrees(name, rate, sampling_rate)
        x, layout = data, "channels_last"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = f"audio bytes ({len(source)} bytes)"
        data, rate = _read_bytes(source, name, max_seconds)
        _check_rate_agrees(name, rate, sampling_rate)
        x, layout = data, "channels_last"
    elif _is_tensor(source) or isinstance(source, (np.ndarray, list, tuple)) or hasattr(source, "__array__"):
        name = "audio tensor" if _is_tensor(source) else "audio array"
        if sampling_rate is None:
            raise ValueError(
                "sampling_rate is required when passing a numpy array or torch tensor of samples: call "
                "load_audio(samples, sampling_rate=<rate in Hz>), e.g. the rate soundfile.read returned. "
                "(Passing a file path instead reads the rate from the file.)"
            )
        rate = _check_rate(sampling_rate)
        x = _as_numpy(source, name)
    else:
        raise TypeError(
            f"load_audio cannot read a {type(source).__name__}. Pass a file path, the bytes of a file, a numpy "
            "array / torch tensor with sampling_rate, a {'array', 'sampling_rate'} or {'path', 'bytes'} dict, "
            "or a torchcodec AudioDecoder."
        )

    return _finish(x, rate, name, layout, target, max_seconds, min_seconds, bool(allow_silence))


def audio_duration_seconds(array: Any, sampling_rate: Union[int, float]) -> float:
    """Duration in seconds of ``array`` sampled at ``sampling_rate``.

    ``array`` is a numpy array / torch tensor / list; 1-D means ``[samples]``; for 2-D the samples axis is
    the larger dimension (the same convention as :func:`load_audio`, where channels are the smaller one).
    """
    rate = _check_rate(sampling_rate)
    shape = tuple(array.shape) if hasattr(array, "shape") else np.shape(array)
    if len(shape) == 0 or len(shape) > 2:
        raise ValueError(
            f"audio_duration_seconds expects a 1-D [samples] or 2-D [channels, samples] array, got shape {shape}."
        )
    n = shape[0] if len(shape) == 1 else max(shape)
    return n / rate
