"""Prepare once: public-schema datasets -> training-ready Arrow shards -> DeepTalkDataCollator -> a model forward.

Resumption is tested for real: a subprocess preparing a dataset is SIGKILLed mid-shard and the run is redone.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import convert
from datasets import Audio, Dataset, IterableDataset
from test_data_formats import ROWS, rows_of, write_schema_datasets

from deeptalk import DeepTalkDataCollator, DeepTalkProcessor
from deeptalk.data.formats import load_conversation_dataset, processor_messages
from deeptalk.data.prepare import (
    PREPARED_COLUMNS,
    SNAC_24KHZ_NAME,
    load_prepared_dataset,
    prepare_dataset,
    prepared_codec_dir,
    prepared_summary,
    read_manifest,
)
from deeptalk.processing.codecs import load_codec
from deeptalk.recipes import build_demo_tokenizer
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config

STREAMS, CODEBOOK = 7, 256  # the tiny SNAC's layout (SNAC 24 kHz's shape with a small codebook)


@pytest.fixture(scope="module")
def schema_data(tmp_path_factory):
    return write_schema_datasets(str(tmp_path_factory.mktemp("schemas")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def processor():
    return DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), STREAMS, CODEBOOK)


@pytest.fixture(scope="module")
def model(processor):
    model = convert(tiny_text_moe("deepseek_v2", vocab_size=len(processor.tokenizer)), experts=(1, 5))
    return model.add_speech(audio_config=tiny_whisper_config(), **processor.model_speech_kwargs()).eval()


def conversations(schema_data, data_format, cache_dir, streaming=False, **kwargs):
    source = schema_data["jsonl"] if data_format == "jsonl" else schema_data[data_format]["parquet"]
    return load_conversation_dataset(source, data_format="messages" if data_format == "jsonl" else data_format,
                                     streaming=streaming, cache_dir=cache_dir, **kwargs)


def same_rows(a, b):
    rows_a, rows_b = rows_of(a), rows_of(b)
    return len(rows_a) == len(rows_b) and all(x == y for x, y in zip(rows_a, rows_b))


def answer_codes(processor, row):
    """The codes of a prepared row's (last) spoken answer, read back from its delayed layout."""
    ids = torch.tensor(row["input_ids"])
    start = int(torch.nonzero(torch.tensor(row["labels"][0]) != -100)[0])  # the answer's first learned step
    return processor.layout.undelay_layout(ids[:, start:])[1]


# ---------------------------------------------------------------------------------------------- every format
@pytest.mark.parametrize("data_format", ["voiceassistant", "asr", "spoken_qa", "jsonl"])
def test_prepare_each_format_into_a_batch_the_model_accepts(schema_data, cache_dir, processor, model, data_format,
                                                            tmp_path):
    codec = schema_data["voiceassistant"]["codec"]
    dataset = conversations(schema_data, data_format, cache_dir)
    kwargs = {"record_codec": codec} if data_format == "voiceassistant" else {"codec": codec} if data_format == "jsonl" \
        else {}
    prepared = prepare_dataset(dataset, processor, output_dir=tmp_path / "out", shard_size=4, source="test",
                               data_format=data_format, **kwargs)
    assert isinstance(prepared, Dataset) and prepared.column_names == list(PREPARED_COLUMNS)
    assert len(prepared) == len(dataset) and prepared_summary(tmp_path / "out")["shards"] == 3
    row = prepared[0]
    assert row["length"] == len(row["audio_input_mask"]) == len(row["input_ids"][0])
    assert len(row["input_features"]) == 1 and len(row["input_features"][0]) == 80  # the question stays audio
    if data_format == "voiceassistant":  # codes parsed from answer_snac, never re-encoded
        for i in range(3):
            assert torch.equal(answer_codes(processor, prepared[i]), schema_data["voiceassistant"]["codes"][i])
    if data_format == "jsonl":  # speech answers given as audio are encoded here, once
        wave, rate = sf.read(schema_data["messages"]["records"][0]["answer_audio"], dtype="float32")
        assert torch.equal(answer_codes(processor, row), codec.encode(wave, rate))
    if data_format in ("voiceassistant", "jsonl"):  # the codec the codes belong to, with its weights
        recorded = load_codec(prepared_codec_dir(tmp_path / "out"))
        assert read_manifest(tmp_path / "out")["codec"]["weights"] is True
        tone = (0.1 * np.sin(np.arange(4800) / 7)).astype(np.float32)
        assert torch.equal(recorded.encode(tone, 24000), codec.encode(tone, 24000))
    else:
        assert prepared_codec_dir(tmp_path / "out") is None

    batch = DeepTalkDataCollator(processor)([prepared[i] for i in range(4)])
    assert batch["input_ids"].shape[:2] == (4, 1 + STREAMS)
    with torch.no_grad():
        out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_voiceassistant_records_snac_24khz_without_weights(schema_data, cache_dir, tmp_path):
    dataset = conversations(schema_data, "voiceassistant", cache_dir).select(range(2))
    small = DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), STREAMS, CODEBOOK)
    with pytest.raises(ValueError, match="hubertsiuzdak/snac_24khz .7 streams x 4096 codes.*from_codec_layout"):
        prepare_dataset(dataset, small, output_dir=tmp_path / "refused", data_format="voiceassistant")
    snac_24khz = DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), 7, 4096)
    prepare_dataset(dataset, snac_24khz, output_dir=tmp_path / "out", data_format="voiceassistant")
    codec_dir = prepared_codec_dir(tmp_path / "out")
    with open(os.path.join(codec_dir, "codec_config.json")) as f:
        config = json.load(f)
    assert config["codec_name"] == SNAC_24KHZ_NAME and config["codec_type"] == "snac"
    layout = config["layout"]
    assert (layout["num_streams"], layout["codebook_size"], layout["sampling_rate"]) == (7, 4096, 24000)
    assert layout["stream_order"] == "depth_first" and layout["stream_levels"] == [0, 1, 2, 2, 1, 2, 2]
    assert read_manifest(tmp_path / "out")["codec"] == {"path": "codec", "name": SNAC_24KHZ_NAME, "weights": False,
                                                          "layout": layout}
    with pytest.raises(FileNotFoundError, match="model.safetensors"):  # the weights come from the Hub
        load_codec(codec_dir)


