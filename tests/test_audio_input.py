"""Tests for deeptalk.processing.audio.load_audio: the one place user audio enters the package.

Real files are written with soundfile into tmp_path; resampling is real torchaudio; the shipped
demo corpus and a real ``datasets.Dataset.map`` are used. Everything is CPU-only and offline.
"""

import io
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import deeptalk
from deeptalk.processing.audio import (
    MIN_SECONDS,
    WHISPER_SAMPLING_RATE,
    audio_duration_seconds,
    load_audio,
)


def sine(freq=440.0, sr=16000, seconds=1.0, amp=0.5, dtype=np.float32):
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(dtype)


def peak_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[int(np.argmax(spec))]


def check_output(y, n=None):
    assert isinstance(y, np.ndarray)
    assert y.dtype == np.float32 and y.ndim == 1 and y.flags.c_contiguous
    assert np.isfinite(y).all() and np.abs(y).max() <= 1.0
    if n is not None:
        assert len(y) == n


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------------------------- constants
def test_whisper_sampling_rate_constant():
    assert WHISPER_SAMPLING_RATE == 16000


def test_audio_duration_seconds():
    assert audio_duration_seconds(np.zeros(8000), 16000) == 0.5
    assert audio_duration_seconds(np.zeros((2, 48000)), 48000) == 1.0
    assert audio_duration_seconds(torch.zeros(44100, 2), 44100) == 1.0
    with pytest.raises(ValueError, match="sampling_rate"):
        audio_duration_seconds(np.zeros(10), 0)


# ------------------------------------------------------------------------------------------- files
def test_wav_pcm16_file_str_and_path(tmp_path, no_warnings):
    x = sine()
    f = tmp_path / "a.wav"
    sf.write(f, x, 16000, subtype="PCM_16")
    y = load_audio(str(f))
    check_output(y, len(x))
    np.testing.assert_allclose(y, x, atol=2 / 32768)
    np.testing.assert_array_equal(load_audio(f), y)  # pathlib.Path works too


def test_wav_pcm_u8_file(tmp_path):
    x = sine()
    f = tmp_path / "u8.wav"
    sf.write(f, x, 16000, subtype="PCM_U8")
    assert sf.info(str(f)).subtype == "PCM_U8"
    y = load_audio(f)
    check_output(y, len(x))
    np.testing.assert_allclose(y, x, atol=1.5 / 128)
    assert abs(y.mean()) < 0.01  # centred at 0, not 128


def test_wav_float_file(tmp_path):
    x = sine(amp=0.9)
    f = tmp_path / "float.wav"
    sf.write(f, x, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(f), x, atol=1e-7)


def test_flac_file(tmp_path):
    x = sine()
    f = tmp_path / "a.flac"
    sf.write(f, x, 16000, format="FLAC")
    y = load_audio(f)
    check_output(y, len(x))
    np.testing.assert_allclose(y, x, atol=2 / 32768)


def test_stereo_file_is_averaged(tmp_path):
    left, right = sine(440, amp=0.6), sine(440, amp=0.2)
    f = tmp_path / "stereo.wav"
    sf.write(f, np.stack([left, right], axis=1), 16000, subtype="FLOAT")  # soundfile: [samples, channels]
    y = load_audio(f)
    check_output(y, len(left))
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


def test_8k_file_is_upsampled(tmp_path):
    f = tmp_path / "8k.wav"
    sf.write(f, sine(300, sr=8000, seconds=2.0), 8000, subtype="PCM_16")
    y = load_audio(f)
    check_output(y, 32000)
    assert len(y) / 16000 == pytest.approx(2.0)
    assert peak_freq(y, 16000) == pytest.approx(300, abs=1)


def test_48k_file_sine_stays_at_440(tmp_path):
    f = tmp_path / "48k.flac"
    sf.write(f, sine(440, sr=48000, seconds=1.0), 48000, format="FLAC")
    y = load_audio(f)
    check_output(y, 16000)  # duration preserved: 1 s
    assert peak_freq(y, 16000) == pytest.approx(440, abs=1)


