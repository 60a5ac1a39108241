"""Training data for the phase trainers: any source in, the processor's rows out, one stream per rank.

:func:`load_training_data` reads one or several sources (JSON Lines conversations, folders written by
``deeptalk prepare`` / :func:`~deeptalk.data.prepare.prepare_dataset`, ``save_to_disk`` folders, parquet /
arrow / json files or globs, Hub ids), each in its schema (:data:`~deeptalk.data.formats.DATA_FORMATS`),
and returns rows with the columns :class:`~deeptalk.processing.processing_deeptalk.DeepTalkDataCollator`
pads: prepared folders as written (memory-mapped, or streamed), anything else encoded by the processor
(:func:`~deeptalk.data.prepare.encode_conversations`: cached for a `Dataset`, as it is read for a stream).
Several sources are concatenated, or interleaved by weight when weights are given.

:func:`rank_stream` is what the trainers do with an `IterableDataset`: each process reads its own part
(`datasets.distributed.split_dataset_by_node`) over and over (reshuffled each pass when the stream
shuffles), so every rank has a batch for each of the run's `max_steps` steps however unevenly the
rows fall: no rank waits for a batch another rank will never send.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .formats import DATA_FORMATS, FORMAT_COLUMNS, FORMAT_KEPT_COLUMNS


@dataclass
class TrainingData:
    """What :func:`load_training_data` read: the rows, and where they came from."""

    dataset: Any
    """A `datasets.Dataset` (memory-mapped) or `datasets.IterableDataset` of the processor's rows."""
    sources: list[dict] = field(default_factory=list)
    """Per source: `{"source", "kind" ("prepared" | "conversations"), "data_format", "weight", "rows" (None when
    streamed), "codec_dir" (a prepared folder's recorded codec, or None)}`."""

    @property
    def num_rows(self) -> int | None:
        """Rows in all (None when any source is streamed)."""
        counts = [s["rows"] for s in self.sources]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def codec_dirs(self) -> list[str]:
        """The codecs prepared sources recorded (their speech codes belong to them), without repeats."""
        return list(dict.fromkeys(s["codec_dir"] for s in self.sources if s["codec_dir"]))


def parse_data_spec(text: str) -> tuple[str, float | None]:
    """``SOURCE[:WEIGHT]`` -> (source, weight or None). A path that exists is a source even if it has a colon."""
    source, sep, weight = str(text).rpartition(":")
    if not sep or os.path.exists(os.path.expanduser(str(text))):
        return str(text), None
    try:
        value = float(weight)
    except ValueError:
        return str(text), None  # e.g. a URL or a path with a colon
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r}: the weight after ':' must be a finite number > 0, got {weight!r}.")
    if not source:
        raise ValueError(f"{text!r}: no source before the weight (SOURCE:WEIGHT).")
    return source, value


def per_source(values, count: int, name: str, default=None) -> list:
    """One option value for every source: a single value applies to all, else one per source, in order."""
    values = [default] if values is None or (isinstance(values, (list, tuple)) and not values) else values
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{len(values)} {name} values for {count} data sources: give one for all, or one per source "
                         "in the order of the sources.")
    return values


def columns_for_format(columns: Mapping[str, str] | None, data_format: str) -> dict[str, str]:
    """The part of a `columns` mapping (schema name -> dataset column) that `data_format` reads."""
    names = set(FORMAT_COLUMNS[data_format]) | set(FORMAT_KEPT_COLUMNS.get(data_format, ()))
    return {k: v for k, v in (columns or {}).items() if k in names}


def check_columns(columns: Mapping[str, str] | None, data_formats: Sequence[str]) -> None:
    """Every renamed schema column must be read by at least one of the formats."""
    read = set()
    for data_format in data_formats:
        read |= set(FORMAT_COLUMNS[data_format]) | set(FORMAT_KEPT_COLUMNS.get(data_format, ()))
    unknown = sorted(set(columns or {}) - read)
    if unknown:
        raise ValueError(f"columns {unknown} are read by none of the formats {sorted(set(data_formats))} "
                         f"(they read {sorted(read)}).")