# ---------------------------------------------------------------------------------------------- processes, streams
def test_two_processes_and_streaming_give_the_same_rows(schema_data, cache_dir, processor, tmp_path):
    codec = schema_data["voiceassistant"]["codec"]
    reference = prepare_dataset(conversations(schema_data, "voiceassistant", cache_dir), processor,
                                output_dir=tmp_path / "one", shard_size=4, record_codec=codec)
    two = prepare_dataset(conversations(schema_data, "voiceassistant", cache_dir), processor,
                          output_dir=tmp_path / "two", shard_size=4, num_proc=2, record_codec=codec)
    streamed = conversations(schema_data, "voiceassistant", cache_dir, streaming=True)
    assert isinstance(streamed, IterableDataset)
    from_stream = prepare_dataset(streamed, processor, output_dir=tmp_path / "stream", shard_size=4, num_proc=2,
                                  record_codec=codec)
    assert len(reference) == ROWS and same_rows(reference, two) and same_rows(reference, from_stream)
    assert read_manifest(tmp_path / "stream")["streamed"] is True
    # read back memory-mapped, or as a stream with one stream shard per prepared shard
    assert all(f.startswith(str(tmp_path / "one")) for f in (c["filename"] for c in reference.cache_files))
    lazy = load_prepared_dataset(tmp_path / "one", streaming=True)
    assert isinstance(lazy, IterableDataset) and lazy.num_shards == 3 and same_rows(reference, lazy)


# ---------------------------------------------------------------------------------------------- resumption
KILLED_PREPARE = """
import os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
from deeptalk import DeepTalkProcessor
from deeptalk.data.formats import load_conversation_dataset
from deeptalk.data.prepare import prepare_dataset
from deeptalk.recipes import build_demo_tokenizer

source, output, marker, stall_at, cache_dir = sys.argv[1:]
processor = DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), 7, 256)
encode, calls = DeepTalkProcessor.encode_conversation, [0]

def stalling_encode(self, *args, **kwargs):  # stall mid-shard so that the kill lands there
    calls[0] += 1
    if calls[0] == int(stall_at):
        open(marker, "w").close()
        time.sleep(300)
    return encode(self, *args, **kwargs)

DeepTalkProcessor.encode_conversation = stalling_encode
dataset = load_conversation_dataset(source, data_format="asr", keep_columns=["id"], cache_dir=cache_dir)
prepare_dataset(dataset, processor, output_dir=output, shard_size=3, keep_columns=["id"], source=source, data_format="asr")
"""