@pytest.mark.parametrize("sr", [22050, 44100])
def test_other_rates_preserve_duration(sr):
    y = load_audio(sine(440, sr=sr, seconds=1.5), sr)
    check_output(y)
    assert len(y) / 16000 == pytest.approx(1.5, abs=1e-3)
    assert peak_freq(y, 16000) == pytest.approx(440, abs=1)


def test_target_sampling_rate(tmp_path):
    y = load_audio(sine(440, sr=16000), 16000, target_sampling_rate=24000)
    check_output(y, 24000)


def test_bytes_input(tmp_path):
    x = sine()
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="FLAC")
    blob = buf.getvalue()
    np.testing.assert_allclose(load_audio(blob), x, atol=2 / 32768)
    np.testing.assert_allclose(load_audio(bytearray(blob)), x, atol=2 / 32768)


# ------------------------------------------------------------------------------------------- arrays
def test_int16_array():
    x = (sine() * 32768).astype(np.int16)
    y = load_audio(x, 16000)
    np.testing.assert_allclose(y, x / 32768.0, atol=1e-7)
    assert load_audio(np.array([-32768, 0, 16384] * 200, np.int16), 16000)[:3].tolist() == [-1.0, 0.0, 0.5]


def test_int32_array():
    x = (sine().astype(np.float64) * 2**31).astype(np.int32)
    np.testing.assert_allclose(load_audio(x, 16000), x / 2.0**31, atol=1e-7)


def test_uint8_array_is_centred_at_128():
    x = np.array([128, 192, 64, 255, 0] * 200, dtype=np.uint8)
    y = load_audio(x, 16000)
    np.testing.assert_allclose(y[:5], [0.0, 0.5, -0.5, 127 / 128, -1.0])


def test_int8_array():
    x = np.array([0, 64, -64, -128] * 200, dtype=np.int8)
    np.testing.assert_allclose(load_audio(x, 16000)[:4], [0.0, 0.5, -0.5, -1.0])


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_float_arrays_cast_to_float32(dtype):
    x = sine(dtype=dtype)
    y = load_audio(x, 16000)
    check_output(y, len(x))
    np.testing.assert_allclose(y, x.astype(np.float32), atol=1e-7)


def test_stereo_array_either_layout():
    left, right = sine(440, amp=0.6), sine(660, amp=0.2)
    expected = (left + right) / 2
    np.testing.assert_allclose(load_audio(np.stack([left, right]), 16000), expected, atol=1e-7)  # [C, S]
    np.testing.assert_allclose(load_audio(np.stack([left, right], axis=1), 16000), expected, atol=1e-7)  # [S, C]


def test_torch_tensors():
    x = sine(440, sr=48000)
    y = load_audio(torch.from_numpy(x), 48000)
    check_output(y, 16000)
    t16 = torch.from_numpy((sine() * 32767).astype(np.int16))
    np.testing.assert_allclose(load_audio(t16, 16000), t16.numpy() / 32768, atol=1e-7)
    stereo = torch.stack([torch.from_numpy(sine()), torch.from_numpy(sine())]).requires_grad_(True)
    check_output(load_audio(stereo, 16000), 16000)
    check_output(load_audio(torch.from_numpy(sine()).to(torch.bfloat16), 16000), 16000)


def test_list_input_in_dict():
    # what a datasets column of stored arrays looks like after .map (list of floats)
    y = load_audio({"array": sine().tolist(), "sampling_rate": 16000})
    check_output(y, 16000)


# ------------------------------------------------------------------------------------------- dicts / decoders
def test_dict_array_and_path_and_bytes(tmp_path):
    x = sine(440, sr=22050)
    f = tmp_path / "d.wav"
    sf.write(f, x, 22050, subtype="FLOAT")
    from_array = load_audio({"array": x, "sampling_rate": 22050})
    from_path = load_audio({"path": str(f), "bytes": None})
    from_bytes = load_audio({"path": "d.wav", "bytes": f.read_bytes()})
    np.testing.assert_allclose(from_path, from_array, atol=1e-6)
    np.testing.assert_allclose(from_bytes, from_array, atol=1e-6)


