"""Tests for deeptalk.processing.codecs: one interface, several codecs, all offline (tiny random models).

Run: HF_HUB_OFFLINE=1 PYTHONPATH=. python -m pytest tests/test_codecs.py -q
"""

import glob
import json
import math
import os
import pathlib
import pickletools
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network (must precede transformers' import)

import numpy as np
import pytest
import torch

from deeptalk.processing.codecs import (
    CODEC_CONFIG_NAME,
    WEIGHTS_NAME,
    DacCodec,
    EncodecCodec,
    MelVQCodec,
    MimiCodec,
    SNACCodec,
    SpeechCodec,
    kmeans,
    load_codec,
    log_mel_distance,
    snac_flatten,
    snac_stream_table,
    snac_unflatten,
)

# ----------------------------------------------------------------------------------------------- tiny configs
# SNAC laid out like hubertsiuzdak/snac_24khz (hop 512, vq_strides [4, 2, 1] -> 7 streams, 2048 samples/step)
TINY_SNAC_24K = dict(
    sampling_rate=24000, encoder_dim=8, encoder_rates=[2, 4, 8, 8], decoder_dim=64, decoder_rates=[8, 8, 4, 2],
    attn_window_size=None, codebook_size=256, codebook_dim=4, vq_strides=[4, 2, 1],
)
# 4-level SNAC with local attention (like the 32/44 kHz models): 15 streams, frames padded to whole windows.
# LocalMHA uses 64-dim heads, so the latent (encoder_dim * 2**len(rates)) and decoder_dim must be >= 64.
TINY_SNAC_ATTN = dict(
    sampling_rate=16000, encoder_dim=8, encoder_rates=[2, 4, 4], decoder_dim=64, decoder_rates=[4, 4, 2],
    attn_window_size=16, codebook_size=64, codebook_dim=4, vq_strides=[8, 4, 2, 1],
)
TINY_MIMI = dict(
    hidden_size=64, num_filters=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
    intermediate_size=128, codebook_dim=64, vector_quantization_hidden_dimension=64, upsample_groups=64,
    codebook_size=256, num_quantizers=8,
)
TINY_DAC = dict(
    encoder_hidden_size=8, decoder_hidden_size=64, hidden_size=64, n_codebooks=4, codebook_size=256, codebook_dim=8,
    sampling_rate=16000, downsampling_ratios=[2, 4, 5, 8], upsampling_ratios=[8, 5, 4, 2],
)
TINY_ENCODEC = dict(num_filters=8, hidden_size=32, codebook_size=256, target_bandwidths=[1.5, 3.0], num_lstm_layers=1)

# ----------------------------------------------------------------------------------------------- test audio
_VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]


