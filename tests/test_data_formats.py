"""Any dataset in, by schema: public speech schemas built from the shipped corpus, read as conversations.

The builders here (`write_schema_datasets`, `mini_omni_answer_snac`, ...) are shared with test_prepare.py.
"""

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import Audio, Dataset, DatasetDict, Features, IterableDataset, List, Value

from deeptalk.data.demo_corpus import read_demo_records
from deeptalk.data.formats import (
    DATA_FORMATS,
    audio_reference,
    format_answer_snac,
    load_conversation_dataset,
    mix_datasets,
    parse_answer_snac,
    processor_messages,
    required_columns,
)
from deeptalk.processing.codecs import SNACCodec

# SNAC laid out like hubertsiuzdak/snac_24khz (7 streams in 3 levels), tiny and random: a schema test only
TINY_SNAC_24K = {
    "sampling_rate": 24000, "encoder_dim": 8, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 64,
    "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 256, "codebook_dim": 4,
    "vq_strides": [4, 2, 1],
}
ROWS = 10

# The public schemas, column for column
VOICEASSISTANT_FEATURES = Features({
    "split_name": Value("string"), "index": Value("int64"), "round": Value("int64"), "question": Value("string"),
    "question_audio": Audio(), "answer": Value("string"), "answer_snac": Value("string"),
})
LIBRISPEECH_FEATURES = Features({
    "file": Value("string"), "audio": Audio(sampling_rate=16000), "text": Value("string"),
    "speaker_id": Value("int64"), "chapter_id": Value("int64"), "id": Value("string"),
})
SPOKEN_QA_FEATURES = Features({"question": Value("string"), "answers": List(Value("string")),
                               "audio": Audio(sampling_rate=16000)})


def tiny_snac():
    torch.manual_seed(0)
    return SNACCodec.from_config(**TINY_SNAC_24K)


def mini_omni_answer_snac(levels) -> str:
    """VoiceAssistant-400K's answer_snac text from SNAC's three code levels, written the way Mini-Omni
    reads it back (utils/snac_utils.py `reconstruct_tensors`): per frame '#', then l0[f], l1[2f], l2[4f],
    l2[4f+1], l1[2f+1], l2[4f+2], l2[4f+3]. Independent of deeptalk's snac_flatten on purpose."""
    l0, l1, l2 = (level.reshape(-1).tolist() for level in levels)
    tokens = []
    for f in range(len(l0)):
        tokens += ["#", l0[f], l1[2 * f], l2[4 * f], l2[4 * f + 1], l1[2 * f + 1], l2[4 * f + 2], l2[4 * f + 3]]
    return " ".join(str(t) for t in tokens)


