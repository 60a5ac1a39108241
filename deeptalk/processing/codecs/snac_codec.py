"""SNAC (Multi-Scale Neural Audio Codec), the codec used by DeepTalk / Mini-Omni / LUCY.

SNAC quantises the latent at several temporal resolutions. ``hubertsiuzdak/snac_24khz`` has
``vq_strides=[4, 2, 1]`` on a hop of 512 samples: level 0 at ~11.7 Hz, level 1 at ~23.4 Hz and
level 2 at ~46.9 Hz, i.e. 1 + 2 + 4 = 7 codes per coarse frame of 2048 samples (~85 ms). The LLM
takes one step per coarse frame, so ``num_streams = 7`` and ``frame_rate = 24000 / 2048 ≈ 11.72``.

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

import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .base import (
    SpeechCodec,
    load_state_dict_safetensors,
    register_codec,
    save_state_dict_safetensors,
    hub_download_codec_config,
    CODEC_CONFIG_NAME,
    WEIGHTS_NAME,
)

SNAC_CONFIG_NAME = "config.json"  # same file name and format as the Hub's snac repos
SNAC_PICKLE_NAME = "pytorch_model.bin"  # what the Hub's snac repos ship (a pickled state dict)
STREAM_ORDERS = ("depth_first", "level_major")


def snac_stream_table(vq_strides: Sequence[int], order: str = "depth_first") -> List[Tuple[int, int]]:
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
    table: List[Tuple[int, int]] = []

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
                f"SNAC level {level} has {levels[level].numel()} codes, expected {n_frames * r} (= {n_frames} frames x {r})"
            )
        rows.append(levels[level].view(n_frames, r)[:, offset])
    return torch.stack(rows, dim=0)


def snac_unflatten(flat: torch.Tensor, vq_strides: Sequence[int], order: str = "depth_first") -> List[torch.Tensor]:
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
        model: "torch.nn.Module",
        stream_order: str = "depth_first",
        decode_seed: Optional[int] = 0,
        codec_name: Optional[str] = None,
        snac_config: Optional[Dict[str, Any]] = None,
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
    def from_config(cls, stream_order: str = "depth_first", decode_seed: Optional[int] = 0, **snac_kwargs: Any) -> "SNACCodec":
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
            {"stream": i, "level": lvl, "offset": off, "codes_per_frame_at_level": self.vq_strides[0] // self.vq_strides[lvl]}
            for i, (lvl, off) in enumerate(self._table)
        ]

    def layout(self) -> Dict[str, Any]:
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

    def unflatten(self, codes: torch.Tensor) -> List[torch.Tensor]:
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

    def _decode_window(self, lo: int, hi: int, total: int) -> Tuple[int, int]:
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
    def _extra_codec_config(self) -> Dict[str, Any]:
        return {"stream_order": self.stream_order, "decode_seed": self.decode_seed, "snac_config": self._snac_config}

    def _save_weights(self, directory: str) -> None:
        save_state_dict_safetensors(self.model.state_dict(), directory)
        with open(os.path.join(directory, SNAC_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self._snac_config, f, indent=2)

    @classmethod
    def _from_local_dir(cls, directory: str, codec_config: Optional[Dict[str, Any]], **kwargs: Any) -> "SNACCodec":
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
                with open(os.path.join(directory, SNAC_CONFIG_NAME), "r", encoding="utf-8") as f:
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
    def _from_hub(cls, repo_id: str, **kwargs: Any) -> "SNACCodec":
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
        from snac import SNAC
    return SNAC


def _load_native_snac(config_path: str, weights_path: str) -> "torch.nn.Module":
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
    with open(config_path, "r", encoding="utf-8") as f:
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


def _snac_config_of(model: "torch.nn.Module") -> Dict[str, Any]:
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
