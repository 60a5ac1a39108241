"""Loader for the tiny synthetic speech corpus shipped with ``deeptalk``.

The demo corpus (``deeptalk/data/demo_corpus/``) is a few hundred spoken
question/answer pairs, ASR pairs and ~1.2k text-only questions about a tiny
templated world (arithmetic up to twenty, colours of objects, where ten people
live, their pets and ages, animal sounds and legs).  All speech is synthesised
with ``espeak-ng`` by ``scripts/make_demo_corpus.py`` and stored as 16 kHz mono
FLAC, so it works fully offline.

**Use it for** CPU demos, unit/integration tests, the quickstart and checking
that a speech-in / speech-out pipeline is wired correctly (a tiny model can
actually learn the world).  **Do not use it as** a benchmark of real speech:
the voices are robotic formant synthesis and the vocabulary is ~125 words.

Only ``soundfile`` + ``numpy`` + ``datasets`` are needed to load it (no
espeak-ng, no torchcodec / ffmpeg: audio is decoded with soundfile rather than
``datasets.Audio``).

Example::

    from deeptalk.data import load_demo_corpus
    ds = load_demo_corpus("spoken_qa")
    ex = ds["train"][0]
    ex["question_text"], ex["answer_text"]                  # 'what is three plus four', 'seven'
    ex["question_audio"]["array"]                           # np.float32, mono
    ex["question_audio"]["sampling_rate"]                   # 16000
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

DEMO_SAMPLING_RATE = 16_000
SPLITS = ("train", "validation", "test")
TASKS = ("spoken_qa", "asr", "text_qa")
AUDIO_COLUMNS: Dict[str, tuple] = {
    "spoken_qa": ("question_audio", "answer_audio", "answer_sentence_audio"),
    "asr": ("audio",),
    "text_qa": (),
}

__all__ = [
    "DEMO_SAMPLING_RATE",
    "SPLITS",
    "TASKS",
    "AUDIO_COLUMNS",
    "demo_corpus_path",
    "demo_corpus_manifest",
    "list_demo_voices",
    "read_demo_records",
    "load_demo_audio",
    "load_demo_corpus",
]


def demo_corpus_path() -> Path:
    """Absolute path of the shipped ``demo_corpus`` folder.

    Can be overridden with the ``DEEPTALK_DEMO_CORPUS`` environment variable
    (e.g. to point at a corpus regenerated elsewhere with
    ``scripts/make_demo_corpus.py --out DIR``).
    """
    env = os.environ.get("DEEPTALK_DEMO_CORPUS")
    return Path(env).resolve() if env else (Path(__file__).resolve().parent / "demo_corpus")


def _root(root: Optional[Union[str, os.PathLike]]) -> Path:
    path = Path(root).resolve() if root is not None else demo_corpus_path()
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(
            f"demo corpus not found at {path}. It is shipped inside the package; if you are using a "
            "source checkout regenerate it with `python scripts/make_demo_corpus.py` (needs espeak-ng), "
            "or check that package data was installed."
        )
    return path


def demo_corpus_manifest(root: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Generator settings, tool versions and counts recorded in ``manifest.json``."""
    with open(_root(root) / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def list_demo_voices(root: Optional[Union[str, os.PathLike]] = None) -> Dict[str, object]:
    """``{"question_voices": [...], "assistant_voice": "..."}`` (espeak-ng voice names)."""
    s = demo_corpus_manifest(root)["settings"]
    return {"question_voices": list(s["question_voices"]), "assistant_voice": s["assistant_voice"]["voice"]}


def read_demo_records(task: str, split: str, root: Optional[Union[str, os.PathLike]] = None,
                      absolute_paths: bool = True) -> List[dict]:
    """Raw JSON Lines records of one task/split (audio paths made absolute by default)."""
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    base = _root(root)
    records = []
    with open(base / task / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if absolute_paths:
                    for col in AUDIO_COLUMNS[task]:
                        rec[col] = str(base / rec[col])
                records.append(rec)
    return records


@lru_cache(maxsize=4096)
def _read_audio_cached(path: str) -> np.ndarray:
    arr = _read_audio(path)
    arr.setflags(write=False)  # shared between examples: keep it immutable
    return arr


def _read_audio(path: str) -> np.ndarray:
    import soundfile as sf

    arr, sr = sf.read(path, dtype="float32", always_2d=True)
    if sr != DEMO_SAMPLING_RATE:
        raise ValueError(f"{path}: expected {DEMO_SAMPLING_RATE} Hz, got {sr}")
    return arr.mean(axis=1) if arr.shape[1] > 1 else arr[:, 0]


def load_demo_audio(path: Union[str, os.PathLike]) -> Dict[str, object]:
    """Decode one corpus file to ``{"path", "array" (float32, mono), "sampling_rate"}``."""
    path = str(path)
    return {"path": path, "array": _read_audio(path), "sampling_rate": DEMO_SAMPLING_RATE}


def _decode_transform(audio_columns: Sequence[str]):
    """``datasets`` transform turning path columns into decoded audio dicts on access."""

    def transform(batch: dict) -> dict:
        for col in audio_columns:
            if col in batch:  # tolerate remove_columns / column selection
                batch[col] = [
                    {"path": p, "array": _read_audio_cached(p).copy(), "sampling_rate": DEMO_SAMPLING_RATE}
                    for p in batch[col]
                ]
        return batch

    return transform


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def load_demo_corpus(
    task: str = "spoken_qa",
    decode_audio: bool = True,
    splits: Optional[Iterable[str]] = None,
    root: Optional[Union[str, os.PathLike]] = None,
):
    """Load the shipped synthetic demo corpus as a :class:`datasets.DatasetDict`.

    Args:
        task: ``"spoken_qa"`` (spoken question -> text answer + spoken answer in a
            single "assistant" voice), ``"asr"`` (utterance audio -> transcript ``text``)
            or ``"text_qa"`` (text-only questions about the same world; no audio).
        decode_audio: if ``True`` (default), audio columns (``question_audio`` /
            ``answer_audio`` for spoken_qa, ``audio`` for asr) are returned as
            ``{"path": str, "array": np.ndarray[float32, mono], "sampling_rate": 16000}``,
            decoded lazily with ``soundfile`` when an example is accessed (a
            ``datasets`` transform, so ``ds.map(...)`` also sees decoded audio).
            If ``False``, those columns hold absolute file paths (``str``).
            Note: ``ds.with_format(...)`` / ``ds.set_format(...)`` replace the decoding
            transform (you then get paths back); ``datasets.Audio`` is deliberately
            not used because it requires torchcodec + ffmpeg.
        splits: subset of ``("train", "validation", "test")``; default all three.
        root: corpus folder; default :func:`demo_corpus_path`.

    Returns:
        ``DatasetDict`` with the requested splits. Every split is non-empty.
        ``spoken_qa`` columns: id, task, category, template, question_text,
        answer_text, question_audio, answer_audio, voice, rate, pitch,
        answer_voice, question_duration_s, answer_duration_s.

    This corpus is for CPU demos, tests and the quickstart; it is **not** a
    benchmark of real speech (robotic espeak-ng voices, ~125-word vocabulary).
    """
    import datasets

    _check_task(task)
    splits = tuple(splits) if splits is not None else SPLITS
    out = {}
    for split in splits:
        records = read_demo_records(task, split, root=root, absolute_paths=True)
        ds = datasets.Dataset.from_list(records, split=datasets.NamedSplit(split))
        if decode_audio and AUDIO_COLUMNS[task]:
            ds.set_transform(_decode_transform(AUDIO_COLUMNS[task]))
        out[split] = ds
    return datasets.DatasetDict(out)
