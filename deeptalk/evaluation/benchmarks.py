"""Spoken QA benchmarks in the paper's shape: speech->text (S2T) and speech->speech (S2S) accuracy per dataset.

The paper scores LLaMA Questions, Web Questions and TriviaQA, each S2T and S2S, and reports a table with
one row per model and, per dataset, an S2T and an S2S column, plus their averages. Any dataset in the
``spoken_qa`` schema (``question``, ``answers``: a list of strings, ``audio``: the spoken question; see
:mod:`deeptalk.data.formats`) can be scored, from local files, ``save_to_disk`` folders or the Hub:

* **S2T**: the model's greedy text answer to the spoken question;
* **S2S**: the model's spoken answer (:func:`~deeptalk.evaluation.speech.spoken_answers`, decoded with the
  codec) transcribed by an ASR (:func:`~deeptalk.evaluation.speech.load_speech_recognizer`: the model's own
  ASR path, a transformers checkpoint, or a :class:`~deeptalk.evaluation.judge.WhisperJudge`).

An answer counts when it matches any of the row's ``answers`` after Whisper's English normalisation
(:func:`~deeptalk.evaluation.judge.normalize_transcript`, so "12" matches "twelve"): ``match="contains"``
(default, the usual rule for these benchmarks, whose references are short and answers are sentences) when a
reference appears in the answer as whole words, ``match="exact"`` when they are equal.

:func:`write_benchmark_table` writes the table as JSON and as markdown; a table already at that path (for
the same datasets and rule) keeps its other models' rows, so running once per model builds the comparison.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

MATCH_RULES = ("contains", "exact")
TABLE_KIND = "deeptalk spoken QA benchmark"


def answer_matches(prediction: str, answers: Sequence[str], match: str = "contains") -> bool:
    """Whether `prediction` matches any of `answers` after :func:`normalize_transcript` on both sides."""
    from .judge import normalize_transcript

    if match not in MATCH_RULES:
        raise ValueError(f"match={match!r} is not one of {list(MATCH_RULES)}.")
    said = normalize_transcript(prediction)
    references = [normalize_transcript(a) for a in answers if str(a).strip()]
    if match == "exact":
        return any(said == r for r in references if r)
    padded = f" {said} "
    return any(r and f" {r} " in padded for r in references)


def match_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], match: str = "contains") -> float:
    """Share of predictions that match one of their answers (:func:`answer_matches`)."""
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers) or not answers:
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists (need at least one).")
    return sum(answer_matches(p, a, match) for p, a in zip(predictions, answers)) / len(answers)


def dataset_name(source) -> str:
    """A table column name for a source: a Hub id as it is, a file or folder by its name without extension."""
    text = os.fspath(source)
    if os.path.exists(os.path.expanduser(text)):
        path = Path(os.path.expanduser(text)).resolve()
        return path.stem if path.is_file() else path.name
    return text.rstrip("/")


def load_spoken_qa_records(source, *, split: str = "test", columns=None, limit: int | None = None,
                           streaming: bool = False, **load_kwargs) -> list[dict]:
    """The first `limit` rows (all without it) of a spoken_qa-schema dataset as records
    `{"question_audio": {"array", "sampling_rate"} (16 kHz), "answers": [...], "answer_text": answers[0]}`."""
    from itertools import islice

    from ..data.formats import load_conversation_dataset
    from ..processing.audio import WHISPER_SAMPLING_RATE, load_audio

    dataset = load_conversation_dataset(source, data_format="spoken_qa", split=split, streaming=streaming,
                                        columns=columns, **load_kwargs)
    records = []
    for index, row in enumerate(islice(iter(dataset), limit)):
        (part,) = [p for p in row["messages"][0]["content"] if p["type"] == "audio"]
        audio = part["audio"]
        clip = audio["bytes"] if audio.get("bytes") is not None else audio["path"]
        try:
            wave = load_audio(clip, target_sampling_rate=WHISPER_SAMPLING_RATE)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(
                f"{dataset_name(source)} row {index}: its question audio cannot be read ({err}).") from None
        answers = [str(a) for a in row["answers"]]
        records.append({"question_audio": {"array": wave, "sampling_rate": WHISPER_SAMPLING_RATE}, "answers": answers,
                        "answer_text": answers[0]})
    if not records:
        raise ValueError(f"{dataset_name(source)} (split {split!r}) has no rows to score.")
    return records


def resolve_asr(asr, *, model=None, processor=None, device=None):
    """`asr` as a :class:`~deeptalk.evaluation.speech.SpeechRecognizer`: ``"whisper"`` / ``"whisper:NAME"`` load a
    :class:`~deeptalk.evaluation.judge.WhisperJudge` (default tiny.en); anything else goes to
    :func:`~deeptalk.evaluation.speech.load_speech_recognizer`."""
    from .speech import load_speech_recognizer

    if isinstance(asr, str) and (asr == "whisper" or asr.startswith("whisper:")):
        from .judge import WhisperJudge

        name = asr.partition(":")[2] or "tiny.en"
        judge = WhisperJudge(name)
        if device is not None:
            judge.model.to(device)
        return judge
    return load_speech_recognizer(asr, model=model, processor=processor, device=device)


def evaluate_spoken_qa(model, processor, records: list[dict], *, codec=None, recognizer=None, match: str = "contains",
                       speech_answers: bool = True, max_speech_steps: int = 200, max_new_tokens: int = 32,
                       batch_size: int = 16, decoding: dict | None = None) -> dict:
    """S2T and S2S accuracy of `model` on spoken_qa records (:func:`load_spoken_qa_records`).

    Returns `{"s2t", "s2s" (None when skipped), "num_examples", "asr" (the recognizer's name or None),
    "predictions": {"s2t": [...], "s2s_text": [...], "s2s_transcripts": [...]}, "skipped": reason or None}`."""
    from ..recipes.demo_data import spoken_question_conversation
    from .metrics import generate_text_answers
    from .speech import spoken_answers

    answers = [r["answers"] for r in records]
    conversations = [spoken_question_conversation(r["question_audio"]) for r in records]
    texts = generate_text_answers(model, processor, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
    result = {"s2t": match_accuracy(texts, answers, match), "s2s": None, "num_examples": len(records), "asr": None,
              "predictions": {"s2t": texts}, "skipped": None}
    speaks = bool(getattr(model.config, "num_audio_streams", 0))
    if not speech_answers:
        result["skipped"] = "speech answers were not asked for (--no-speech-answers)"
    elif not speaks:
        result["skipped"] = "the model has no audio streams: it cannot answer in speech"
    elif codec is None:
        result["skipped"] = "no codec to decode the spoken answers (pass --codec, or keep the model's codec/ beside it)"
    else:
        spoken_texts, waveforms = spoken_answers(model, processor, codec, records, max_steps=max_speech_steps,
                                                 decoding=decoding)
        transcripts = recognizer.transcribe([(w, codec.sampling_rate) for w in waveforms])
        result.update(s2s=match_accuracy(transcripts, answers, match), asr=recognizer.name)
        result["predictions"].update(s2s_text=spoken_texts, s2s_transcripts=transcripts)
    return result


def evaluate_spoken_qa_datasets(model, processor, sources: Sequence, *, codec=None,
                                splits: Sequence[str] | str = "test",
                                columns=None, limit: int | None = None, asr=None, match: str = "contains",
                                speech_answers: bool = True, max_speech_steps: int = 200, max_new_tokens: int = 32,
                                decoding: dict | None = None, model_name: str | None = None,
                                names: Sequence[str] | None = None, **load_kwargs) -> dict:
    """One table row: S2T and S2S accuracy of `model` on each spoken QA dataset in `sources`, and their averages.

    Args:
        sources: spoken_qa-schema datasets (anything :func:`~deeptalk.data.load_conversation_dataset` reads).
        codec: the model's codec; without it (or with `speech_answers=False`) S2S is skipped.
        splits: one split for all sources, or one per source.
        limit: score the first `limit` rows of each dataset.
        asr: what transcribes the spoken answers (:func:`resolve_asr`; default the model's own ASR path).
        match: ``"contains"`` or ``"exact"`` (see the module docstring).
        model_name: the row's name (default: the model's `name_or_path`).
        names: column names of the datasets (default :func:`dataset_name` of each source).
    """
    if match not in MATCH_RULES:
        raise ValueError(f"match={match!r} is not one of {list(MATCH_RULES)}.")
    splits = [splits] * len(sources) if isinstance(splits, str) else list(splits)
    if len(splits) != len(sources):
        raise ValueError(f"{len(splits)} splits for {len(sources)} datasets: give one for all, or one per dataset.")
    names = list(names) if names is not None else _unique([dataset_name(s) for s in sources])
    records = {name: load_spoken_qa_records(source, split=split, columns=columns, limit=limit, **load_kwargs)
               for name, source, split in zip(names, sources, splits)}  # unreadable data fails before decoding starts
    recognizer = None
    if speech_answers and codec is not None and getattr(model.config, "num_audio_streams", 0):
        recognizer = resolve_asr(asr, model=model, processor=processor, device=next(model.parameters()).device)
    results, skipped = {}, {}
    for name, rows in records.items():
        scores = evaluate_spoken_qa(model, processor, rows, codec=codec, recognizer=recognizer, match=match,
                                    speech_answers=speech_answers, max_speech_steps=max_speech_steps,
                                    max_new_tokens=max_new_tokens, decoding=decoding)
        reason = scores.pop("skipped")
        if reason:
            skipped[f"{name} S2S"] = reason
        results[name] = scores
    return {
        "model": model_name or str(getattr(model, "name_or_path", "") or "model"),
        "results": results,
        "average": {metric: _mean([r[metric] for r in results.values()]) for metric in ("s2t", "s2s")},
        "skipped": skipped,
        "settings": {"match": match, "normalizer": "whisper english (normalize_transcript)", "limit": limit,
                     "max_new_tokens": max_new_tokens, "max_speech_steps": max_speech_steps,
                     "decoding": {k: v for k, v in (decoding or {}).items() if v is not None},
                     "asr": recognizer.name if recognizer is not None else None},
    }


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------- the table
def benchmark_table(rows: list[dict]) -> dict:
    """Rows from :func:`evaluate_spoken_qa_datasets` (same datasets) -> the table: `{"kind", "datasets", "match",
    "rows", "markdown"}` (each row keeps its answers and transcripts under `results[dataset]["predictions"]`)."""
    if not rows:
        raise ValueError("A benchmark table needs at least one row.")
    datasets = list(rows[0]["results"])
    for row in rows[1:]:
        if list(row["results"]) != datasets or row["settings"]["match"] != rows[0]["settings"]["match"]:
            raise ValueError("Every row of a table scores the same datasets with the same match rule.")
    return {"kind": TABLE_KIND, "datasets": datasets, "match": rows[0]["settings"]["match"], "rows": list(rows),
            "markdown": markdown_table(rows, datasets)}


def markdown_table(rows: list[dict], datasets: list[str]) -> str:
    """The paper's layout: one row per model; S2T and S2S per dataset, then their averages (accuracy, %)."""
    def cell(value):
        return "-" if value is None else f"{100 * value:.1f}"

    header = ["Model"] + [f"{name} {metric}" for name in datasets for metric in ("S2T", "S2S")] + ["Avg S2T", "Avg S2S"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["model"]]
        cells += [cell(row["results"][name][metric]) for name in datasets for metric in ("s2t", "s2s")]
        cells += [cell(row["average"]["s2t"]), cell(row["average"]["s2s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_benchmark_table(row: dict, path, *, merge: bool = True) -> dict:
    """Write `row`'s table as JSON at `path` and as markdown beside it (`.md`). With `merge`, a table already at
    `path` for the same datasets and match rule keeps its other models' rows (a row of the same model is
    replaced). Returns the table written, with `"markdown_path"`."""
    from .evaluate import write_results

    path = os.fspath(path)
    rows = [row]
    if merge and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                existing = json.load(f)
        except (OSError, json.JSONDecodeError):
            existing = None
        if isinstance(existing, dict) and existing.get("kind") == TABLE_KIND \
                and existing.get("datasets") == list(row["results"]) \
                and existing.get("match") == row["settings"]["match"]:
            rows = [r for r in existing["rows"] if r.get("model") != row["model"]] + [row]
    table = benchmark_table(rows)
    table = write_results(table, path)
    markdown_path = os.path.splitext(path)[0] + ".md"
    Path(markdown_path).write_text(table["markdown"] + "\n", encoding="utf-8")
    return {**table, "markdown_path": markdown_path}
