"""Training data at scale, in process: any source -> the processor's rows (prepared or encoded as read), mixed by
weight, one endless stream per rank; the collator on Arrow-formatted rows; the trainers on streams; the
spoken-QA benchmark's answer matching. The command-line runs (prepare, train on 2 processes, evaluate) are in
test_cli_data.py."""

import itertools
import json
import os

import numpy as np
import pytest
import torch
from conftest import convert
from datasets import Dataset, IterableDataset
from test_data_formats import ROWS, rows_of, write_schema_datasets

from deeptalk import DeepTalkDataCollator, DeepTalkProcessor
from deeptalk.data.formats import load_conversation_dataset, processor_messages
from deeptalk.data.prepare import PREPARED_COLUMNS, encode_conversations, prepare_dataset
from deeptalk.data.training import load_training_data, parse_data_spec, rank_stream
from deeptalk.evaluation.benchmarks import answer_matches, benchmark_table, match_accuracy, write_benchmark_table
from deeptalk.recipes import build_demo_tokenizer
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config

STREAMS, CODEBOOK = 7, 256


@pytest.fixture(scope="module")
def schema_data(tmp_path_factory):
    return write_schema_datasets(str(tmp_path_factory.mktemp("schemas")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def processor():
    return DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), STREAMS, CODEBOOK)


def key(row):
    return json.dumps(row["input_ids"])


