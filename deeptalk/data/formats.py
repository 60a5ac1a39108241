"""Any dataset in, by schema: public speech / chat datasets -> conversations in the processor's chat format.

:func:`load_conversation_dataset` reads a dataset from

* a JSON Lines file of conversations (``{"messages": [...]}`` per line; audio paths relative to the file),
* a folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and ``split``),
* parquet / arrow / json / jsonl / csv files, a glob of them, or a folder of them,
* a Hub dataset id (``datasets.load_dataset(id, split=..., streaming=...)``),

and maps its schema (``data_format``) onto conversations, one ``{"messages": [...]}`` per row, in the
format of :class:`~deeptalk.processing.processing_deeptalk.DeepTalkProcessor`:

================== ============================================================ ===================================
``data_format``    source columns (rename with ``columns={"audio": "wav"}``)    conversation
================== ============================================================ ===================================
``messages``       ``messages`` (text chat, or our chat format)                 as given
``asr``            ``audio`` (Audio), ``text`` (LibriSpeech style)               user: instruction + audio;
                                                                                assistant: transcript
``voiceassistant`` ``question``, ``question_audio`` (Audio), ``answer``,          user: question audio; assistant:
                   ``answer_snac`` (+ ``split_name``, ``index``, ``round``;      answer text + SNAC codes
                   VoiceAssistant-400K / Mini-Omni)
``spoken_qa``      ``question``, ``answers`` (list), ``audio`` (Audio, 16 kHz;   user: question audio; assistant:
                   spoken Web Questions style)                                  ``answers[0]``; ``answers`` kept
================== ============================================================ ===================================

Every output row has the same Arrow schema (:data:`CONVERSATION_FEATURES`): ``content`` is always a list
of parts ``{"type", "text", "audio": {"path", "bytes"}, "audio_codes", "voice", "transcript"}`` (a text-only turn
renders exactly as a string ``content``), so datasets of any format can be mixed
(:func:`mix_datasets`). Parts carry ``None`` in unused fields; :func:`processor_messages` drops them
before the processor sees a conversation.

Audio is never decoded here. Audio columns are read as ``datasets.Audio(decode=False)``
(``{"path", "bytes"}``) and decoded later by :func:`deeptalk.processing.audio.load_audio` (soundfile),
so torchcodec is not needed; decoded values (``{"array", "sampling_rate"}`` dicts, torchcodec decoders
from ``datasets.Audio()``) are stored as WAV bytes.

``answer_snac`` (VoiceAssistant-400K) is the answer's SNAC 24 kHz codes as text: each coarse frame is
``#`` followed by its 7 codes, ``"# c0 c1 c2 c3 c4 c5 c6 # c0 ..."``, codes in ``[0, 4096)``. The 7
codes of frame ``f`` are ``l0[f], l1[2f], l2[4f], l2[4f+1], l1[2f+1], l2[4f+2], l2[4f+3]``
(``reconstruct_tensors`` in gpt-omni/mini-omni ``utils/snac_utils.py``; the string is split on
whitespace with every 8th token the ``#`` separator in X-LANCE/SLAM-LLM
``src/slam_llm/utils/snac_utils.py``, ``get_snac_answer_token``). That is the depth-first order of
:func:`deeptalk.processing.codecs.snac_flatten`, so :func:`parse_answer_snac` maps frame ``f``'s codes
onto column ``f`` of a ``[7, frames]`` grid with no reordering and no re-encoding. A model trained on
these codes speaks through ``hubertsiuzdak/snac_24khz`` (see :mod:`deeptalk.data.prepare`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DATA_FORMATS = ("messages", "asr", "voiceassistant", "spoken_qa")

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "asr": ("audio", "text"),
    "voiceassistant": ("question", "question_audio", "answer", "answer_snac"),
    "spoken_qa": ("question", "answers", "audio"),
}
"""Columns each format reads (the schema's names; `columns=` maps them onto a dataset's own names)."""

FORMAT_KEPT_COLUMNS: dict[str, tuple[str, ...]] = {"spoken_qa": ("answers",)}
"""Source columns carried into the conversation dataset by default (evaluation scores against `answers`)."""

AUDIO_SOURCE_COLUMNS: dict[str, tuple[str, ...]] = {
    "asr": ("audio",),
    "voiceassistant": ("question_audio",),
    "spoken_qa": ("audio",),
}

SNAC_24KHZ_STREAMS = 7
SNAC_24KHZ_CODEBOOK_SIZE = 4096

_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def conversation_features():
    """The Arrow schema of a conversation row: `{"messages": [{"role", "content": [part, ...], "voice"}]}`."""
    from datasets import Features, List, Value

    part = {
        "type": Value("string"),
        "text": Value("string"),
        "audio": {"path": Value("string"), "bytes": Value("binary")},
        "audio_codes": List(List(Value("int32"))),
        "voice": Value("string"),
        "transcript": Value("string"),
    }
    return Features({"messages": List({"role": Value("string"), "content": List(part), "voice": Value("string")})})


# ---------------------------------------------------------------------------------------------- answer_snac
def parse_answer_snac(text: str, *, num_streams: int = SNAC_24KHZ_STREAMS,
                      codebook_size: int = SNAC_24KHZ_CODEBOOK_SIZE) -> np.ndarray:
    """VoiceAssistant-400K's ``answer_snac`` string -> codes ``[num_streams, frames]`` (int32), in
    :func:`~deeptalk.processing.codecs.snac_flatten`'s depth-first order (the module docstring says why
    no reordering is needed)."""
    if not isinstance(text, str):
        raise TypeError(f"answer_snac must be a string of '#'-separated SNAC frames, got {type(text).__name__}.")
    chunks = text.split("#")
    if chunks[0].strip():
        raise ValueError(f"answer_snac must start with '#' (one '#' before each frame's codes), got {text[:40]!r}...")
    frames = [chunk.split() for chunk in chunks[1:]]
    if frames and not frames[-1]:
        frames.pop()  # a trailing '#'
    if not frames:
        raise ValueError("answer_snac holds no frames: expected '# c0 c1 c2 c3 c4 c5 c6 # ...'.")
    bad = next((i for i, frame in enumerate(frames) if len(frame) != num_streams), None)
    if bad is not None:
        raise ValueError(
            f"answer_snac frame {bad} has {len(frames[bad])} codes, expected {num_streams} (SNAC 24 kHz: "
            f"'# c0 c1 c2 c3 c4 c5 c6' per ~85 ms frame): {' '.join(frames[bad])!r}."
        )
    try:
        codes = np.array(frames, dtype=np.int64).T
    except ValueError:
        raise ValueError(f"answer_snac holds a code that is not an integer: {text[:80]!r}...") from None
    if codes.min() < 0 or codes.max() >= codebook_size:
        raise ValueError(
            f"answer_snac codes must lie in [0, {codebook_size}) (SNAC 24 kHz codebook), got "
            f"[{int(codes.min())}, {int(codes.max())}]."
        )
    return np.ascontiguousarray(codes, dtype=np.int32)


def format_answer_snac(codes) -> str:
    """Inverse of :func:`parse_answer_snac`: codes ``[N, frames]`` -> ``"# c0 ... c{N-1} # ..."``."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [num_streams, frames], got shape {codes.shape}.")
    return " ".join("# " + " ".join(str(int(c)) for c in frame) for frame in codes.T)