def test_datasets_audio_decode_false_dict(tmp_path):
    import datasets

    f = tmp_path / "x.flac"
    sf.write(f, sine(), 16000, format="FLAC")
    ds = datasets.Dataset.from_dict({"audio": [str(f)]}).cast_column("audio", datasets.Audio(decode=False))
    ex = ds[0]["audio"]
    assert set(ex) == {"path", "bytes"}
    check_output(load_audio(ex), 16000)


def test_torchcodec_style_decoder():
    data = torch.stack([torch.from_numpy(sine(440, sr=48000)), torch.from_numpy(sine(440, sr=48000, amp=0.1))])

    class FakeDecoder:  # duck-typed torchcodec.decoders.AudioDecoder
        def get_all_samples(self):
            return SimpleNamespace(data=data, sample_rate=48000)

    y = load_audio(FakeDecoder())
    check_output(y, 16000)
    assert peak_freq(y, 16000) == pytest.approx(440, abs=1)
    np.testing.assert_array_equal(load_audio(FakeDecoder().get_all_samples()), y)  # AudioSamples itself


def test_demo_corpus_by_path_and_by_dict():
    from deeptalk.data import demo_corpus_path, load_demo_corpus

    files = sorted((demo_corpus_path() / "audio").rglob("*.flac"))
    assert files
    y = load_audio(files[0])
    check_output(y)
    assert 0 < len(y) / 16000 < 30

    ds = load_demo_corpus("spoken_qa", splits=["test"])["test"]
    ex = ds[0]["question_audio"]
    by_dict = load_audio(ex)
    by_path = load_audio(ex["path"])
    np.testing.assert_array_equal(by_dict, by_path)


def test_datasets_map_batched_over_paths(tmp_path):
    import datasets

    paths = []
    for i, (sr, subtype) in enumerate([(16000, "PCM_16"), (8000, "PCM_U8"), (48000, "FLOAT")]):
        p = tmp_path / f"clip{i}.wav"
        sf.write(p, sine(440, sr=sr, seconds=0.5 + 0.25 * i), sr, subtype=subtype)
        paths.append(str(p))
    ds = datasets.Dataset.from_dict({"path": paths})

    def featurize(batch):
        waves = [load_audio(p) for p in batch["path"]]
        return {"input_values": waves, "n": [len(w) for w in waves]}

    out = ds.map(featurize, batched=True, batch_size=2)
    assert out["n"] == [8000, 12000, 16000]
    assert [len(v) for v in out["input_values"]] == out["n"]


# ------------------------------------------------------------------------------------------- errors
def test_empty_audio():
    with pytest.raises(ValueError, match="empty"):
        load_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="empty"):
        load_audio(np.zeros((2, 0), np.float32), 16000)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.wav"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_audio(f)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad):
    x = sine()
    x[100] = bad
    with pytest.raises(ValueError, match="non-finite.*nan_to_num"):
        load_audio(x, 16000)


def test_sampling_rate_missing_for_array():
    with pytest.raises(ValueError, match="sampling_rate is required"):
        load_audio(sine())
    with pytest.raises(ValueError, match="sampling_rate is required"):
        load_audio(torch.from_numpy(sine()))
    with pytest.raises(ValueError, match="sampling_rate"):
        load_audio({"array": sine()})


@pytest.mark.parametrize("sr", [0, -16000, 16000.5, "16000", True, float("nan")])
def test_sampling_rate_invalid(sr):
    with pytest.raises(ValueError, match="sampling_rate"):
        load_audio(sine(), sr)


def test_sampling_rate_whole_float_and_kHz_mixup():
    check_output(load_audio(sine(), 16000.0), 16000)
    check_output(load_audio(sine(), np.int64(16000)), 16000)
    with pytest.raises(ValueError, match="kHz"):
        load_audio(sine(), 16)


def test_sampling_rate_conflicting_with_file(tmp_path):
    f = tmp_path / "44k.wav"
    sf.write(f, sine(sr=44100), 44100)
    with pytest.raises(ValueError, match="target_sampling_rate"):
        load_audio(f, 16000)
    check_output(load_audio(f, 44100), 16000)  # agreeing rate is fine