def plain(rows):
    """Rows with numpy arrays as lists (a stream's encoded rows hold the arrays the processor made)."""
    def convert(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return [{k: convert(v) for k, v in row.items()} for row in rows]


# ---------------------------------------------------------------------------------------------- one stream per rank
def test_rank_stream_gives_each_rank_its_own_part_round_and_round():
    rows = Dataset.from_dict({"x": list(range(5))})
    # 4 stream shards: 2 per rank (3 rows and 2 rows); 3 shards: each rank keeps every other row (3 and 2)
    for shards in (4, 3):
        stream = rank_stream(rows.to_iterable_dataset(num_shards=shards), world_size=2)
        assert isinstance(stream, IterableDataset) and stream.n_shards == 2  # accelerate gives shard r to rank r
        parts = [[r["x"] for r in itertools.islice(stream.shard(num_shards=2, index=rank), 12)] for rank in (0, 1)]
        assert len(parts[0]) == len(parts[1]) == 12  # uneven parts: both ranks go on as long as asked
        assert sorted(parts[0][:3] + parts[1][:2]) == list(range(5)), parts  # the first passes partition the rows
    single = [r["x"] for r in itertools.islice(rank_stream(rows.to_iterable_dataset(), world_size=1), 11)]
    assert single[:5] == list(range(5)) and sorted(single[5:10]) == list(range(5))  # the next pass, all rows again
    with pytest.raises(ValueError, match="Process 1 of 2 has no training rows"):
        list(itertools.islice(rank_stream(rows.select([0]).to_iterable_dataset(), world_size=2).shard(2, 1), 2))
    with pytest.raises(TypeError, match="IterableDataset"):
        rank_stream(rows, world_size=2)


def test_data_specs():
    assert parse_data_spec("speech.parquet:0.7") == ("speech.parquet", 0.7)
    assert parse_data_spec("owner/name") == ("owner/name", None)
    assert parse_data_spec("owner/name:2") == ("owner/name", 2.0)
    assert parse_data_spec("C:/data.jsonl") == ("C:/data.jsonl", None)  # not a number after the colon
    with pytest.raises(ValueError, match="finite number > 0"):
        parse_data_spec("a.parquet:0")
    with pytest.raises(ValueError, match="no source before the weight"):
        parse_data_spec(":3")


# ---------------------------------------------------------------------------------------------- sources -> rows
def test_raw_sources_encode_to_the_prepared_rows_streamed_or_not(schema_data, cache_dir, processor, tmp_path):
    codec = schema_data["voiceassistant"]["codec"]
    source = schema_data["voiceassistant"]["parquet"]
    conversations = load_conversation_dataset(source, data_format="voiceassistant", cache_dir=cache_dir)
    prepared = prepare_dataset(conversations, processor, output_dir=tmp_path / "va", shard_size=4, record_codec=codec,
                               data_format="voiceassistant")
    encoded = encode_conversations(conversations, processor)
    assert encoded.column_names == list(PREPARED_COLUMNS) and rows_of(encoded) == rows_of(prepared)
    again = encode_conversations(load_conversation_dataset(source, data_format="voiceassistant", cache_dir=cache_dir),
                                 processor)
    assert again.cache_files == encoded.cache_files  # a later run reuses the encoding
    for streaming in (False, True):
        raw = load_training_data([source], processor, data_format="voiceassistant", streaming=streaming,
                                 cache_dir=cache_dir)
        from_prepared = load_training_data([tmp_path / "va"], processor, streaming=streaming)
        assert isinstance(raw.dataset, IterableDataset if streaming else Dataset)
        assert plain(rows_of(raw.dataset)) == rows_of(prepared) == rows_of(from_prepared.dataset)
        assert raw.codec_dirs == [] and from_prepared.codec_dirs == [str(tmp_path / "va" / "codec")]
        assert (raw.num_rows, from_prepared.num_rows) == ((None, None) if streaming else (ROWS, ROWS))
    # max_length drops rows, in prepared folders too
    limit = sorted(prepared["length"])[4]
    short = load_training_data([tmp_path / "va"], processor, max_length=limit).dataset
    assert len(short) == sum(n <= limit for n in prepared["length"]) < ROWS
    assert rows_of(encode_conversations(conversations, processor, max_length=limit)) == rows_of(short)


def test_sources_mix_by_weight_or_concatenate(schema_data, cache_dir, processor, tmp_path):
    asr, qa = schema_data["asr"]["parquet"], schema_data["spoken_qa"]["disk"]
    both = load_training_data([asr, qa], processor, data_format=["asr", "spoken_qa"], split=["train", "train"],
                              cache_dir=cache_dir)
    alone = [load_training_data([s], processor, data_format=f, cache_dir=cache_dir).dataset
             for s, f in ((asr, "asr"), (qa, "spoken_qa"))]
    assert rows_of(both.dataset) == rows_of(alone[0]) + rows_of(alone[1]) and both.num_rows == 2 * ROWS
    mixed = load_training_data([(asr, 3.0), (qa, 1.0)], processor, data_format=["asr", "spoken_qa"],
                               cache_dir=cache_dir)
    kinds = [0 if key(r) in {key(x) for x in rows_of(alone[0])} else 1 for r in rows_of(mixed.dataset)]
    assert kinds.count(0) > 2 * kinds.count(1) and kinds.count(1) >= ROWS  # every source seen whole
    streamed = load_training_data([(asr, 3.0), (qa, 1.0)], processor, data_format=["asr", "spoken_qa"],
                                  streaming=True, cache_dir=cache_dir)
    assert isinstance(streamed.dataset, IterableDataset) and len(rows_of(streamed.dataset)) == len(kinds)
    with pytest.raises(ValueError, match="to every data source .* or to none"):
        load_training_data([(asr, 1.0), qa], processor, data_format=["asr", "spoken_qa"])
    with pytest.raises(ValueError, match="2 data_format values for 3 data sources"):
        load_training_data([asr, qa, asr], processor, data_format=["asr", "spoken_qa"])
    with pytest.raises(ValueError, match=r"columns \['wav'\] are read by none"):
        load_training_data([asr], processor, data_format="asr", columns={"wav": "audio"})
    # rows prepared for another processor do not mean what this model reads
    prepare_dataset(load_conversation_dataset(asr, data_format="asr", cache_dir=cache_dir), processor,
                    output_dir=tmp_path / "asr")
    other = DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), 2, 16)
    with pytest.raises(ValueError, match="prepared with another processor.*deeptalk prepare"):
        load_training_data([tmp_path / "asr"], other)


# ---------------------------------------------------------------------------------------------- processor, collator
def test_collator_pads_arrow_rows_in_any_format(schema_data, cache_dir, processor, tmp_path):
    conversations = load_conversation_dataset(schema_data["voiceassistant"]["parquet"], data_format="voiceassistant",
                                              cache_dir=cache_dir)
    prepared = prepare_dataset(conversations, processor, output_dir=tmp_path / "va", record_codec=schema_data[
        "voiceassistant"]["codec"])
    collate = DeepTalkDataCollator(processor)
    reference = collate([prepared[i] for i in range(3)])
    for kind in ("numpy", "torch"):
        rows = prepared.with_format(kind)
        batch = collate([rows[i] for i in range(3)])
        assert set(batch) == set(reference)
        for name in reference:
            assert torch.equal(batch[name], reference[name]), (kind, name)
    # Arrow conversation rows (every field of every part, unused ones None) encode as the cleaned ones do
    rows = rows_of(conversations)[:3]
    assert collate(rows)["input_ids"].tolist() == collate(
        [{"messages": processor_messages(r["messages"])} for r in rows])["input_ids"].tolist()
    row = rows[0]["messages"]
    assert row[1]["content"][0]["audio"] is None and row[1]["content"][1]["text"] is None  # what Arrow hands back
    with_arrays = [{**m, "content": [{**p, "audio_codes": np.asarray(p["audio_codes"])} if p["audio_codes"] else p
                                     for p in m["content"]]} for m in row]
    assert processor.encode_conversation(with_arrays)["input_ids"] == processor.encode_conversation(row)["input_ids"]