def snac_answer(codec, path):
    """(answer_snac text, codes [7, frames] through deeptalk's codec) of one answer file."""
    wave, rate = sf.read(path, dtype="float32")
    with torch.no_grad():
        levels = codec.model.encode(codec.prepare_waveform(wave, rate).view(1, 1, -1))
    codes = codec.encode(wave, rate)
    levels = [level[..., : codes.shape[1] * (4 // s)] for level, s in zip(levels, [4, 2, 1])]
    return mini_omni_answer_snac(levels), codes


def audio_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def write_schema_datasets(root, rows: int = ROWS):
    """Small datasets in each public schema, from the shipped corpus, as parquet and save_to_disk folders.
    Returns {format: {"parquet": path, "disk": path, "records": [...], ...}}."""
    os.makedirs(root, exist_ok=True)
    spoken = read_demo_records("spoken_qa", "train")[:rows]
    asr = read_demo_records("asr", "train")[:rows]
    codec = tiny_snac()
    answers = [snac_answer(codec, r["answer_audio"]) for r in spoken]
    tables = {
        "voiceassistant": Dataset.from_dict({
            "split_name": ["demo"] * rows, "index": list(range(rows)), "round": [0] * rows,
            "question": [r["question_text"] for r in spoken],
            "question_audio": [
                {"bytes": audio_bytes(r["question_audio"]), "path": os.path.basename(r["question_audio"])}
                for r in spoken
            ],
            "answer": [r["answer_text"] for r in spoken],
            "answer_snac": [text for text, _ in answers],
        }, features=VOICEASSISTANT_FEATURES),
        "asr": Dataset.from_dict({
            "file": [os.path.basename(r["audio"]) for r in asr],
            "audio": [{"bytes": audio_bytes(r["audio"]), "path": os.path.basename(r["audio"])} for r in asr],
            "text": [r["text"] for r in asr], "speaker_id": [i % 3 for i in range(rows)],
            "chapter_id": [7] * rows, "id": [r["id"] for r in asr],
        }, features=LIBRISPEECH_FEATURES),
        "spoken_qa": Dataset.from_dict({
            "question": [r["question_text"] for r in spoken],
            "answers": [[r["answer_text"], r["answer_text"].upper()] for r in spoken],
            "audio": [{"bytes": audio_bytes(r["question_audio"]), "path": os.path.basename(r["question_audio"])}
                      for r in spoken],
        }, features=SPOKEN_QA_FEATURES),
        "messages": Dataset.from_dict({"messages": [
            [{"role": "user", "content": r["question_text"]}, {"role": "assistant", "content": r["answer_text"]}]
            for r in spoken]}),
    }
    out = {}
    for name, table in tables.items():
        parquet = os.path.join(root, f"{name}.parquet")
        table.to_parquet(parquet)
        disk = os.path.join(root, f"{name}_disk")
        table.save_to_disk(disk)
        out[name] = {"parquet": parquet, "disk": disk}
    out["voiceassistant"].update(records=spoken, codes=[codes for _, codes in answers], codec=codec)
    out["spoken_qa"]["records"] = spoken
    out["asr"]["records"] = asr
    out["messages"]["records"] = spoken
    # today's JSON Lines: audio paths relative to the file, a speech answer as audio for a codec to encode
    jsonl_dir = os.path.join(root, "jsonl")
    os.makedirs(os.path.join(jsonl_dir, "audio"), exist_ok=True)
    lines = []
    for r in spoken:
        for key in ("question_audio", "answer_audio"):
            target = os.path.join(jsonl_dir, "audio", os.path.basename(r[key]))
            if not os.path.exists(target):
                os.symlink(r[key], target)
        lines.append({"messages": [
            {"role": "user", "content": [{"type": "audio", "audio": "audio/" + os.path.basename(r["question_audio"])}]},
            {"role": "assistant", "content": [{"type": "text", "text": r["answer_text"]},
                                              {"type": "audio",
                                               "audio": "audio/" + os.path.basename(r["answer_audio"])}]},
        ]})
    lines.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus two"},
                               {"role": "assistant", "content": "four"}]})
    out["jsonl"] = os.path.join(jsonl_dir, "conversations.jsonl")
    with open(out["jsonl"], "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n")
    return out


def rows_of(dataset):
    return list(dataset) if isinstance(dataset, IterableDataset) else [dataset[i] for i in range(len(dataset))]


def decoded(audio_ref):
    return sf.read(io.BytesIO(audio_ref["bytes"]) if audio_ref.get("bytes") else audio_ref["path"], dtype="float32")[0]


@pytest.fixture(scope="module")
def schema_data(tmp_path_factory):
    return write_schema_datasets(str(tmp_path_factory.mktemp("schemas")))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