# ---------------------------------------------------------------------------------------------- audio references
def audio_reference(value: Any, base_dir: str | os.PathLike | None = None) -> dict:
    """Any audio value -> ``{"path", "bytes"}`` without decoding what is already encoded.

    Paths (``str``, ``{"path"}``) are made absolute against `base_dir`; ``{"bytes"}`` is kept; decoded
    audio (``{"array", "sampling_rate"}``, a torchcodec decoder / samples object) becomes WAV bytes.
    """
    if value is None:
        raise ValueError("An audio value is missing (None): drop that row, or fill the audio column.")
    if isinstance(value, (str, os.PathLike)):
        return {"path": _resolve(value, base_dir), "bytes": None}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"path": None, "bytes": bytes(value)}
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return {"path": value.get("path"), "bytes": bytes(value["bytes"])}
        if value.get("array") is not None:
            if value.get("sampling_rate") is None:
                raise ValueError("An audio dict has 'array' but no 'sampling_rate': add the rate (Hz).")
            return {"path": value.get("path"), "bytes": _wav_bytes(np.asarray(value["array"]), value["sampling_rate"])}
        if value.get("path") is not None:
            return {"path": _resolve(value["path"], base_dir), "bytes": None}
        raise ValueError(f"An audio dict has none of 'bytes', 'array', 'path' set (keys {sorted(value)}).")
    samples = value.get_all_samples() if hasattr(value, "get_all_samples") else value
    if hasattr(samples, "data") and hasattr(samples, "sample_rate"):  # torchcodec AudioSamples
        data = np.asarray(samples.data)
        return {"path": None, "bytes": _wav_bytes(data.mean(axis=0) if data.ndim == 2 else data, samples.sample_rate)}
    raise ValueError(
        f"Cannot read audio from a {type(value).__name__}: give a path, {{'path', 'bytes'}}, "
        "{'array', 'sampling_rate'} or a datasets.Audio value."
    )