def load_training_data(sources: Sequence, processor, *, data_format: str | Sequence[str] = "messages",
                       split: str | Sequence[str] = "train", streaming: bool = False,
                       columns: Mapping[str, str] | None = None, codec=None, max_length: int | None = None,
                       num_proc: int | None = None, seed: int = 0, cache_dir: str | None = None,
                       **format_options) -> TrainingData:
    """Rows ready for `DeepTalkDataCollator` from one or several sources.

    Args:
        sources: sources (a path, glob, Hub id, list of data files or `datasets` object), or `(source, weight)`
            pairs; weights (all or none) interleave the sources with those probabilities
            (`datasets.interleave_datasets`, every source seen whole), else they are concatenated.
        processor: the model's `DeepTalkProcessor`. Prepared folders must have been prepared with an equal one.
        data_format, split: one for all sources or one per source (prepared folders ignore both).
        streaming: read lazily (`IterableDataset`): nothing is copied or cached.
        columns: schema names -> the datasets' column names; each source gets the names its format reads.
        codec: encodes speech answers given as audio.
        max_length: rows longer than this many steps are dropped.
        num_proc: processes for encoding non-streamed conversations.
        seed: the interleaving seed.
        format_options: passed to `load_conversation_dataset` (`question_modality`, `answer_modality`, ...).
    """
    import datasets

    from .formats import load_conversation_dataset, mix_datasets
    from .prepare import (
        PREPARED_COLUMNS,
        encode_conversations,
        load_prepared_dataset,
        prepared_codec_dir,
        processor_fingerprint,
        read_manifest,
    )

    pairs = [s if isinstance(s, tuple) else (s, None) for s in sources]
    if not pairs:
        raise ValueError("No training data: give at least one source.")
    weights = [w for _, w in pairs]
    if any(w is None for w in weights) and not all(w is None for w in weights):
        raise ValueError("Give a weight to every data source (SOURCE:WEIGHT) or to none of them.")
    formats = per_source(data_format, len(pairs), "data_format", "messages")
    splits = per_source(split, len(pairs), "split", "train")
    for value in formats:
        if value not in DATA_FORMATS:
            raise ValueError(f"data_format={value!r} is not one of {list(DATA_FORMATS)}.")
    check_columns(columns, [f for (s, _), f in zip(pairs, formats) if not is_prepared_source(s)])

    fingerprint = processor_fingerprint(processor)
    loaded, described = [], []
    for (source, weight), fmt, part in zip(pairs, formats, splits):
        if is_prepared_source(source):
            path = os.fspath(source)
            manifest = read_manifest(path)
            if manifest["processor_fingerprint"] != fingerprint:
                raise ValueError(
                    f"{path} was prepared with another processor (tokenizer, chat template or speech layout) than the "
                    "model's: its rows would not mean what the model reads. Prepare it again for this model "
                    "(deeptalk prepare ... --model MODEL).")
            dataset = load_prepared_dataset(path, streaming=streaming)
            if max_length:
                dataset = dataset.filter(lambda n: n <= max_length, input_columns="length")
            entry = {"kind": "prepared", "data_format": manifest.get("data_format"),
                     "codec_dir": prepared_codec_dir(path)}
        else:
            conversations = load_conversation_dataset(source, data_format=fmt, split=part, streaming=streaming,
                                                      columns=columns_for_format(columns, fmt), keep_columns=(),
                                                      num_proc=num_proc, cache_dir=cache_dir, **format_options)
            dataset = encode_conversations(conversations, processor, codec=codec, max_length=max_length,
                                           num_proc=num_proc)
            entry = {"kind": "conversations", "data_format": fmt, "codec_dir": None}
        missing = [c for c in PREPARED_COLUMNS if dataset.column_names is not None and c not in dataset.column_names]
        if missing:
            raise ValueError(f"{_describe(source)} has no {', '.join(missing)} column: it was prepared by an older "
                             "deeptalk. Run `deeptalk prepare` on its source again.")
        dataset = dataset.select_columns(list(PREPARED_COLUMNS))
        rows = None if isinstance(dataset, datasets.IterableDataset) else len(dataset)
        if rows == 0:
            raise ValueError(f"{_describe(source)}: no training example left"
                             + (f" (every one is longer than max_length={max_length})." if max_length else "."))
        loaded.append(dataset)
        described.append({"source": _describe(source), "weight": weight, "rows": rows, **entry})
    if len(loaded) == 1:
        dataset = loaded[0]
    elif weights[0] is None:
        dataset = datasets.concatenate_datasets(loaded)
    else:
        dataset = mix_datasets(list(zip(loaded, weights)), seed=seed)
    return TrainingData(dataset, described)


def _describe(source) -> str:
    if isinstance(source, (list, tuple)):
        return f"{len(source)} files ({os.fspath(source[0])}, ...)" if source else "no files"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def is_prepared_source(source) -> bool:
    """Whether `source` is a folder written by `prepare_dataset` (`deeptalk prepare`)."""
    from .prepare import is_prepared_dir

    return isinstance(source, (str, os.PathLike)) and os.path.isdir(os.fspath(source)) and is_prepared_dir(source)


# ---------------------------------------------------------------------------------------------- one stream per rank
def rank_stream(dataset, *, world_size: int = 1):
    """`dataset` (an `IterableDataset`) as an endless `IterableDataset` with one stream shard per rank: shard
    `r` is rank `r`'s part (`split_dataset_by_node`) read pass after pass (`set_epoch(pass)` before each, so a
    shuffled stream is reshuffled). accelerate hands shard `r` to rank `r` (its `IterableDataset.shard` path,
    with `dispatch_batches=False`). A rank whose part is empty raises instead of waiting forever."""
    import datasets

    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"rank_stream takes a datasets.IterableDataset, got {type(dataset).__name__}.")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    from datasets.iterable_dataset import ExamplesIterable

    # built from its examples iterable rather than `from_generator`, which hashes its arguments (a codec inside the
    # stream's map function does not pickle); without features, rows pass through as the source yields them
    examples = ExamplesIterable(_endless_part, {"dataset": dataset, "world_size": world_size,
                                                "ranks": list(range(world_size))})
    return datasets.IterableDataset(examples)


def _endless_part(dataset, world_size: int, ranks: list[int]):
    from datasets.distributed import split_dataset_by_node

    (rank,) = ranks  # datasets gives each stream shard its slice of the list: one rank
    part = split_dataset_by_node(dataset, rank=rank, world_size=world_size) if world_size > 1 else dataset
    for epoch in itertools.count():
        part.set_epoch(epoch)
        rows = 0
        for row in part:
            yield f"{rank}-{epoch}-{rows}", row
            rows += 1
        if rows == 0:
            raise ValueError(
                f"Process {rank} of {world_size} has no training rows: the streamed dataset has fewer rows than "
                "processes. Use fewer processes or more data.")