def test_too_long():
    x = sine(sr=8000, seconds=31.0)
    with pytest.raises(ValueError) as err:
        load_audio(x, 8000)
    msg = str(err.value)
    assert "31.00 s" in msg and "max_seconds=30" in msg and "Split" in msg
    check_output(load_audio(x, 8000, max_seconds=None), 31 * 16000)
    check_output(load_audio(x, 8000, max_seconds=40), 31 * 16000)


def test_too_long_file_checked_from_header(tmp_path):
    f = tmp_path / "long.flac"
    sf.write(f, sine(sr=8000, seconds=12.0), 8000, format="FLAC")
    with pytest.raises(ValueError, match=r"12\.00 s.*max_seconds=10"):
        load_audio(f, max_seconds=10)


def test_silence():
    with pytest.raises(ValueError, match="silent.*allow_silence=True"):
        load_audio(np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match="silent"):
        load_audio(np.ones(16000, np.int16), 16000)  # 1 LSB of dither is still silence
    y = load_audio(np.zeros(16000, np.float32), 16000, allow_silence=True)
    check_output(y, 16000)
    assert not y.any()


def test_silence_from_cancelling_channels():
    x = sine()
    with pytest.raises(ValueError, match="cancel"):
        load_audio(np.stack([x, -x]), 16000)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_audio(tmp_path)
    with pytest.raises(ValueError, match="empty string"):
        load_audio("")


def test_text_file_named_wav(tmp_path):
    f = tmp_path / "x.wav"
    f.write_text("this is not audio, just text pretending to be a wav file\n")
    with pytest.raises(ValueError) as err:
        load_audio(f)
    assert str(f) in str(err.value) and "could not be decoded as audio" in str(err.value)


# ------------------------------------------------------------------------------------------- truncated files
DEMO_QUESTIONS = Path(deeptalk.__file__).parent / "data" / "demo_corpus" / "audio" / "questions"
DEMO_QUESTION = sorted(DEMO_QUESTIONS.glob("*.flac"))[0]


def encoded(fmt, subtype="PCM_16", **kwargs):
    """The demo question re-encoded with soundfile, as bytes."""
    samples, rate = sf.read(DEMO_QUESTION, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype, **kwargs)
    return buf.getvalue(), len(samples)


def test_truncated_wav_is_refused_with_its_name(tmp_path):
    blob, n = encoded("WAV")
    whole = tmp_path / "whole.wav"
    whole.write_bytes(blob)
    assert len(load_audio(whole)) == n  # the complete file is not flagged
    cut = tmp_path / "cut.wav"
    cut.write_bytes(blob[:20_000])
    assert sf.info(str(cut)).frames < n  # libsndfile itself would happily read the part that is there
    with pytest.raises(ValueError, match=r"cut\.wav' is truncated or corrupt: its RIFF header declares \d+ bytes "
                                         r"of audio data but only 19956 are present.*re-download"):
        load_audio(cut)
    with pytest.raises(ValueError, match=r"audio bytes \(20000 bytes\) is truncated"):
        load_audio(blob[:20_000])
    with pytest.raises(ValueError, match=r"bytes of 'q\.wav' is truncated"):
        load_audio({"path": "q.wav", "bytes": blob[:20_000]})
    with pytest.raises(ValueError, match=r"cut\.wav' is truncated"):
        load_audio({"path": str(cut), "bytes": None})


@pytest.mark.parametrize(
    "fmt, subtype, kwargs",
    [("WAV", "PCM_16", {}), ("WAV", "FLOAT", {}), ("WAV", "PCM_16", {"endian": "BIG"}), ("WAVEX", "PCM_16", {}),
     ("RF64", "PCM_16", {}), ("W64", "PCM_16", {}), ("AIFF", "PCM_16", {}), ("AIFF", "FLOAT", {}),
     ("CAF", "PCM_16", {})],
)
def test_truncation_is_read_from_each_container_header(fmt, subtype, kwargs):
    blob, n = encoded(fmt, subtype, **kwargs)
    assert len(load_audio(blob)) == n
    for size in (20_000, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError, match=r"truncated or corrupt: its \w+ header declares \d+ bytes of audio data"):
            load_audio(blob[:size])


