"""MelVQCodec: an offline "codec" that needs no downloaded weights.

What it is for: CPU demos, tests and the quickstart, so a fresh machine with no Hub access can train a
tiny DeepTalk model end to end and hear it speak. It is fitted on the spot from whatever audio you have
(seconds to a minute of speech is enough), with a small seeded k-means, and saved in a few hundred kB.

What it is not: a neural codec. It is log-mel frames, residual-vector-quantised, and inverted with
torchaudio's ``InverseMelScale`` (least squares) + ``GriffinLim`` phase reconstruction. Speech comes
out intelligible-ish but robotic/phasey, and quality depends on the audio it was fitted on. Use SNAC
(the paper's codec) or Mimi for anything you want to listen to seriously.

Layout (defaults): 16 kHz audio, 80 slaney mel bins, FFT 1024, hop 320 (50 mel frames/s). One LLM step
carries ``frames_per_step = 2`` consecutive mel frames (640 samples, so ``frame_rate = 25`` steps/s),
each quantised by a ``num_quantizers = 2``-level residual VQ with ``codebook_size = 512`` entries, so
``num_streams = num_quantizers * frames_per_step = 4``. Streams are level-major:
``stream = level * frames_per_step + subframe`` (coarse codes of both sub-frames first, then the
residual codes), which suits the LLM's per-stream delay pattern (coarse before fine). All sub-frames of
one level share that level's codebook.

Decoding interpolates the log-mel to a finer hop (``griffin_lim_hop``, default hop/2) before
Griffin-Lim, which measurably improves the round trip over inverting at the coarse hop.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch

from .base import (
    CODEC_CONFIG_NAME,
    WEIGHTS_NAME,
    SpeechCodec,
    WaveformLike,
    load_state_dict_safetensors,
    register_codec,
    save_state_dict_safetensors,
)

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
    d2 = (x - x[first]).pow(2).sum(1)
    for j in range(1, k):
        total = float(d2.sum())
        probs = (d2 / total) if total > 0 else torch.full_like(d2, 1.0 / n)
        pick = int(torch.multinomial(probs.cpu(), 1, generator=g))
        centroids[j] = x[pick]
        d2 = torch.minimum(d2, (x - x[pick]).pow(2).sum(1))
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
        f_max: Optional[float] = None,
        frames_per_step: int = 2,
        num_quantizers: int = 2,
        codebook_size: int = 512,
        griffin_lim_iters: int = 32,
        griffin_lim_hop: Optional[int] = None,
        log_floor: float = 1e-5,
        codec_name: Optional[str] = None,
    ):
        super().__init__(codec_name=codec_name)
        import torchaudio

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

    def layout(self) -> Dict[str, Any]:
        out = super().layout()
        out.update({k: self.settings[k] for k in ("n_mels", "n_fft", "hop_length", "frames_per_step", "num_quantizers")})
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
        waveforms: Union[WaveformLike, Iterable[WaveformLike]],
        sampling_rate: int,
        *,
        iters: int = 20,
        seed: int = 0,
        max_frames: int = 100_000,
    ) -> "MelVQCodec":
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

    def synthesize(self, log_mel: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        """Invert a ``[n_mels, T]`` log-mel (hop ``hop_length``) to a waveform with InverseMelScale + Griffin-Lim.

        Also used for the un-quantised reference round trip (``synthesize(log_mel(x))``).
        """
        import torchaudio.functional as AF

        cfg = self.settings
        hop, gl_hop = cfg["hop_length"], cfg["griffin_lim_hop"]
        n_frames = log_mel.shape[1]
        if num_samples is None:
            num_samples = n_frames * hop
        if gl_hop != hop:  # linear interpolation of the log-mel onto the finer Griffin-Lim hop
            n_out = num_samples // gl_hop + 1
            pos = (torch.arange(n_out, device=log_mel.device, dtype=torch.float32) * (gl_hop / hop)).clamp_max(n_frames - 1)
            i0 = pos.floor().long()
            i1 = (i0 + 1).clamp_max(n_frames - 1)
            w = (pos - i0.to(pos.dtype))[None, :]
            log_mel = log_mel[:, i0] * (1 - w) + log_mel[:, i1] * w
        spec = self.inverse_mel(log_mel.exp())  # [n_freq, T'] linear magnitude (least squares, >= 0)
        return AF.griffinlim(
            spec, window=self.gl_window, n_fft=cfg["n_fft"], hop_length=gl_hop, win_length=cfg["n_fft"],
            power=1.0, n_iter=cfg["griffin_lim_iters"], momentum=0.99, length=num_samples, rand_init=False,
        )

    # ------------------------------------------------------------------ persistence
    def _extra_codec_config(self) -> Dict[str, Any]:
        return dict(self.settings)

    def _save_weights(self, directory: str) -> None:
        state = {k: getattr(self, k) for k in _STATE_KEYS}
        save_state_dict_safetensors(state, directory)

    def _load_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        missing = [k for k in _STATE_KEYS if k not in tensors]
        if missing:
            raise ValueError(f"MelVQ weights are missing {missing}")
        with torch.no_grad():
            for k in _STATE_KEYS:
                buf = getattr(self, k)
                if tuple(tensors[k].shape) != tuple(buf.shape):
                    raise ValueError(f"MelVQ weight {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(buf.shape)}")
                buf.copy_(tensors[k])

    @classmethod
    def _from_local_dir(cls, directory: str, codec_config: Optional[Dict[str, Any]], **kwargs: Any) -> "MelVQCodec":
        if codec_config is None:
            raise FileNotFoundError(f"{directory!r} has no {CODEC_CONFIG_NAME}; save a MelVQCodec with save_pretrained().")
        opts = dict(codec_config.get("options", {}))
        opts.update(kwargs)
        codec = cls(codec_name=codec_config.get("codec_name"), **opts)
        codec._load_state(load_state_dict_safetensors(directory))
        return codec

    @classmethod
    def _from_hub(cls, repo_id: str, **kwargs: Any) -> "MelVQCodec":
        from huggingface_hub import hf_hub_download

        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token") if k in kwargs}
        cfg_path = hf_hub_download(repo_id, CODEC_CONFIG_NAME, **hub_kwargs)
        hf_hub_download(repo_id, WEIGHTS_NAME, **hub_kwargs)
        with open(cfg_path, "r", encoding="utf-8") as f:
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
    import torchaudio

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