# ---------------------------------------------------------------------------------------------- answer_snac
def test_answer_snac_parses_into_snac_flatten_order_with_no_reencoding(schema_data, cache_dir):
    data = schema_data["voiceassistant"]
    texts = Dataset.from_parquet(data["parquet"], cache_dir=cache_dir)["answer_snac"]
    for record_codes, text in zip(data["codes"], texts):
        codes = parse_answer_snac(text, codebook_size=256)
        assert codes.shape == (7, record_codes.shape[1]) and codes.dtype == np.int32
        assert np.array_equal(codes, record_codes.numpy())  # Mini-Omni's order == depth-first snac_flatten
        assert parse_answer_snac(format_answer_snac(codes)).tolist() == codes.tolist()
    # decoding parsed codes through the codec gives the codec's own decode of its codes
    codec = data["codec"]
    assert torch.equal(codec.decode(torch.from_numpy(codes).long()), codec.decode(record_codes))


@pytest.mark.parametrize("text, words", [
    ("1 2 3 4 5 6 7", "start with '#'"),
    ("# 1 2 3 4 5 6", "has 6 codes"),
    ("# 1 2 3 4 5 6 7 # 1 2 3 4 5 6 7 8", "frame 1 has 8 codes"),
    ("# 1 2 3 4 5 6 x", "not an integer"),
    ("# 1 2 3 4 5 6 4096", "[0, 4096)"),
    ("", "no frames"),
    ("#", "no frames"),
])
def test_bad_answer_snac_is_refused(text, words):
    with pytest.raises(ValueError) as err:
        parse_answer_snac(text)
    assert words in str(err.value)


def test_a_bad_row_is_named(schema_data, cache_dir):
    table = Dataset.from_parquet(schema_data["voiceassistant"]["parquet"], cache_dir=cache_dir)
    table = table.map(lambda row, i: {"answer_snac": "# 1 2 3" if i == 3 else row["answer_snac"]}, with_indices=True)
    for streaming in (False, True):
        with pytest.raises(ValueError, match="voiceassistant row 3: answer_snac frame 0 has 3 codes"):
            rows_of(load_conversation_dataset(table, data_format="voiceassistant", streaming=streaming))


def test_answer_snac_trailing_separator_and_spacing_are_accepted():
    assert parse_answer_snac("#1 2 3 4 5 6 7#  8 9 10 11 12 13 14 #").tolist() == \
        [[1, 8], [2, 9], [3, 10], [4, 11], [5, 12], [6, 13], [7, 14]]


# ---------------------------------------------------------------------------------------------- formats
def check_conversations(data_format, rows, data):
    assert len(rows) == ROWS
    for row, record in zip(rows, data["records"]):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        if data_format == "asr":
            (instruction, audio), (answer,) = user["content"], assistant["content"]
            assert instruction["text"] == "transcribe" and answer["text"] == record["text"]
            assert audio["transcript"] == record["text"]  # the CTC adapter's target
            assert np.array_equal(decoded(audio["audio"]), sf.read(record["audio"], dtype="float32")[0])
        elif data_format in ("voiceassistant", "spoken_qa"):
            (audio,) = user["content"]
            assert audio["type"] == "audio" and assistant["content"][0]["text"] == record["answer_text"]
            assert audio["transcript"] == record["question_text"]
            assert np.array_equal(decoded(audio["audio"]), sf.read(record["question_audio"], dtype="float32")[0])
        else:
            assert user["content"][0]["text"] == record["question_text"]
            assert assistant["content"][0]["text"] == record["answer_text"]
    if data_format == "voiceassistant":
        for row, codes in zip(rows, data["codes"]):
            assert row["messages"][1]["content"][1]["audio_codes"] == codes.tolist()
    if data_format == "spoken_qa":
        assert rows[0]["answers"] == [data["records"][0]["answer_text"], data["records"][0]["answer_text"].upper()]


@pytest.mark.parametrize("data_format", ["voiceassistant", "asr", "spoken_qa", "messages"])
@pytest.mark.parametrize("storage", ["parquet", "disk"])
@pytest.mark.parametrize("streaming", [False, True])
def test_each_format_from_parquet_and_save_to_disk_streamed_or_not(schema_data, cache_dir, data_format, storage,
                                                                   streaming):
    data = schema_data[data_format]
    dataset = load_conversation_dataset(data[storage], data_format=data_format, streaming=streaming,
                                        cache_dir=cache_dir)
    assert isinstance(dataset, IterableDataset if streaming else Dataset)
    check_conversations(data_format, rows_of(dataset), data)