def test_prepare_killed_mid_shard_resumes_complete_without_duplicates(schema_data, cache_dir, processor, tmp_path):
    source, output, marker = schema_data["asr"]["parquet"], tmp_path / "out", tmp_path / "stalled"
    script = tmp_path / "killed_prepare.py"
    script.write_text(KILLED_PREPARE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    # row 8 of 10 is in the third 3-row shard: two shards are complete when the kill lands
    proc = subprocess.Popen([sys.executable, str(script), source, str(output), str(marker), "8", cache_dir],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the prepare subprocess ended before the kill:\n{proc.stdout.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "the prepare subprocess never reached the stall"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the subprocess and anything it started
        proc.wait()
    names = sorted(os.listdir(output))
    assert "shard-00000" in names and "shard-00001" in names and "shard-00002" not in names
    assert any(n.startswith("shard-00002.tmp-") for n in names)  # the shard being written when killed
    assert read_manifest(output)["complete"] is False
    with pytest.raises(ValueError, match="only partly prepared"):
        load_prepared_dataset(output)
    kept = {n: os.stat(output / n / "data-00000-of-00001.arrow").st_mtime_ns for n in ("shard-00000", "shard-00001")}

    dataset = load_conversation_dataset(source, data_format="asr", keep_columns=["id"], cache_dir=cache_dir)
    resumed = prepare_dataset(dataset, processor, output_dir=output, shard_size=3, keep_columns=["id"], source=source,
                              data_format="asr")
    ids = resumed["id"]
    assert ids == [r["id"] for r in schema_data["asr"]["records"]]  # every row once, in source order
    assert {n: os.stat(output / n / "data-00000-of-00001.arrow").st_mtime_ns for n in kept} == kept  # not redone
    assert not any(".tmp-" in n for n in os.listdir(output))
    manifest = read_manifest(output)
    assert manifest["complete"] and manifest["num_rows"] == ROWS and len(manifest["shards"]) == 4
    uninterrupted = prepare_dataset(dataset, processor, output_dir=tmp_path / "whole", shard_size=3,
                                    keep_columns=["id"], source=source, data_format="asr")
    assert same_rows(resumed, uninterrupted)


def test_streamed_prepare_resumes_at_the_first_missing_shard(schema_data, cache_dir, processor, tmp_path):
    def run():
        streamed = conversations(schema_data, "asr", cache_dir, streaming=True)
        return prepare_dataset(streamed, processor, output_dir=tmp_path / "out", shard_size=4, data_format="asr")

    whole = rows_of(run())
    first = os.stat(tmp_path / "out" / "shard-00000" / "data-00000-of-00001.arrow").st_mtime_ns
    shutil.rmtree(tmp_path / "out" / "shard-00001")  # as if the run had died while writing it
    (tmp_path / "out" / "shard-00002.tmp-1").mkdir()
    resumed = run()
    assert rows_of(resumed) == whole and len(whole) == ROWS
    assert os.stat(tmp_path / "out" / "shard-00000" / "data-00000-of-00001.arrow").st_mtime_ns == first
    assert sorted(os.listdir(tmp_path / "out")) == ["prepare_manifest.json", "shard-00000", "shard-00001",
                                                    "shard-00002"]


def test_other_settings_are_refused_and_overwrite_starts_again(schema_data, cache_dir, processor, tmp_path):
    dataset = conversations(schema_data, "asr", cache_dir)
    prepare_dataset(dataset, processor, output_dir=tmp_path / "out", shard_size=4, data_format="asr")
    other = DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), 4, 64)
    with pytest.raises(ValueError, match="processor_fingerprint differ.*overwrite=True"):
        prepare_dataset(dataset, other, output_dir=tmp_path / "out", shard_size=4, data_format="asr")
    with pytest.raises(ValueError, match="shard_size differ"):
        prepare_dataset(dataset, processor, output_dir=tmp_path / "out", shard_size=5, data_format="asr")
    again = prepare_dataset(dataset, other, output_dir=tmp_path / "out", shard_size=5, data_format="asr",
                            overwrite=True)
    assert len(again) == ROWS and len(again[0]["input_ids"]) == 1 + 4
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        prepare_dataset(dataset, processor, output_dir=tmp_path / "stranger")
    with pytest.raises(ValueError, match="no 'messages' column"):
        prepare_dataset(Dataset.from_dict({"text": ["a"]}), processor, output_dir=tmp_path / "x")


def test_long_and_invalid_rows_are_dropped_and_counted(schema_data, cache_dir, processor, tmp_path):
    rows = Dataset.from_parquet(schema_data["asr"]["parquet"], cache_dir=cache_dir)
    rows = rows.cast_column("audio", Audio(decode=False))
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(8000, np.float32), 16000, format="WAV")
    table = Dataset.from_dict({"audio": [{"bytes": buffer.getvalue(), "path": "silent.wav"}, *rows["audio"][1:4]],
                               "text": rows["text"][:4]}, features=rows.select_columns(["audio", "text"]).features)
    dataset = load_conversation_dataset(table, data_format="asr")
    with pytest.raises(ValueError, match="Source row 0 cannot be encoded.*silen.*skip_invalid=True"):
        prepare_dataset(dataset, processor, output_dir=tmp_path / "strict")
    lengths = [len(processor.encode_conversation(processor_messages(r["messages"]))["audio_input_mask"])
               for r in rows_of(dataset)[1:]]
    limit = sorted(lengths)[1]
    kept = prepare_dataset(dataset, processor, output_dir=tmp_path / "lenient", skip_invalid=True, max_length=limit)
    summary = prepared_summary(tmp_path / "lenient")
    assert summary["invalid"] == 1 and summary["too_long"] == sum(n > limit for n in lengths) >= 1
    assert len(kept) == summary["num_rows"] == 3 - summary["too_long"] and max(kept["length"]) <= limit