def riff(chunks):
    body = b"WAVE" + b"".join(cid + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)
                              for cid, data in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav_chunks(seconds=0.5):
    x = (sine(seconds=seconds) * 32767).astype(np.int16)
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    return x, [(b"fmt ", fmt), (b"data", x.tobytes())]


def test_truncated_trailing_chunk_and_riff_size():
    x, chunks = wav_chunks()
    blob = riff(chunks + [(b"LIST", b"INFOISFT" + struct.pack("<I", 92) + b"x" * 92)])
    np.testing.assert_allclose(load_audio(blob), x / 32768, atol=1e-7)
    with pytest.raises(ValueError, match=r"its 'LIST' chunk declares 104 bytes but only 94 are present"):
        load_audio(blob[:-10])
    with pytest.raises(ValueError, match=r"its RIFF header declares a file of \d+ bytes but only \d+ are present"):
        load_audio(blob[: len(blob) - 112])  # cut exactly after the audio: the samples are whole, the file is not


def test_streamed_wav_sizes_and_an_off_by_eight_riff_size_are_accepted():
    x, chunks = wav_chunks()
    blob = bytearray(riff(chunks))
    streamed = bytearray(blob)
    streamed[4:8] = streamed[40:44] = b"\xff\xff\xff\xff"  # what ffmpeg leaves when it writes to a pipe
    assert streamed[36:40] == b"data"
    np.testing.assert_allclose(load_audio(bytes(streamed)), x / 32768, atol=1e-7)
    sloppy = bytearray(blob)
    sloppy[4:8] = struct.pack("<I", len(blob))  # a writer that counted the RIFF header in its own size
    np.testing.assert_allclose(load_audio(bytes(sloppy)), x / 32768, atol=1e-7)


