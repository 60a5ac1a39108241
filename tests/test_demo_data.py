"""deeptalk.recipes.demo_data: tokenizer, codec, processor and every phase's encoded datasets from the
shipped corpus (real corpus, real codec, real processor; a tiny real model for the forward check)."""

import time

import numpy as np
import pytest
import torch
from conftest import convert

from deeptalk import DeepTalkDataCollator
from deeptalk.data import read_demo_records
from deeptalk.data.demo_corpus import _read_audio
from deeptalk.recipes import (
    ANSWER_AUDIO_COLUMNS,
    ASR_INSTRUCTION,
    DEMO_TASKS,
    build_demo_data,
    build_demo_processor,
    build_demo_tokenizer,
    demo_answer_audio_paths,
    demo_corpus_texts,
    fit_demo_codec,
    single_thread,
)
from deeptalk.tiny import tiny_whisper_config

COUNTS = {"text_qa": (1001, 83, 83), "asr": (336, 42, 42), "spoken_qa": (288, 36, 36)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a small shared CPU: a second intra-op thread only adds OpenMP stalls (5-20x slower)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def built():
    start = time.perf_counter()
    tokenizer = build_demo_tokenizer()
    codec = fit_demo_codec()
    processor = build_demo_processor(tokenizer, codec)
    data = build_demo_data(processor, codec)
    return data, time.perf_counter() - start


@pytest.fixture(scope="module")
def data(built):
    return built[0]


def answer_segment(processor, row):
    """The assistant answer of an encoded row: the columns after the last <|assistant|>."""
    ids = np.array(row["input_ids"])
    assistant = processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    last = np.nonzero(ids[0] == assistant)[0][-1]
    return ids, np.array(row["labels"]), last + 1


def text_labels(processor, row):
    return processor.tokenizer.decode([t for t in row["labels"][0] if t != -100])


def test_everything_builds_fast_and_complete(built):
    data, seconds = built
    assert seconds < 30, f"building the demo data took {seconds:.1f} s"
    expected = {"text_qa": COUNTS["text_qa"], "asr": COUNTS["asr"],
                "spoken_qa_speech": COUNTS["spoken_qa"], "spoken_qa_text": COUNTS["spoken_qa"]}
    assert {name: tuple(s.values()) for name, s in data.sizes().items()} == expected
    assert set(data.timings) >= {*DEMO_TASKS, "answer_codes", "total"}
    assert {task: len(r) for task, r in data.test_records.items()} == {t: c[2] for t, c in COUNTS.items()}
    for name in DEMO_TASKS:
        assert data.dataset(name)["train"].column_names == [
            "id", "task", "target_text", "input_ids", "labels", "audio_input_mask", "input_features",
            "audio_feature_lengths", "audio_transcript_ids"]
    asr = data.dataset("asr")["train"][0]
    assert asr["audio_transcript_ids"] == [data.processor.tokenizer(asr["target_text"], add_special_tokens=False)[
        "input_ids"]]
    assert data.dataset("text_qa")["train"][0]["audio_transcript_ids"] == []


def test_tokenizer_covers_the_corpus():
    tokenizer = build_demo_tokenizer()
    assert len(tokenizer) == 400
    for text in demo_corpus_texts()[:2000:7]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert tokenizer.tokenize("seven") == ["seven"] and tokenizer.tokenize("yes") == ["yes"]
    assert ASR_INSTRUCTION in demo_corpus_texts()


def test_codec_is_seeded_and_keeps_answers_short(data):
    codec = data.codec
    assert (codec.num_streams, codec.codebook_size, codec.frame_rate) == (4, 128, 25)
    assert codec.num_frames_for(16000) <= 25  # 1 s of speech -> at most 25 LLM steps
    again = fit_demo_codec()
    assert torch.equal(again.codebooks, codec.codebooks)
    paths = demo_answer_audio_paths(("train", "validation", "test"))
    assert sorted(data.answer_codes) == paths and len(paths) == 68
    for path in paths[:5]:
        wave = _read_audio(path)
        codes = data.answer_codes[path]
        assert codes.shape == (4, -(-len(wave) // codec.samples_per_frame)) and codes.shape[1] <= 25
        assert torch.equal(codes, codec.encode(torch.from_numpy(wave.copy()), 16000))


def test_the_codec_is_fitted_on_the_train_splits_sentence_answers_too():
    words = demo_answer_audio_paths(("train",))
    both = demo_answer_audio_paths(("train",), ANSWER_AUDIO_COLUMNS)
    assert set(words) < set(both) and len(both) - len(words) > 200  # every train sentence answer
    with pytest.raises(ValueError, match=r"columns=\['question_audio'\] are not answer-audio columns"):
        demo_answer_audio_paths(("train",), ("question_audio",))


def test_processor_matches_the_codec(data):
    processor, codec = data.processor, data.codec
    layout = processor.model_speech_kwargs()["layout"]
    assert (layout.num_audio_streams, layout.codebook_size) == (codec.num_streams, codec.codebook_size)
    assert processor.audio_adapter_stride == 4 and layout.text_vocab_size == len(processor.tokenizer)


def test_text_qa_rows(data):
    processor = data.processor
    row = data.text_qa["test"][0]
    record = data.records["text_qa"]["test"][0]
    assert row["id"] == record["id"] and row["target_text"] == record["answer_text"]
    assert len(row["input_ids"]) == 5 and row["input_features"] == [] and not any(row["audio_input_mask"])
    rendered = processor.tokenizer.decode(row["input_ids"][0])
    assert rendered == f"<|user|>{record['question_text']}<|eot|><|assistant|>{record['answer_text']}<|eot|>"
    assert text_labels(processor, row) == record["answer_text"] + "<|eot|>"
    assert all(t == -100 for stream in row["labels"][1:] for t in stream)


def test_asr_rows_carry_the_instruction_and_the_transcript(data):
    processor = data.processor
    row, record = data.asr["train"][3], data.records["asr"]["train"][3]
    assert row["target_text"] == record["text"] and len(row["input_features"]) == 1
    assert sum(row["audio_input_mask"]) == processor.num_audio_positions(row["audio_feature_lengths"][0])
    assert np.array(row["input_features"][0]).shape == (80, row["audio_feature_lengths"][0])
    text = processor.tokenizer.decode([t for t, m in zip(row["input_ids"][0], row["audio_input_mask"]) if not m])
    # BOA / EOA columns: PAD_T in the text stream
    assert text.startswith(f"<|user|>{ASR_INSTRUCTION}<|pad_t|><|pad_t|>")
    assert text_labels(processor, row) == record["text"] + "<|eot|>"


def test_spoken_qa_speech_rows_hold_the_cached_answer_codes(data):
    processor, layout = data.processor, data.processor.layout
    for i in (0, 7):
        row, record = data.spoken_qa_speech["train"][i], data.records["spoken_qa"]["train"][i]
        ids, labels, start = answer_segment(processor, row)
        text_ids, codes = layout.undelay_layout(torch.tensor(ids[:, start:]))
        assert processor.tokenizer.decode(text_ids.tolist()) == record["answer_text"]
        assert torch.equal(codes, data.answer_codes[record["answer_audio"]])
        frames = codes.shape[1]
        assert all((labels[s] != -100).sum() == frames + 1 for s in range(1, layout.num_streams))
        assert text_labels(processor, row) == record["answer_text"] + "<|eot|>"
        assert (labels[:, :start] == -100).all()


def test_spoken_qa_text_rows_share_the_prompt_and_learn_text_only(data):
    processor = data.processor
    speech, text = data.spoken_qa_speech["test"][2], data.spoken_qa_text["test"][2]
    _, _, start = answer_segment(processor, speech)
    assert np.array_equal(np.array(speech["input_ids"])[:, :start], np.array(text["input_ids"])[:, :start])
    assert speech["input_features"] == text["input_features"]
    assert text_labels(processor, text) == text["target_text"] + "<|eot|>"
    assert all(t == -100 for stream in text["labels"][1:] for t in stream)


def test_phase_datasets_collate_and_train_a_tiny_model(data, tiny_source):
    assert data.phase_dataset("1") is data.asr["train"] and data.phase_dataset("2a") is data.spoken_qa_speech["train"]
    joint = data.phase_dataset("3")
    assert joint["id"] == data.phase_dataset("joint")["id"] and data.phase_dataset("align") is data.asr["train"]
    assert joint["id"] == data.tasks_dataset(("spoken_qa_speech", "text_qa"))["id"]
    with pytest.raises(ValueError, match="Unknown demo tasks"):
        data.tasks_dataset(("spoken_qa", "asr"))
    assert len(joint) == len(data.spoken_qa_speech["train"]) + len(data.text_qa["train"])
    assert set(joint.select(range(32))["task"]) == {"spoken_qa_speech", "text_qa"}  # shuffled together
    with pytest.raises(ValueError, match="Unknown phase"):
        data.phase_dataset("4")

    processor = data.processor
    whisper = tiny_whisper_config()
    model = convert(tiny_source("qwen3_moe", vocab_size=len(processor.tokenizer)))
    model.add_speech(audio_config=whisper, **processor.model_speech_kwargs())
    rows = [joint[i] for i in range(64)]
    rows = [r for r in rows if r["task"] == "text_qa"][:2] + [r for r in rows if r["task"] == "spoken_qa_speech"][:2]
    batch = DeepTalkDataCollator(processor)(rows + [data.asr["train"][0]])
    assert batch["input_ids"].shape[:2] == (5, 1 + data.codec.num_streams)
    out = model(**batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.stream_losses).all()


def test_limits_splits_tasks_and_errors(data):
    processor, codec = data.processor, data.codec
    small = build_demo_data(processor, codec, splits=("test",), tasks=("text_qa", "spoken_qa_text"), limit=5)
    assert small.sizes()["text_qa"] == {"test": 5} and small.sizes()["spoken_qa_text"] == {"test": 5}
    assert small.sizes()["asr"] == {} and small.answer_codes == {}
    assert small.test_records["spoken_qa"] == read_demo_records("spoken_qa", "test")[:5]
    with pytest.raises(ValueError, match="Unknown demo tasks"):
        build_demo_data(processor, codec, tasks=("speech",))
    other = fit_demo_codec(codebook_size=32, iters=2)
    with pytest.raises(ValueError, match="does not match the codec"):
        build_demo_data(processor, other)