# ---------------------------------------------------------------------------------------------- trainers on streams
def test_trainers_take_a_stream_and_need_max_steps(schema_data, cache_dir, processor, tmp_path):
    from deeptalk.trainers import DeepTalkExpertsConfig, DeepTalkExpertsTrainer

    model = convert(tiny_text_moe("qwen3_moe", vocab_size=len(processor.tokenizer)), experts=(1, 5))
    model.add_speech(audio_config=tiny_whisper_config(), **processor.model_speech_kwargs())
    stream = load_training_data([schema_data["voiceassistant"]["parquet"]], processor, data_format="voiceassistant",
                                streaming=True, cache_dir=cache_dir).dataset
    common = {"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none", "save_strategy": "no",
              "per_device_train_batch_size": 4, "logging_steps": 1}
    with pytest.raises(ValueError, match="streamed training set has no length: set max_steps"):
        DeepTalkExpertsTrainer(model, DeepTalkExpertsConfig(**common), train_dataset=stream,
                               data_collator=DeepTalkDataCollator(processor))
    args = DeepTalkExpertsConfig(**common, max_steps=4)  # 16 rows from a 10-row stream: read round again
    trainer = DeepTalkExpertsTrainer(model, args, train_dataset=stream, data_collator=DeepTalkDataCollator(processor))
    assert args.accelerator_config.dispatch_batches is False  # each rank reads its own part
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 4 and len(losses) == 4 and all(np.isfinite(losses))


# ---------------------------------------------------------------------------------------------- benchmark scoring
def test_answers_match_after_whisper_normalisation():
    assert answer_matches("Twelve.", ["12"]) and answer_matches("The answer is twelve!", ["12", "a dozen"])
    assert answer_matches("It is in Paris, France.", ["London", "paris"])
    assert not answer_matches("It is in Paris, France.", ["paris"], match="exact")
    assert answer_matches("Paris", ["paris"], match="exact")
    assert not answer_matches("parish records", ["paris"])  # whole words only
    assert not answer_matches("", ["paris"]) and not answer_matches("anything", [""])
    assert match_accuracy(["seven", "no idea", "It's 7."], [["7"], ["yes"], ["seven"]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="match='fuzzy'"):
        answer_matches("a", ["a"], match="fuzzy")


def test_benchmark_table_gains_rows_per_model(tmp_path):
    def row(model, scores):
        results = {name: {"s2t": s2t, "s2s": s2s, "num_examples": 3, "asr": "own"}
                   for name, (s2t, s2s) in scores.items()}
        return {"model": model, "results": results,
                "average": {m: float(np.mean([r[m] for r in results.values()])) for m in ("s2t", "s2s")},
                "skipped": {}, "settings": {"match": "contains"}}

    path = tmp_path / "table.json"
    write_benchmark_table(row("base", {"webq": (0.5, 0.25), "llamaq": (1.0, 0.75)}), path)
    table = write_benchmark_table(row("tuned", {"webq": (0.75, 0.5), "llamaq": (1.0, 1.0)}), path)
    assert [r["model"] for r in table["rows"]] == ["base", "tuned"] and table["datasets"] == ["webq", "llamaq"]
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0] == "| Model | webq S2T | webq S2S | llamaq S2T | llamaq S2S | Avg S2T | Avg S2S |"
    assert lines[2] == "| base | 50.0 | 25.0 | 100.0 | 75.0 | 75.0 | 50.0 |"
    assert lines[3] == "| tuned | 75.0 | 50.0 | 100.0 | 100.0 | 87.5 | 75.0 |"
    again = write_benchmark_table(row("base", {"webq": (0.0, 0.0), "llamaq": (0.0, 0.0)}), path)
    assert [r["model"] for r in again["rows"]] == ["tuned", "base"]  # a model's row is replaced
    other = write_benchmark_table(row("base", {"triviaqa": (0.0, 0.0)}), path)  # other datasets: a new table
    assert [r["model"] for r in other["rows"]] == ["base"] and json.loads(path.read_text())["datasets"] == ["triviaqa"]
    with pytest.raises(ValueError, match="same datasets"):
        benchmark_table([row("a", {"x": (0, 0)}), row("b", {"y": (0, 0)})])
    assert sorted(os.listdir(tmp_path)) == ["table.json", "table.md"]