def _resolve(path, base_dir) -> str:
    path = os.fspath(path)
    if base_dir is not None and not os.path.isabs(path) and "://" not in path:
        return os.path.join(os.fspath(base_dir), path)
    return path


def _wav_bytes(array: np.ndarray, sampling_rate) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    array = np.asarray(array)
    subtype = "PCM_16" if array.dtype == np.int16 else "FLOAT"
    sf.write(buffer, array if subtype == "PCM_16" else array.astype(np.float32), int(sampling_rate), format="WAV",
             subtype=subtype)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- conversations
def _part(type_: str, *, text=None, audio=None, audio_codes=None, voice=None, transcript=None) -> dict:
    return {"type": type_, "text": text, "audio": audio, "audio_codes": audio_codes, "voice": voice,
            "transcript": transcript}


def normalize_messages(messages: Sequence[Mapping], base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Messages in the processor's chat format -> the uniform Arrow-friendly form of
    :data:`conversation_features` (string content becomes one text part; audio becomes ``{"path", "bytes"}``)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"Message {i} must be a dict with 'role' and 'content', got {message!r:.80}.")
        content = message["content"]
        if isinstance(content, str):
            parts = [_part("text", text=content)]
        else:
            parts = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    parts.append(_part("text", text=part.get("text", "")))
                elif kind == "audio":
                    codes = part.get("audio_codes")
                    source = part.get("audio", part.get("path"))
                    if codes is None and source is None:
                        raise ValueError(f"Message {i} has an audio part with neither 'audio' nor 'audio_codes'.")
                    rate = part.get("sampling_rate")
                    if isinstance(source, Mapping) and source.get("array") is not None \
                            and source.get("sampling_rate") is None:
                        source = {**source, "sampling_rate": rate}
                    elif source is not None and not isinstance(source, (str, os.PathLike, Mapping, bytes)) \
                            and not hasattr(source, "get_all_samples"):  # raw samples
                        source = {"array": source, "sampling_rate": rate}
                    parts.append(_part(
                        "audio",
                        audio=None if source is None else audio_reference(source, base_dir),
                        audio_codes=None if codes is None else np.asarray(codes, dtype=np.int32).tolist(),
                        voice=part.get("voice"),
                        transcript=part.get("transcript"),
                    ))
                else:
                    raise ValueError(f"Message {i} has a part of type {kind!r}: use 'text' or 'audio'.")
        out.append({"role": message["role"], "content": parts, "voice": message.get("voice")})
    return out