def test_truncated_flac_is_refused(tmp_path):
    blob, n = encoded("FLAC")
    assert len(load_audio(blob)) == n
    for size in (20_000, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ValueError, match=r"is truncated or corrupt: the FLAC decoder failed"):
            load_audio(blob[:size])
    f = tmp_path / "half.flac"
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"half\.flac' is truncated or corrupt"):
        load_audio(f)
    with pytest.raises(ValueError, match=r"clip\.flac' is truncated or corrupt"):
        load_audio({"path": "clip.flac", "bytes": blob[: len(blob) // 2]})


def test_flac_without_a_declared_length_is_not_called_too_long():
    blob = bytearray(encoded("FLAC")[0])
    blob[8 + 13] &= 0xF0  # STREAMINFO total samples (36 bits) = 0: "unknown", as streaming encoders write
    blob[8 + 14 : 8 + 18] = b"\0\0\0\0"
    with pytest.raises(ValueError, match=r"its FLAC header does not give the stream's length.*ffmpeg"):
        load_audio(bytes(blob))


def test_header_sampling_rate_out_of_range():
    _, chunks = wav_chunks()
    chunks[0] = (b"fmt ", struct.pack("<HHIIHH", 1, 1, 10**9, 2 * 10**9, 2, 16))
    with pytest.raises(ValueError, match=r"header gives sampling rate 1000000000 Hz.*corrupt"):
        load_audio(riff(chunks))


# ------------------------------------------------------------------------------------------- short clips
def test_clips_shorter_than_a_whisper_window_are_refused(tmp_path):
    assert MIN_SECONDS == 0.025
    check_output(load_audio(sine()[:400], 16000), 400)
    with pytest.raises(ValueError, match=r"audio array is only 24\.94 ms long \(399 samples at 16000 Hz\).*"
                                         r"min_seconds=0\.025 s.*400-sample.*numpy\.pad"):
        load_audio(sine()[:399], 16000)
    with pytest.raises(ValueError, match=r"1102 samples at 44100 Hz"):
        load_audio(sine(sr=44100)[:1102], 44100)
    check_output(load_audio(sine(sr=44100)[:1103], 44100), 401)
    f = tmp_path / "click.wav"
    sf.write(f, sine()[:160], 16000)
    with pytest.raises(ValueError, match=r"click\.wav' is only 10\.00 ms long"):
        load_audio(f)
    check_output(load_audio(sine()[:10], 16000, min_seconds=None), 10)  # e.g. audio bound for a codec
    with pytest.raises(ValueError, match="min_seconds must be"):
        load_audio(sine(), 16000, min_seconds=-1)


# ------------------------------------------------------------------------------------------- rates, tensors, pairs
def test_sampling_rate_upper_bound():
    check_output(load_audio(sine(sr=768_000, seconds=0.05), 768_000), 800)
    with pytest.raises(ValueError, match=r"sampling_rate=1000000000 Hz is implausibly high.*768000"):
        load_audio(sine(), 1e9)
    with pytest.raises(ValueError, match=r"target_sampling_rate=768001 Hz is implausibly high"):
        load_audio(sine(), 16000, target_sampling_rate=768_001)


def test_meta_and_sparse_tensors():
    with pytest.raises(ValueError, match=r"audio tensor is a meta tensor \(shape \(16000,\)\).*no samples"):
        load_audio(torch.empty(16000, device="meta"), 16000)
    with pytest.raises(ValueError, match=r"sparse_coo tensor.*to_dense\(\)"):
        load_audio(torch.from_numpy(sine()).to_sparse(), 16000)
    with pytest.raises(ValueError, match=r"meta tensor"):
        load_audio({"array": torch.empty(2, 16000, device="meta"), "sampling_rate": 16000})


def test_samples_rate_pairs():
    x = sine(sr=8000)
    np.testing.assert_array_equal(load_audio((x, 8000)), load_audio(x, 8000))
    np.testing.assert_array_equal(load_audio((8000, x)), load_audio(x, 8000))  # gradio's (rate, samples)
    check_output(load_audio((torch.from_numpy(x), None), sampling_rate=8000), 16000)
    with pytest.raises(ValueError, match=r"\(samples, sampling_rate\) pair has sampling rate None.*\(samples, 16000\)"):
        load_audio((x, None))
    with pytest.raises(ValueError, match="sampling_rate=16000 was passed but"):
        load_audio((x, 8000), sampling_rate=16000)
    with pytest.raises(ValueError, match="implausibly high"):
        load_audio((x, 1e9))


def test_ndim_greater_than_two():
    with pytest.raises(ValueError, match="3 dimensions.*once per clip"):
        load_audio(np.zeros((2, 2, 16000), np.float32), 16000)
    with pytest.raises(ValueError, match="single number"):
        load_audio(np.float32(0.5), 16000)


@pytest.mark.parametrize(
    "x, what",
    [
        (np.zeros(1000, np.complex64) + 0.1, "complex"),
        (np.ones(1000, bool), "bool"),
        (np.array([0.1] * 1000, dtype=object), "object"),
        (np.full(1000, 100, np.int64), "int64"),
        (np.full(1000, 100, np.uint16), "uint16"),
    ],
)
def test_unsupported_dtypes(x, what):
    with pytest.raises(ValueError, match=f"dtype {what}"):
        load_audio(x, 16000)


def test_float_peak_above_one():
    with pytest.raises(ValueError, match=r"peak.*> 1\.0.*Normalise"):
        load_audio(sine(amp=1.5), 16000)
    # integer PCM stored as float gets a specific hint
    with pytest.raises(ValueError, match="astype\\(numpy.int16\\)"):
        load_audio(np.round(sine() * 32767).astype(np.float32), 16000)


def test_ambiguous_and_too_many_channels():
    with pytest.raises(ValueError, match="ambiguous"):
        load_audio(np.full((4, 4), 0.1, np.float32), 16000)
    with pytest.raises(ValueError, match="spectrogram"):
        load_audio(np.full((80, 3000), 0.1, np.float32), 16000)


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="cannot read"):
        load_audio(12345, 16000)
    with pytest.raises(ValueError, match="none of"):
        load_audio({"path": None, "bytes": None})


# ------------------------------------------------------------------------------------------- clipping
def test_clipped_audio_warns_but_loads():
    x = np.clip(sine(amp=3.0), -1.0, 1.0)  # hard clipped: long flat runs at +-1
    with pytest.warns(UserWarning, match="clipped.*recognition may suffer"):
        y = load_audio(x, 16000)
    check_output(y, 16000)
    x16 = np.clip(sine(amp=3.0) * 32768, -32768, 32767).astype(np.int16)
    with pytest.warns(UserWarning, match="clipped"):
        load_audio(x16, 16000)


def test_full_scale_sine_is_not_clipping(no_warnings):
    check_output(load_audio(sine(amp=1.0), 16000), 16000)


def test_resampled_output_stays_in_range():
    x = np.clip(sine(440, sr=44100, amp=3.0), -1, 1)  # sinc ringing overshoots near square edges
    with pytest.warns(UserWarning):
        y = load_audio(x, 44100)
    check_output(y)


# ------------------------------------------------------------------------------------------- no mutation
@pytest.mark.parametrize(
    "x, sr",
    [
        (sine(), 16000),  # float32 at the target rate: the no-op path must still copy
        (sine(dtype=np.float64), 16000),
        ((sine() * 32767).astype(np.int16), 16000),
        (np.stack([sine(sr=48000), sine(sr=48000)], axis=1), 48000),
        (np.clip(sine(amp=3.0), -1, 1), 16000),
    ],
)
def test_caller_array_not_modified(x, sr):
    before = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = load_audio(x, sr)
    np.testing.assert_array_equal(x, before)
    assert not np.shares_memory(x, y)
    y[:] = 0.25  # writing into the result must not reach the caller either
    np.testing.assert_array_equal(x, before)


def test_caller_tensor_and_dict_not_modified():
    t = torch.from_numpy(sine())
    before = t.clone()
    y = load_audio(t, 16000)
    y[:] = 0
    assert torch.equal(t, before)
    arr = sine()
    d = {"array": arr, "sampling_rate": 16000}
    y = load_audio(d)
    y[:] = 0
    assert d["array"] is arr and np.array_equal(arr, sine())


def test_read_only_input_is_fine():
    x = sine()
    x.setflags(write=False)  # e.g. the demo corpus' cached arrays
    check_output(load_audio(x, 16000), 16000)


# ------------------------------------------------------------------------------------------- through the processor
@pytest.fixture(scope="module")
def processor():
    from deeptalk import DeepTalkProcessor
    from deeptalk.processing.tokenizer import train_demo_tokenizer

    return DeepTalkProcessor.from_codec_layout(train_demo_tokenizer(["what is two plus two", "four"]),
                                               num_audio_streams=2, codebook_size=8)


def asked(audio, **part):
    return [{"role": "user", "content": [{"type": "audio", "audio": audio, **part}]},
            {"role": "assistant", "content": "four"}]


def test_processor_names_the_short_or_truncated_file(processor, tmp_path):
    ok = tmp_path / "ok.wav"
    sf.write(ok, sine(seconds=0.025), 16000)
    assert processor.encode_conversation(asked(str(ok)))["audio_feature_lengths"] == [2]
    click = tmp_path / "click.wav"
    sf.write(click, sine()[:100], 16000)
    with pytest.raises(ValueError, match=r"click\.wav' is only 6\.25 ms long.*min_seconds"):
        processor.encode_conversation(asked(str(click)))
    with pytest.raises(ValueError, match=r"audio array is only 0\.03 ms long \(20 samples at 768000 Hz\)"):
        processor.encode_conversation(asked(sine(sr=768_000)[:20], sampling_rate=768_000))
    with pytest.raises(ValueError, match="implausibly high"):
        processor.encode_conversation(asked(sine(), sampling_rate=10**9))
    cut = tmp_path / "cut.wav"
    cut.write_bytes(encoded("WAV")[0][:20_000])
    with pytest.raises(ValueError, match=r"cut\.wav' is truncated or corrupt"):
        processor.encode_conversation(asked(str(cut)))