def test_todays_json_lines_with_relative_audio_paths(schema_data, cache_dir):
    for streaming in (False, True):
        rows = rows_of(load_conversation_dataset(schema_data["jsonl"], streaming=streaming, cache_dir=cache_dir))
        assert len(rows) == ROWS + 1
        question = rows[0]["messages"][0]["content"][0]["audio"]["path"]
        assert os.path.isabs(question) and os.path.exists(question)
        record = schema_data["messages"]["records"][0]
        assert np.array_equal(decoded({"path": question}), sf.read(record["question_audio"], dtype="float32")[0])
        # what the processor sees: no None fields, a text-only turn as a string
        system, _user, assistant = processor_messages(rows[-1]["messages"])
        assert system == {"role": "system", "content": "be brief"} and assistant["content"] == "four"
        speech = processor_messages(rows[0]["messages"])[1]["content"]
        assert speech[0] == {"type": "text", "text": record["answer_text"]}
        assert speech[1]["type"] == "audio" and set(speech[1]["audio"]) == {"path"}


def test_glob_and_folder_of_parquet_files(schema_data, cache_dir, tmp_path):
    table = Dataset.from_parquet(schema_data["asr"]["parquet"], cache_dir=cache_dir)
    for i in range(2):
        table.select(range(i * 5, i * 5 + 5)).to_parquet(str(tmp_path / f"part-{i}.parquet"))
    for source in (str(tmp_path / "part-*.parquet"), str(tmp_path)):
        rows = rows_of(load_conversation_dataset(source, data_format="asr", cache_dir=cache_dir))
        assert [r["messages"][1]["content"][0]["text"] for r in rows] == table["text"]