def synth_utterance(seed: int, sr: int = 16000, seconds: float = 1.6) -> np.ndarray:
    """Deterministic speech-like test signal (no espeak-ng needed): 120-260 ms 'syllables' that are either
    voiced (gliding f0 95-220 Hz, harmonics shaped by three vowel formants), fricative (high-passed noise)
    or pauses, each under a smooth amplitude envelope."""
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    out = np.zeros(n, np.float64)
    t = 0
    while t < n:
        dur = min(int(sr * rng.uniform(0.12, 0.26)), n - t)
        if dur < 32:
            break
        kind = rng.random()
        tt = np.arange(dur) / sr
        env = np.sin(np.pi * np.arange(dur) / dur) ** 0.6
        if kind < 0.7:
            f0 = rng.uniform(95, 220) * (1 + rng.uniform(-0.2, 0.2) * tt / max(tt[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            formants = _VOWELS[rng.integers(len(_VOWELS))]
            seg = np.zeros(dur)
            for h in range(1, 40):
                fh = h * f0.mean()
                if fh > sr / 2 - 200:
                    break
                gain = sum(1.0 / (1 + ((fh - fm) / (0.12 * fm + 60)) ** 2) for fm in formants) / h**0.5
                seg += gain * np.sin(h * phase)
            seg *= 0.3 / (np.abs(seg).max() + 1e-9)
        elif kind < 0.9:
            seg = np.diff(rng.standard_normal(dur), prepend=0.0) * 0.05
        else:
            seg = np.zeros(dur)
        out[t : t + dur] = seg * env
        t += dur
    return (out + 1e-4 * rng.standard_normal(n)).astype(np.float32)


def _demo_corpus_flacs():
    root = os.path.join(os.path.dirname(__file__), "..", "deeptalk", "data", "demo_corpus")
    return sorted(glob.glob(os.path.join(root, "**", "*.flac"), recursive=True))


# ----------------------------------------------------------------------------------------------- fixtures
def _build(name: str) -> SpeechCodec:
    torch.manual_seed(0)
    if name == "snac":
        return SNACCodec.from_config(**TINY_SNAC_24K)
    if name == "snac_attn":
        return SNACCodec.from_config(**TINY_SNAC_ATTN)
    if name == "mimi":
        return MimiCodec.from_config(TINY_MIMI, num_quantizers=4)
    if name == "dac":
        return DacCodec.from_config(TINY_DAC)
    if name == "encodec":
        return EncodecCodec.from_config(TINY_ENCODEC, bandwidth=1.5)
    if name == "melvq":
        return MelVQCodec(codebook_size=64, griffin_lim_iters=8).fit([synth_utterance(s) for s in range(3)], 16000)
    raise KeyError(name)


# the real 32/44 kHz SNACs' shape: an attention window (32) spanning several frames (4)
TINY_SNAC_WINDOW32 = dict(TINY_SNAC_ATTN, attn_window_size=32)

CODEC_NAMES = ["snac", "snac_attn", "mimi", "dac", "encodec", "melvq"]
EXPECTED = {  # (sampling_rate, num_streams, codebook_size, samples_per_frame)
    "snac": (24000, 7, 256, 2048),
    "snac_attn": (16000, 15, 64, 256),
    "mimi": (24000, 4, 256, 1920),
    "dac": (16000, 4, 256, 320),
    "encodec": (24000, 2, 256, 320),
    "melvq": (16000, 4, 64, 640),
}


@pytest.fixture(scope="module", params=CODEC_NAMES)
def codec(request):
    c = _build(request.param)
    c.test_name = request.param
    return c


def _audio_at(codec: SpeechCodec, seconds: float = 0.6, sr: int = None) -> np.ndarray:
    sr = sr or codec.sampling_rate
    return synth_utterance(7, sr=sr, seconds=seconds)


# ----------------------------------------------------------------------------------------------- shared interface
def test_layout_properties(codec):
    sr, n, k, spf = EXPECTED[codec.test_name]
    assert (codec.sampling_rate, codec.num_streams, codec.codebook_size, codec.samples_per_frame) == (sr, n, k, spf)
    assert math.isclose(codec.frame_rate, sr / spf)
    lay = codec.layout()
    assert json.loads(json.dumps(lay)) == lay  # JSON-serialisable, lossless
    for key in ("codec_name", "codec_type", "num_streams", "codebook_size", "frame_rate", "sampling_rate"):
        assert key in lay
    assert lay["num_streams"] == n and lay["codebook_size"] == k and len(lay["streams"]) == n
    assert isinstance(codec.codec_name, str) and codec.codec_name


def test_encode_shape_and_range(codec):
    x = _audio_at(codec, 0.6)
    codes = codec.encode(torch.from_numpy(x), codec.sampling_rate)
    assert codes.dtype == torch.long and codes.ndim == 2
    assert codes.shape == (codec.num_streams, math.ceil(x.size / codec.samples_per_frame))
    assert int(codes.min()) >= 0 and int(codes.max()) < codec.codebook_size
    # numpy float64 input gives the same codes as a float32 tensor
    assert torch.equal(codec.encode(x.astype(np.float64), codec.sampling_rate), codes)


def test_decode_finite_audio_of_right_length(codec):
    x = _audio_at(codec, 0.6)
    codes = codec.encode(x, codec.sampling_rate)
    y = codec.decode(codes)
    assert y.dtype == torch.float32 and y.ndim == 1
    assert y.numel() == codes.shape[1] * codec.samples_per_frame
    assert abs(y.numel() - x.size) < codec.samples_per_frame  # within one frame of the input length
    assert bool(torch.isfinite(y).all())
    assert torch.equal(codec.decode(codes), y)  # deterministic
    assert codec.decode(codes[:, :0]).numel() == 0


@pytest.mark.parametrize("input_sr", [16000, 48000])
def test_encode_resamples(codec, input_sr):
    seconds = 0.5
    x = synth_utterance(3, sr=input_sr, seconds=seconds)
    codes = codec.encode(x, input_sr)
    n_native = math.ceil(x.size * codec.sampling_rate / input_sr)
    assert codes.shape == (codec.num_streams, codec.num_frames_for(n_native))
    assert abs(codes.shape[1] - seconds * codec.frame_rate) <= 1
    assert int(codes.max()) < codec.codebook_size
    y = codec.decode(codes)
    assert bool(torch.isfinite(y).all()) and abs(y.numel() / codec.sampling_rate - seconds) < 1 / codec.frame_rate


def test_save_load_round_trip(codec, tmp_path):
    x = _audio_at(codec, 0.5)
    codes = codec.encode(x, codec.sampling_rate)
    audio = codec.decode(codes)
    codec.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert CODEC_CONFIG_NAME in files and WEIGHTS_NAME in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files)  # safetensors only
    cfg = json.loads((tmp_path / CODEC_CONFIG_NAME).read_text())
    assert cfg["codec_type"] == codec.codec_type and cfg["layout"] == codec.layout()
    for loaded in (load_codec(tmp_path), type(codec).from_pretrained(tmp_path), SpeechCodec.from_pretrained(tmp_path)):
        assert type(loaded) is type(codec)
        assert loaded.layout() == codec.layout()
        assert torch.equal(loaded.encode(x, codec.sampling_rate), codes)
        assert torch.equal(loaded.decode(codes), audio)


def test_decode_frames(codec):
    codes = codec.encode(_audio_at(codec, 0.6), codec.sampling_rate)
    n, spf = codes.shape[1], codec.samples_per_frame
    assert torch.equal(codec.decode_frames(codes, 0, n), codec.decode(codes))  # whole range == decode
    mid = n // 2
    a, b = codec.decode_frames(codes, 0, mid), codec.decode_frames(codes, mid, n)
    assert a.numel() == mid * spf and b.numel() == (n - mid) * spf
    assert bool(torch.isfinite(torch.cat([a, b])).all())
    with pytest.raises(ValueError):
        codec.decode_frames(codes, 2, 1)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: np.zeros(0, np.float32), ["empty"]),
        (lambda: torch.tensor([0.0, float("nan"), 0.1]), ["nan"]),
        (lambda: torch.tensor([0.0, float("inf"), 0.1]), ["inf"]),
        (lambda: np.zeros((2, 1600), np.float32), ["1-d", "mono"]),  # stereo [channels, samples]
        (lambda: np.zeros((1600, 2), np.float32), ["1-d", "mono"]),  # soundfile's [samples, channels]
        (lambda: np.zeros(1600, np.int16), ["floating point", "32768"]),
        (lambda: [0.0] * 100, ["numpy"]),
    ],
)
def test_bad_waveform_raises(codec, make, words):
    with pytest.raises(ValueError) as err:
        codec.encode(make(), codec.sampling_rate)
    msg = str(err.value).lower()
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("sr", [0, -16000, float("nan"), 16000.5, "16k", True])
def test_bad_sampling_rate_raises(codec, sr):
    with pytest.raises(ValueError, match="sampling_rate"):
        codec.encode(np.zeros(1600, np.float32), sr)