def processor_messages(messages: Sequence[Mapping]) -> list[dict]:
    """A stored conversation -> what `DeepTalkProcessor.encode_conversation` takes: unused (``None``)
    fields dropped, a text-only turn's content as one string."""
    out = []
    for message in messages:
        parts = []
        for part in message["content"]:
            clean = {k: v for k, v in part.items() if v is not None}
            if "audio_codes" in clean:  # an array, not nested lists: the chat template walks lists item by item
                clean["audio_codes"] = np.asarray(clean["audio_codes"], dtype=np.int64)
            if isinstance(clean.get("audio"), Mapping):
                clean["audio"] = {k: v for k, v in clean["audio"].items() if v is not None}
            parts.append(clean)
        entry = {"role": message["role"], "content": parts}
        if all(p["type"] == "text" for p in parts):
            entry["content"] = "".join(p.get("text", "") for p in parts)
        if message.get("voice") is not None:
            entry["voice"] = message["voice"]
        out.append(entry)
    return out


def _asr_conversation(audio: dict, transcript: str, instruction: str) -> list[dict]:
    user = ([_part("text", text=instruction)] if instruction else []) + [_part("audio", audio=audio,
                                                                               transcript=transcript)]
    return [{"role": "user", "content": user, "voice": None},
            {"role": "assistant", "content": [_part("text", text=transcript)], "voice": None}]


def _qa_conversation(question_text: str | None, question_audio: dict | None, answer: str,
                     answer_codes: list | None = None) -> list[dict]:
    user = ([_part("audio", audio=question_audio, transcript=question_text)] if question_audio is not None
            else [_part("text", text=question_text)])
    assistant = [_part("text", text=answer)]
    if answer_codes is not None:
        assistant.append(_part("audio", audio_codes=answer_codes))
    return [{"role": "user", "content": user, "voice": None},
            {"role": "assistant", "content": assistant, "voice": None}]


def _check_choice(name: str, value: str, choices: Sequence[str]):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


def _check_options(data_format: str, question_modality: str, answer_modality: str | None) -> str:
    """Validate the format options; returns the answer modality (`None` -> the format's default)."""
    _check_choice("data_format", data_format, DATA_FORMATS)
    _check_choice("question_modality", question_modality, ("audio", "text"))
    if answer_modality is None:
        answer_modality = "speech" if data_format == "voiceassistant" else "text"
    _check_choice("answer_modality", answer_modality, ("speech", "text"))
    if answer_modality == "speech" and data_format != "voiceassistant":
        raise ValueError(
            f"answer_modality='speech' needs spoken answers; the {data_format!r} format has none (only "
            "'voiceassistant' does, through answer_snac). Use answer_modality='text'."
        )
    return answer_modality


def required_columns(data_format: str, question_modality: str = "audio",
                     answer_modality: str | None = None) -> list[str]:
    """The schema columns a format reads with these options."""
    answer_modality = _check_options(data_format, question_modality, answer_modality)
    skip = set()
    if data_format in ("voiceassistant", "spoken_qa"):
        skip.add(("question_audio" if data_format == "voiceassistant" else "audio") if question_modality == "text"
                 else "question")
    if answer_modality == "text":
        skip.add("answer_snac")
    return [c for c in FORMAT_COLUMNS[data_format] if c not in skip]


