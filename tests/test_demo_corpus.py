"""Checks for the shipped synthetic demo corpus (``deeptalk/data/demo_corpus``).

Fast (a few seconds), offline, and independent of espeak-ng: the corpus is
shipped data. Regenerate it with ``python scripts/make_demo_corpus.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from deeptalk.data import (
    AUDIO_COLUMNS,
    demo_corpus_manifest,
    demo_corpus_path,
    list_demo_voices,
    load_demo_audio,
    load_demo_corpus,
    read_demo_records,
)
from deeptalk.data import demo_world as W

SPLITS = ("train", "validation", "test")
TASKS = ("spoken_qa", "asr", "text_qa")
MAX_BYTES = 28 * 2**20  # the generator's --max-mb default, measured like `du` (4 KiB blocks)
WORD_RE = re.compile(r"^[a-z]+( [a-z]+)*$")


@pytest.fixture(scope="module")
def records():
    return {t: {s: read_demo_records(t, s) for s in SPLITS} for t in TASKS}


def test_folder_layout_and_size():
    root = demo_corpus_path()
    assert root.is_dir()
    for t in TASKS:
        for s in SPLITS:
            assert (root / t / f"{s}.jsonl").is_file()
    for f in ("README.md", "manifest.json", "world.json"):
        assert (root / f).is_file()
    files = [p for p in root.rglob("*") if p.is_file()]
    du_bytes = sum(-(-p.stat().st_size // 4096) * 4096 for p in files)
    assert du_bytes <= MAX_BYTES, f"demo corpus uses {du_bytes / 2**20:.2f} MiB > {MAX_BYTES / 2**20:g} MiB"


def test_splits_non_empty_and_match_manifest(records):
    counts = demo_corpus_manifest()["counts"]
    for t in TASKS:
        for s in SPLITS:
            assert len(records[t][s]) > 0, (t, s)
            assert len(records[t][s]) == counts[t][s], (t, s)
    # sizes promised in the docs
    assert 300 <= sum(len(records["spoken_qa"][s]) for s in SPLITS) <= 500
    assert sum(len(records["text_qa"][s]) for s in SPLITS) >= 1000
    assert len(records["text_qa"]["train"]) > len(records["spoken_qa"]["train"])


def test_record_schema(records):
    raw = read_demo_records("spoken_qa", "train", absolute_paths=False)[0]
    for key in ("id", "question_text", "answer_text", "question_audio", "answer_audio", "voice", "task"):
        assert key in raw
    assert not Path(raw["question_audio"]).is_absolute()  # stored relative to the corpus folder
    ids = [r["id"] for t in TASKS for s in SPLITS for r in records[t][s]]
    assert len(ids) == len(set(ids))
    for s in SPLITS:
        for r in records["spoken_qa"][s] + records["text_qa"][s]:
            assert WORD_RE.match(r["question_text"]) and WORD_RE.match(r["answer_text"]), r
            assert 1 <= len(r["answer_text"].split()) <= 3
        for r in records["asr"][s]:
            assert WORD_RE.match(r["text"]), r
        assert {r["task"] for r in records["spoken_qa"][s]} == {"spoken_qa"}


def test_voices(records):
    voices = list_demo_voices()
    spoken = [r for s in SPLITS for r in records["spoken_qa"][s]]
    assert {r["answer_voice"] for r in spoken} == {voices["assistant_voice"]}
    assert {r["voice"] for r in spoken} <= set(voices["question_voices"])
    assert len({r["voice"] for r in spoken}) >= 4
    assert voices["assistant_voice"] not in voices["question_voices"]


def test_audio_files_decode(records):
    paths = set()
    for s in SPLITS:
        for t in ("spoken_qa", "asr"):
            for r in records[t][s]:
                paths.update(r[c] for c in AUDIO_COLUMNS[t])
    root = demo_corpus_path()
    on_disk = {str(p) for p in (root / "audio").rglob("*.flac")}
    assert paths == on_disk  # every referenced file exists, no orphans
    for p in sorted(paths):
        info = sf.info(p)
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC", p
        a = load_demo_audio(p)
        x = a["array"]
        assert a["sampling_rate"] == 16000
        assert x.dtype == np.float32 and x.ndim == 1, p
        assert np.isfinite(x).all(), p
        assert 0.2 <= len(x) / 16000 <= 8.0, p
        assert np.sqrt(np.mean(x**2)) > 1e-3 and np.abs(x).max() <= 1.0, p


def test_loader_decoded_and_paths():
    ds = load_demo_corpus("spoken_qa")
    assert set(ds.keys()) == set(SPLITS)
    ex = ds["test"][0]
    for col in ("question_audio", "answer_audio"):
        a = ex[col]
        assert isinstance(a["array"], np.ndarray) and a["array"].dtype == np.float32
        assert a["sampling_rate"] == 16000 and Path(a["path"]).is_file()
    batch = ds["train"][:3]
    assert len(batch["question_audio"]) == 3 and batch["question_audio"][0]["array"].ndim == 1

    paths = load_demo_corpus("asr", decode_audio=False, splits=["validation"])
    assert list(paths.keys()) == ["validation"]
    p = paths["validation"][0]["audio"]
    assert isinstance(p, str) and Path(p).is_absolute() and Path(p).is_file()
    asr = load_demo_corpus("asr")["train"][0]
    assert asr["audio"]["array"].size > 0 and isinstance(asr["text"], str)

    tqa = load_demo_corpus("text_qa")
    assert {"question_text", "answer_text"} <= set(tqa["train"].column_names)
    with pytest.raises(ValueError):
        load_demo_corpus("tts")


def test_test_questions_not_in_train(records):
    for t, key in (("spoken_qa", "question_text"), ("text_qa", "question_text"), ("asr", "text")):
        train = {r[key] for r in records[t]["train"]}
        for s in ("validation", "test"):
            held = {r[key] for r in records[t][s]}
            assert not held & train, (t, s, sorted(held & train)[:5])
    # and across tasks: nothing held out is heard in speech training or seen in text training, except on
    # purpose: the text of every spoken question is in text_qa's train split (the LLM's knowledge)
    speech_train = {r["question_text"] for r in records["spoken_qa"]["train"]}
    speech_train |= {r["text"] for r in records["asr"]["train"]}
    text_train = {r["question_text"]: r for r in records["text_qa"]["train"]}
    for s in ("validation", "test"):
        spoken = {r["question_text"] for r in records["spoken_qa"][s]}
        text_held = {r["question_text"] for r in records["text_qa"][s]}
        assert not (spoken | text_held) & speech_train
        assert not text_held & set(text_train) and not text_held & spoken
        assert all(text_train[q]["spoken_split"] == s for q in spoken)
    for s in SPLITS:
        assert all(not r["in_spoken_qa"] and r["spoken_split"] is None for r in records["text_qa"][s] if s != "train")
        assert not {r["question_text"] for r in records["text_qa"]["test"]} & {
            r["question_text"] for r in records["text_qa"]["validation"]}


def test_answers_consistent_with_world(records):
    world = W.answer_lookup(demo_corpus_manifest()["settings"]["world_seed"])
    text_answers = {}
    for s in SPLITS:
        for r in records["text_qa"][s]:
            q, a = r["question_text"], r["answer_text"]
            assert world[q] == a, r
            assert W.solve(q) == a, r  # independent rule-based check
            text_answers[q] = a
    assert set(text_answers) == set(world)  # text_qa covers the whole world
    spoken_answers = set()
    for s in SPLITS:
        text_q = {r["question_text"]: r for r in records["text_qa"]["train"]}
        asr_by_audio = {r["audio"]: r["text"] for r in records["asr"][s]}
        for r in records["spoken_qa"][s]:
            q, a = r["question_text"], r["answer_text"]
            assert text_answers[q] == a and W.solve(q) == a, r
            assert q in text_q and text_q[q]["in_spoken_qa"] and text_q[q]["spoken_split"] == s, r  # the LLM knows it
            assert asr_by_audio[r["question_audio"]] == q  # question audio reused for ASR
            assert Path(r["answer_audio"]).stem.replace("_", " ") == a
            sentence = r["answer_sentence"]
            assert a in sentence.replace(",", "").split(), r  # the sentence says the answer word
            assert Path(r["answer_sentence_audio"]).stem.replace("_", " ") == sentence.replace(",", "")
            if r["category"] == "yes_no":
                assert sentence.startswith(a + ", "), r
            spoken_answers.add(a)
    assert spoken_answers <= set(text_answers.values())
    with open(demo_corpus_path() / "world.json", encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(W.world_tables()))


def test_categories_present(records):
    for s in SPLITS:
        cats = {r["category"] for r in records["spoken_qa"][s]}
        assert cats == {"arithmetic", "fact", "yes_no"}, (s, cats)
        yn = [r["answer_text"] for r in records["spoken_qa"][s] if r["category"] == "yes_no"]
        assert "yes" in yn and "no" in yn