def test_bad_codes_raise(codec):
    n, k = codec.num_streams, codec.codebook_size
    good = torch.zeros(n, 3, dtype=torch.long)
    cases = [
        (good + k, ["out of range", f"[0, {k})"]),
        (good - 1, ["out of range"]),
        (torch.zeros(n + 1, 3, dtype=torch.long), ["streams", f"expects {n}", f"got {n + 1}"]),
        (torch.zeros(n - 1, 3, dtype=torch.long), ["streams", f"expects {n}", f"got {n - 1}"]),
        (good[None], ["[num_streams, frames]", "batch"]),
        (good.float(), ["integer"]),
    ]
    for bad, words in cases:
        with pytest.raises(ValueError) as err:
            codec.decode(bad)
        msg = str(err.value)
        assert all(w in msg for w in words), msg
    codec.decode(np.zeros((n, 2), np.int64))  # numpy codes are fine


# ----------------------------------------------------------------------------------------------- SNAC specifics
def test_snac_mini_omni_stream_order():
    # Mini-Omni / DeepTalk order: l0[f], l1[2f], l2[4f], l2[4f+1], l1[2f+1], l2[4f+2], l2[4f+3]
    assert snac_stream_table([4, 2, 1]) == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)]
    assert snac_stream_table([4, 2, 1], "level_major") == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert len(snac_stream_table([8, 4, 2, 1])) == 15
    l0, l1, l2 = torch.tensor([[10, 11]]), torch.tensor([[20, 21, 22, 23]]), torch.arange(30, 38)[None]
    flat = snac_flatten([l0, l1, l2], [4, 2, 1])
    assert flat[:, 0].tolist() == [10, 20, 30, 31, 21, 32, 33]
    assert flat[:, 1].tolist() == [11, 22, 34, 35, 23, 36, 37]