def conversation_mapper(data_format: str, *, columns: Mapping[str, str] | None = None, base_dir=None,
                        asr_instruction: str | None = None, question_modality: str = "audio",
                        answer_modality: str | None = None, keep_columns: Sequence[str] = ()):
    """The batched function that turns rows of `data_format` into ``{"messages": [...]}`` rows (plus
    `keep_columns`). See :func:`load_conversation_dataset` for the arguments."""
    answer_modality = _check_options(data_format, question_modality, answer_modality)
    if asr_instruction is None:
        from ..recipes.demo_data import ASR_INSTRUCTION

        asr_instruction = ASR_INSTRUCTION
    col = {name: (columns or {}).get(name, name) for name in FORMAT_COLUMNS[data_format]}

    def convert(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {"messages": []}
        for i, index in enumerate(indices):
            try:
                out["messages"].append(conversation(batch, i))
            except (ValueError, TypeError) as err:
                raise ValueError(f"{data_format} row {index}: {err}") from err
        for name in keep_columns:
            out[name] = batch[(columns or {}).get(name, name)]
        return out

    def conversation(batch: dict, i: int) -> list[dict]:
        if data_format == "messages":
            return normalize_messages(batch[col["messages"]][i], base_dir)
        if data_format == "asr":
            return _asr_conversation(audio_reference(batch[col["audio"]][i], base_dir), batch[col["text"]][i],
                                     asr_instruction)
        audio_column = "question_audio" if data_format == "voiceassistant" else "audio"
        audio = audio_reference(batch[col[audio_column]][i], base_dir) if question_modality == "audio" else None
        question = batch[col["question"]][i]  # a spoken question's transcript (the CTC adapter's target)
        if data_format == "voiceassistant":
            codes = parse_answer_snac(batch[col["answer_snac"]][i]).tolist() if answer_modality == "speech" else None
            return _qa_conversation(question, audio, batch[col["answer"]][i], codes)
        answers = batch[col["answers"]][i]  # spoken_qa
        if isinstance(answers, str) or not answers:
            raise ValueError(f"'answers' must be a non-empty list of strings, got {answers!r}.")
        return _qa_conversation(question, audio, answers[0])

    return convert


# ---------------------------------------------------------------------------------------------- sources
def _data_files(source) -> list[str] | None:
    """Local data files named by `source` (a file, a glob, a folder of data files, or a list of those), or None."""
    if isinstance(source, (list, tuple)):
        found = []
        for item in source:
            matched = _data_files(os.fspath(item))
            if not matched:
                raise FileNotFoundError(f"No data file at {os.fspath(item)!r} (one of the sources given as a list).")
            found += matched
        return found or None
    if os.path.isfile(source):
        return [os.path.abspath(source)]
    if os.path.isdir(source):
        found = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                       if Path(p).suffix in _FILE_BUILDERS and os.path.isfile(p))
        return [os.path.abspath(p) for p in found] or None
    if glob.has_magic(source):
        return sorted(os.path.abspath(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)) or None
    return None


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _read_jsonl_conversations(files: list[str]):
    """Rows of conversation JSON Lines files, normalised (relative audio paths resolved per file)."""
    for path in files:
        base = os.path.dirname(path)
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number} is not JSON ({err}).") from None
                if "messages" not in row:
                    hint = (" It is a DPO preference pair: load it with deeptalk.trainers.recipes.load_conversations."
                            if {"prompt", "chosen", "rejected"} <= set(row) else "")
                    raise ValueError(f"{path}:{number} has no 'messages' list (data_format='messages').{hint}")
                try:
                    yield {"messages": normalize_messages(row["messages"], base)}
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: {err}") from None


def _files_fingerprint(files: list[str]) -> str:
    """A cache key that changes when a file does (path, size, modification time): the generator's own key
    covers only its arguments, so an edited file would be read back from a stale cache."""
    import hashlib

    digest = hashlib.sha256(b"deeptalk-jsonl-conversations-v1")
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:32]