def test_columns_option_maps_other_names(schema_data, cache_dir, tmp_path):
    table = Dataset.from_parquet(schema_data["asr"]["parquet"], cache_dir=cache_dir)
    table = table.rename_columns({"audio": "wav", "text": "sentence"})
    table.to_parquet(str(tmp_path / "renamed.parquet"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['audio', 'text'\].*columns="):
        load_conversation_dataset(str(tmp_path / "renamed.parquet"), data_format="asr", cache_dir=cache_dir)
    rows = rows_of(load_conversation_dataset(str(tmp_path / "renamed.parquet"), data_format="asr",
                                             columns={"audio": "wav", "text": "sentence"}, cache_dir=cache_dir))
    check_conversations("asr", rows, schema_data["asr"])


def test_text_questions_and_text_answers_options(schema_data, cache_dir):
    data = schema_data["voiceassistant"]
    rows = rows_of(load_conversation_dataset(data["parquet"], data_format="voiceassistant", question_modality="text",
                                             answer_modality="text", cache_dir=cache_dir))
    record = data["records"][0]
    assert processor_messages(rows[0]["messages"]) == [{"role": "user", "content": record["question_text"]},
                                                       {"role": "assistant", "content": record["answer_text"]}]
    assert required_columns("voiceassistant", "text", "text") == ["question", "answer"]
    assert required_columns("spoken_qa") == ["answers", "audio"]


def test_bad_options_are_refused_before_reading(schema_data):
    with pytest.raises(ValueError, match="data_format='librispeech' is not one of"):
        load_conversation_dataset(schema_data["asr"]["parquet"], data_format="librispeech")
    with pytest.raises(ValueError, match="answer_modality='speech' needs spoken answers"):
        load_conversation_dataset(schema_data["asr"]["parquet"], data_format="asr", answer_modality="speech")
    with pytest.raises(ValueError, match="does not read"):
        load_conversation_dataset(schema_data["asr"]["parquet"], data_format="asr", columns={"question": "q"})
    with pytest.raises(FileNotFoundError, match="No dataset at"):
        load_conversation_dataset("/nonexistent/data.parquet", data_format="asr")
    with pytest.raises(ValueError, match="has no split 'test'"):
        chat = Dataset.from_dict({"messages": [[{"role": "user", "content": "x"}]]})
        load_conversation_dataset(DatasetDict({"train": chat}), split="test")
    assert set(DATA_FORMATS) == {"messages", "asr", "voiceassistant", "spoken_qa"}


def test_decoding_audio_feature_and_torchcodec(schema_data, cache_dir):
    """A dataset whose Audio column decodes (datasets' default) is read without decoding; when torchcodec
    and Debian's ffmpeg libraries are installed, its decoded values work too."""
    table = Dataset.from_parquet(schema_data["spoken_qa"]["parquet"], cache_dir=cache_dir)
    assert table.features["audio"].decode
    check_conversations("spoken_qa", rows_of(load_conversation_dataset(table, data_format="spoken_qa")),
                        schema_data["spoken_qa"])
    try:
        decoder = table[0]["audio"]
        samples = decoder.get_all_samples()
    except (ImportError, RuntimeError, OSError) as err:
        pytest.skip(f"datasets.Audio decoding needs torchcodec + ffmpeg libraries: {err}")
    reference = sf.read(schema_data["spoken_qa"]["records"][0]["question_audio"], dtype="float32")[0]
    assert samples.sample_rate == 16000 and np.allclose(samples.data.numpy()[0], reference, atol=1e-4)
    assert np.allclose(decoded(audio_reference(decoder)), reference, atol=1e-4)


def test_audio_reference_forms(tmp_path):
    wave = (0.1 * np.sin(np.arange(1600) / 5)).astype(np.float32)
    sf.write(str(tmp_path / "a.wav"), wave, 16000)
    assert audio_reference("a.wav", tmp_path) == {"path": str(tmp_path / "a.wav"), "bytes": None}
    assert audio_reference({"path": "a.wav", "bytes": b"xyz"}) == {"path": "a.wav", "bytes": b"xyz"}
    as_bytes = audio_reference({"array": wave, "sampling_rate": 16000})
    assert np.array_equal(decoded(as_bytes), wave)
    with pytest.raises(ValueError, match="no 'sampling_rate'"):
        audio_reference({"array": wave})
    with pytest.raises(ValueError, match="missing"):
        audio_reference(None)


# ---------------------------------------------------------------------------------------------- mixing
def test_mix_datasets_by_weight_streamed_or_not(schema_data, cache_dir):
    asr = load_conversation_dataset(schema_data["asr"]["parquet"], data_format="asr", cache_dir=cache_dir)
    qa = load_conversation_dataset(schema_data["spoken_qa"]["parquet"], data_format="spoken_qa", cache_dir=cache_dir)
    mixed = mix_datasets([(asr, 3.0), (qa, 1.0)], seed=0)
    assert mixed.column_names == ["messages"]  # spoken_qa's 'answers' is not shared
    kinds = ["asr" if len(r["messages"][0]["content"]) == 2 else "qa" for r in rows_of(mixed)]
    assert kinds.count("asr") > 2 * kinds.count("qa") and kinds.count("qa") >= ROWS  # all_exhausted: all of qa seen
    streamed = mix_datasets([(asr.to_iterable_dataset(), 3.0), (qa.to_iterable_dataset(), 1.0)], seed=0)
    assert isinstance(streamed, IterableDataset)
    assert len(rows_of(streamed)) > ROWS
    with pytest.raises(ValueError, match="both streamed and in-memory"):
        mix_datasets([(asr, 1), (qa.to_iterable_dataset(), 1)])
    with pytest.raises(ValueError, match="finite number > 0"):
        mix_datasets([(asr, 0), (qa, 1)])