@pytest.mark.parametrize("strides", [[4, 2, 1], [8, 4, 2, 1], [2, 1], [1]])
@pytest.mark.parametrize("order", ["depth_first", "level_major"])
def test_snac_flatten_unflatten_exact_inverse(strides, order):
    g = torch.Generator().manual_seed(0)
    n_frames = 5
    levels = [torch.randint(0, 4096, (1, n_frames * strides[0] // s), generator=g) for s in strides]
    flat = snac_flatten(levels, strides, order)
    assert flat.shape == (sum(strides[0] // s for s in strides), n_frames)
    back = snac_unflatten(flat, strides, order)
    assert all(torch.equal(a, b) for a, b in zip(back, levels))
    assert torch.equal(snac_flatten(back, strides, order), flat)
    # every code appears exactly once
    assert sorted(flat.flatten().tolist()) == sorted(torch.cat([lv.flatten() for lv in levels]).tolist())


def test_snac_codes_match_native_model_and_padding():
    codec = _build("snac")
    for n in (1, 1000, 2047, 2048, 2049, 5000):
        x = torch.from_numpy(synth_utterance(n, sr=24000, seconds=n / 24000 + 1e-9)[:n])
        codes = codec.encode(x, 24000)
        assert codes.shape == (7, math.ceil(n / 2048))
        with torch.no_grad():
            native = codec.model.encode(x.view(1, 1, -1))
        assert all(torch.equal(a, b) for a, b in zip(codec.unflatten(codes), native))
        assert codec.decode(codes).numel() == codes.shape[1] * 2048


def test_snac_attention_model_decodes_any_frame_count():
    codec = _build("snac_attn")  # latent must be whole 16-step windows: 2 coarse frames
    for f in (1, 2, 3):
        codes = torch.randint(0, codec.codebook_size, (codec.num_streams, f))
        assert codec.decode(codes).numel() == f * codec.samples_per_frame


def test_snac_decode_is_seeded_and_leaves_global_rng_alone():
    codec = _build("snac")
    codes = torch.randint(0, 256, (7, 4), generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    y1 = codec.decode(codes)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(codec.decode(codes), y1)
    codec.decode_seed = None  # decoder noise from the global RNG: outputs differ
    assert not torch.equal(codec.decode(codes), codec.decode(codes))


def test_snac_paper_layout_and_wrapping_a_native_model(tmp_path):
    """The real snac_24khz architecture (random weights, nothing downloaded) gives the paper's layout."""
    from deeptalk.processing.codecs.snac_codec import _snac_class

    snac_24khz = dict(
        sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
        decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
        vq_strides=[4, 2, 1], noise=True, depthwise=True,
    )
    codec = SNACCodec(_snac_class()(**snac_24khz))  # wrap an already-built snac.SNAC
    lay = codec.layout()
    assert (lay["num_streams"], lay["codebook_size"], lay["samples_per_frame"]) == (7, 4096, 2048)
    assert math.isclose(lay["frame_rate"], 11.71875)  # ~85 ms per LLM step, 7 x 11.72 = 82 tokens/s
    assert lay["level_frame_rates"] == [11.71875, 23.4375, 46.875]
    assert lay["stream_levels"] == [0, 1, 2, 2, 1, 2, 2]
    expected_cfg = dict(snac_24khz, latent_dim=48 * 16)
    assert codec._snac_config == expected_cfg  # reconstructed from the module, enough to rebuild it


def test_snac_stays_in_eval_mode():
    codec = _build("snac")
    codec.train()
    assert not codec.training and not codec.model.training


def _pickle_globals(pickled: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs a protocol-2 pickle (torch.save's) imports, read with pickletools: nothing is
    unpickled."""
    return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: stands in for a checkpoint that runs code when it is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _native_snac_folder(folder, weights):
    """A folder laid out like hubertsiuzdak/snac_24khz: config.json + a pickled pytorch_model.bin."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_SNAC_24K))
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_native_snac_folder_loads_with_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # an explicit weights_only=True still wins
    reference = _build("snac")
    folder = _native_snac_folder(tmp_path / "snac_24khz", reference.model.state_dict())
    codec = load_codec(folder)
    assert isinstance(codec, SNACCodec)
    x = _audio_at(reference, 0.3)
    assert torch.equal(codec.encode(x, reference.sampling_rate), reference.encode(x, reference.sampling_rate))

    marker = tmp_path / "code-ran"
    hostile = _native_snac_folder(tmp_path / "hostile", {"weight": _TouchOnUnpickle(marker)})
    with pytest.raises(ValueError, match=r"hostile/pytorch_model\.bin' could not be read as plain tensors.*"
                                         r"weights_only=True.*safetensors"):
        load_codec(hostile)
    assert not marker.exists()
    # the file does carry code to run: its pickle calls getattr(pathlib.Path, "touch") on the marker
    with zipfile.ZipFile(hostile / "pytorch_model.bin") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert {("__builtin__", "getattr"), ("pathlib", "Path")} <= _pickle_globals(pickled) and b"touch" in pickled

    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin' does not exist.*model\.safetensors"):
        load_codec(folder)


# ----------------------------------------------------------------------------------------------- transformers specifics
def test_native_transformers_checkpoint_dispatch(tmp_path):
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    MimiModel(MimiConfig(**TINY_MIMI)).save_pretrained(tmp_path)  # plain transformers save, no codec_config.json
    codec = load_codec(tmp_path)
    assert isinstance(codec, MimiCodec) and codec.num_streams == 8  # Moshi's default of 8 quantizers
    assert load_codec(tmp_path, num_quantizers=2).num_streams == 2


def test_encodec_chunked_model_refused():
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(**TINY_ENCODEC, chunk_length_s=1.0, overlap=0.01, normalize=True)
    with pytest.raises(NotImplementedError, match="encodec_24khz"):
        EncodecCodec(EncodecModel(cfg))


def test_load_codec_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_codec(tmp_path)
    (tmp_path / CODEC_CONFIG_NAME).write_text(json.dumps({"codec_type": "nope"}))
    with pytest.raises(ValueError, match="not registered"):
        load_codec(tmp_path)


# ----------------------------------------------------------------------------------------------- MelVQ specifics
def test_kmeans_recovers_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centers])
    c1 = kmeans(x, 3, seed=0)
    assert torch.equal(c1, kmeans(x, 3, seed=0))
    d = torch.cdist(centers, c1).min(1).values
    assert bool((d < 0.2).all())
    assert kmeans(x[:2], 5).shape == (5, 2)  # fewer points than clusters still works


def test_melvq_requires_fit_and_fit_is_deterministic():
    with pytest.raises(RuntimeError, match="fit"):
        MelVQCodec().encode(np.zeros(1600, np.float32), 16000)
    data = [synth_utterance(s) for s in range(2)]
    a = MelVQCodec(codebook_size=32).fit(data, 16000, seed=3)
    b = MelVQCodec(codebook_size=32).fit(data, 16000, seed=3)
    assert torch.equal(a.codebooks, b.codebooks)
    assert a.layout()["streams"][1] == {"stream": 1, "level": 0, "subframe": 1}  # level-major


def test_melvq_round_trip_log_mel_distance():
    """Log-mel L1 (nats) on a held-out synthetic utterance; codec fitted on six others (default settings).

    Measured (torch 2.14, CPU, deterministic): quantised round trip 0.46, un-quantised mel -> Griffin-Lim
    round trip 0.23, a *different* utterance from the same generator 1.87, silence 7.3. Bounds: quantised
    < 0.65 nats (~1.4x headroom for BLAS/platform differences) and < 1/2.5 of the different-utterance
    distance (the decoded audio clearly carries this utterance's spectral content, not a generic one);
    the VQ may add at most 0.35 nats over the Griffin-Lim-only error (measured 0.23).
    """
    codec = MelVQCodec().fit([synth_utterance(s) for s in range(6)], 16000)
    x = synth_utterance(1000)
    y = codec.decode(codec.encode(x, 16000))
    y_unq = codec.synthesize(codec.log_mel(torch.from_numpy(x)), x.size)
    d_q, d_unq = log_mel_distance(x, y), log_mel_distance(x, y_unq)
    d_other = log_mel_distance(x, synth_utterance(2000))
    print(f"synthetic: quantised={d_q:.3f} unquantised={d_unq:.3f} other-utterance={d_other:.3f}")
    assert d_unq < 0.4
    assert d_q < 0.65 and d_q < d_other / 2.5
    assert d_q - d_unq < 0.35


def test_melvq_on_demo_corpus_speech():
    """Same measurement on espeak-ng speech from the shipped demo corpus (skipped if it is absent).

    Measured with 40 fitting files / 4 held-out files: quantised ~0.55, un-quantised ~0.25 nats. Bound 0.8.
    """
    import soundfile as sf

    files = _demo_corpus_flacs()
    if len(files) < 50:
        pytest.skip("deeptalk/data/demo_corpus has no FLAC files")
    try:
        fit_audio = [sf.read(p, dtype="float32")[0] for p in files[0:80:2]]
        test_audio = [sf.read(p, dtype="float32")[0] for p in files[1:80:20]]
        sr = sf.info(files[1]).samplerate
    except Exception as exc:  # corpus being regenerated by another process
        pytest.skip(f"demo corpus unreadable: {exc}")
    codec = MelVQCodec().fit(fit_audio, sr)
    d_q, d_unq = [], []
    for x in test_audio:
        x16 = codec.prepare_waveform(x, sr)
        d_q.append(log_mel_distance(x16, codec.decode(codec.encode(x, sr))))
        d_unq.append(log_mel_distance(x16, codec.synthesize(codec.log_mel(x16), x16.numel())))
    d_q, d_unq = float(np.mean(d_q)), float(np.mean(d_unq))
    print(f"demo corpus: quantised={d_q:.3f} unquantised={d_unq:.3f}")
    assert d_unq < 0.4 and d_q < 0.8