def load_raw_dataset(source, *, split: str = "train", streaming: bool = False, **load_kwargs):
    """`source` as a `datasets.Dataset` / `IterableDataset`, its columns untouched (see
    :func:`load_conversation_dataset`). Returns `(dataset, base_dir)`: the folder relative paths in it
    are resolved against (None for Hub datasets and in-memory ones)."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        if streaming and isinstance(source, datasets.Dataset):
            source = source.to_iterable_dataset(num_shards=max(1, min(64, len(source))))
        return source, None
    if isinstance(source, datasets.DatasetDict):
        return load_raw_dataset(_pick_split(source, split, "the DatasetDict"), split=split, streaming=streaming)
    if isinstance(source, (list, tuple)) and not source:
        raise ValueError("The list of data files is empty.")
    source = [os.fspath(s) for s in source] if isinstance(source, (list, tuple)) else os.fspath(source)
    if isinstance(source, str) and os.path.isdir(source) and _is_saved_dataset(source):
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, source)
        if streaming:
            loaded = loaded.to_iterable_dataset(num_shards=max(1, min(64, len(loaded))))
        return loaded, os.path.abspath(source)
    files = _data_files(source)
    if files:
        kinds = {_FILE_BUILDERS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(
                f"{source!r} matches files of several or unknown types ({sorted({Path(f).suffix for f in files})}); "
                f"give files of one type: {sorted(_FILE_BUILDERS)}."
            )
        builder = kinds.pop()
        name = split.split("[")[0]
        loaded = datasets.load_dataset(builder, data_files={name: files}, split=split, streaming=streaming,
                                       **load_kwargs)
        return loaded, os.path.commonpath([os.path.dirname(f) for f in files])
    if os.path.exists(source) or Path(source).suffix in _FILE_BUILDERS or glob.has_magic(source) \
            or not _HUB_ID.match(source):
        raise FileNotFoundError(
            f"No dataset at {source!r}: give a JSON Lines / parquet / arrow / json / csv file, a glob of them, a "
            "folder of them or one written by save_to_disk, or a Hub dataset id ('owner/name')."
        )
    return datasets.load_dataset(source, split=split, streaming=streaming, **load_kwargs), None


def _pick_split(dataset_dict, split: str, where: str):
    if split not in dataset_dict:
        raise ValueError(f"{where} has no split {split!r}; it has {sorted(dataset_dict)}. Pass split=...")
    return dataset_dict[split]


def load_conversation_dataset(source, *, data_format: str = "messages", split: str = "train", streaming: bool = False,
                              columns: Mapping[str, str] | None = None, keep_columns: Sequence[str] | None = None,
                              asr_instruction: str | None = None, question_modality: str = "audio",
                              answer_modality: str | None = None, num_proc: int | None = None, **load_kwargs):
    """A dataset of conversations (``{"messages": [...]}`` rows, :func:`conversation_features`) from any source.

    Args:
        source: a JSON Lines file of conversations, a ``save_to_disk`` folder, data files (parquet, arrow,
            json, jsonl, csv), a glob, folder or list of them, a Hub dataset id, or a ``datasets`` object.
        data_format: the source's schema, one of :data:`DATA_FORMATS` (see the module docstring).
        split: the split to read (for files: the name given to them; slices like ``"train[:100]"`` work
            when not streaming).
        streaming: return an ``IterableDataset`` read lazily (nothing is copied or cached).
        columns: the schema's column names mapped to the dataset's own, e.g. ``{"audio": "wav"}``.
        keep_columns: source columns carried over as they are (default: ``answers`` for ``spoken_qa``).
        asr_instruction: text before the audio in ``asr`` turns (default the demo recipes' instruction).
        question_modality: ``"audio"`` (default) or ``"text"`` questions for ``voiceassistant`` / ``spoken_qa``.
        answer_modality: ``"speech"`` (text + SNAC codes; the ``voiceassistant`` default) or ``"text"``.
        num_proc: processes for the conversion of a non-streamed dataset.
        load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``name=``, ``cache_dir=``, ``revision=``).
    """
    import datasets

    answer_modality = _check_options(data_format, question_modality, answer_modality)
    keep = tuple(FORMAT_KEPT_COLUMNS.get(data_format, ()) if keep_columns is None else keep_columns)
    unknown = set(columns or {}) - set(FORMAT_COLUMNS[data_format]) - set(keep)
    if unknown:
        raise ValueError(
            f"columns={dict(columns)} renames {sorted(unknown)}, which the {data_format!r} format does not read; "
            f"it reads {list(FORMAT_COLUMNS[data_format])}."
        )
    features = conversation_features()

    if data_format == "messages" and not isinstance(source, (datasets.Dataset, datasets.IterableDataset,
                                                             datasets.DatasetDict)):
        path = [os.fspath(s) for s in source] if isinstance(source, (list, tuple)) else os.fspath(source)
        files = None if isinstance(path, str) and os.path.isdir(path) and _is_saved_dataset(path) else _data_files(path)
        if files and all(Path(f).suffix in (".jsonl", ".json") for f in files):
            if keep:
                raise ValueError("keep_columns is not supported for JSON Lines conversations (only 'messages' is "
                                 "read).")
            if streaming:
                return datasets.IterableDataset.from_generator(_read_jsonl_conversations, features=features,
                                                               gen_kwargs={"files": files})
            return datasets.Dataset.from_generator(_read_jsonl_conversations, features=features,
                                                   gen_kwargs={"files": files}, cache_dir=load_kwargs.get("cache_dir"),
                                                   fingerprint=_files_fingerprint(files))

    raw, base_dir = load_raw_dataset(source, split=split, streaming=streaming, **load_kwargs)
    convert = conversation_mapper(data_format, columns=columns, base_dir=base_dir, asr_instruction=asr_instruction,
                                  question_modality=question_modality, answer_modality=answer_modality,
                                  keep_columns=keep)
    col = {name: (columns or {}).get(name, name) for name in (*FORMAT_COLUMNS[data_format], *keep)}
    names = raw.column_names
    if names is not None:
        needed = [col[n] for n in (*required_columns(data_format, question_modality, answer_modality), *keep)]
        missing = [c for c in needed if c not in names]
        if missing:
            raise ValueError(
                f"{source!r} has no column(s) {missing} for data_format={data_format!r} (it has {names}). Map the "
                f"format's names onto yours with columns={{'<format name>': '<your column>'}}, or pick the format "
                f"that matches: {list(DATA_FORMATS)}."
            )
    for name in AUDIO_SOURCE_COLUMNS.get(data_format, ()):
        feature = (raw.features or {}).get(col[name])
        if isinstance(feature, datasets.Audio) and feature.decode:  # read the encoded file, not torchcodec's decoder
            raw = raw.cast_column(col[name], datasets.Audio(sampling_rate=feature.sampling_rate, decode=False))
    if keep:  # kept columns keep their type; unknown types (a stream without features) stay unknown
        features = datasets.Features({**features, **{n: raw.features[col[n]] for n in keep}}) if raw.features else None
    if isinstance(raw, datasets.IterableDataset):
        return raw.map(convert, with_indices=True, batched=True, batch_size=64, remove_columns=names, features=features)
    return raw.map(convert, with_indices=True, batched=True, batch_size=64, writer_batch_size=64, remove_columns=names,
                   features=features, num_proc=num_proc, desc=f"{data_format} -> conversations")


# ---------------------------------------------------------------------------------------------- mixing
def mix_datasets(datasets_and_weights: Iterable[tuple[Any, float]], seed: int = 0,
                 stopping_strategy: str = "all_exhausted"):
    """Interleave conversation datasets (or prepared ones), each drawn with probability proportional to its
    weight (`datasets.interleave_datasets`). All must be `Dataset`s or all `IterableDataset`s; only the
    columns they share are kept (at least ``messages`` for conversations). With ``"all_exhausted"`` (default) small
    datasets are repeated until every one has been seen whole."""
    import datasets

    pairs = list(datasets_and_weights)
    if not pairs:
        raise ValueError("mix_datasets needs at least one (dataset, weight) pair.")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"mix_datasets item {i} must be a (dataset, weight) pair, got {pair!r:.80}.")
        weight = pair[1]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
            raise ValueError(f"mix_datasets weight {i} must be a finite number > 0, got {weight!r}.")
    sets = [d for d, _ in pairs]
    streamed = [isinstance(d, datasets.IterableDataset) for d in sets]
    if any(streamed) and not all(streamed):
        raise ValueError("mix_datasets got both streamed and in-memory datasets: load them all with the same "
                         "streaming=.")
    if len(sets) == 1:
        return sets[0]
    shared = [c for c in sets[0].column_names if all(c in d.column_names for d in sets[1:])]
    if not shared or any("messages" in d.column_names for d in sets) and "messages" not in shared:
        raise ValueError("mix_datasets mixes datasets of one kind: conversations (every one with a 'messages' column) "
                         "or rows encoded by the same processor.")
    sets = [d.select_columns(shared) if d.column_names != shared else d for d in sets]
    total = float(sum(w for _, w in pairs))
    return datasets.interleave_datasets(sets, probabilities=[w / total for _, w in pairs], seed=seed,
                                        stopping_strategy=stopping_strategy)
