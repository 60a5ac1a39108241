"""Prepare once: conversations -> training-ready rows, cached as Arrow shards and read memory-mapped.

:func:`prepare_dataset` runs :meth:`DeepTalkProcessor.encode_conversation` over a conversation dataset
(:func:`deeptalk.data.formats.load_conversation_dataset`) with ``datasets.map(batched=True, num_proc=N)``:

* speech answers given as audio are encoded by the codec here, once; codes already in the data
  (``audio_codes``, e.g. parsed from VoiceAssistant's ``answer_snac``) are used as they are;
* spoken questions stay audio for the Whisper encoder: the rows keep their log-mel features
  (``input_features``), which is what :class:`~deeptalk.processing.processing_deeptalk.DeepTalkDataCollator`
  pads into a batch.

Rows are the processor's columns (``input_ids`` / ``labels`` ``[1 + N, T]``, ``audio_input_mask``,
``input_features``, ``audio_feature_lengths``), plus ``length`` (steps; what ``group_by_length`` reads).

Output folder::

    output_dir/
      prepare_manifest.json     source, format, processor / codec fingerprints, settings, shard list
      shard-00000/ ...          one `save_to_disk` folder per `shard_size` source rows
      codec/codec_config.json   the codec the speech codes belong to (+ its weights when known)

Resumable: each shard is written under a temporary name and renamed when complete, so a shard is
complete or absent; a rerun with the same settings skips complete shards (a streamed source is read
again up to the first missing shard). Settings that would change the rows (another processor, codec,
source, format, shard size or length limit) are refused rather than mixed in.

The codec: rows with codes are only usable with the codec that made them, so its configuration is
written to ``codec/``: the ``codec`` passed in (saved with its weights), or, for ``voiceassistant``
data, SNAC 24 kHz (``hubertsiuzdak/snac_24khz``: 24 kHz, 7 streams of 4096 codes in Mini-Omni's
depth-first order, ~11.7 steps/s) as a configuration only, since its weights come from the Hub.
:func:`prepared_codec_dir` gives the folder to copy next to a trained model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from itertools import islice
from typing import Any

import numpy as np

MANIFEST_NAME = "prepare_manifest.json"
SHARD_INFO_NAME = "shard_info.json"
CODEC_DIR = "codec"
MANIFEST_VERSION = 2  # 2: audio_transcript_ids
PREPARED_COLUMNS = ("input_ids", "labels", "audio_input_mask", "input_features", "audio_feature_lengths",
                    "audio_transcript_ids", "length")

SNAC_24KHZ_NAME = "hubertsiuzdak/snac_24khz"
SNAC_24KHZ_CONFIG = {
    "sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
    "vq_strides": [4, 2, 1], "noise": True, "depthwise": True,
}
"""`snac.SNAC` arguments of hubertsiuzdak/snac_24khz, the codec of VoiceAssistant-400K's `answer_snac`."""


def prepared_features(extra=None):
    """The Arrow schema of prepared rows (+ `extra` columns' features)."""
    from datasets import Features, List, Value

    features = {
        "input_ids": List(List(Value("int32"))),
        "labels": List(List(Value("int32"))),
        "audio_input_mask": List(Value("bool")),
        "input_features": List(List(List(Value("float32")))),
        "audio_feature_lengths": List(Value("int32")),
        "audio_transcript_ids": List(List(Value("int32"))),
        "length": Value("int32"),
    }
    return Features({**features, **dict(extra or {})})


# ---------------------------------------------------------------------------------------------- fingerprints
def _json_default(value):
    if isinstance(value, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    return str(value)


def processor_fingerprint(processor) -> str:
    """A hash of everything in the processor that changes encoded rows (tokenizer, chat template,
    speech layout, feature extractor, audio positions)."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = {
        "tokenizer": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special_tokens": tokenizer.all_special_tokens,
        "chat_template": processor.chat_template,
        "speech_layout": processor.speech_layout,
        "audio_adapter_stride": processor.audio_adapter_stride,
        "audio_pad_to_30s": processor.audio_pad_to_30s,
        "max_audio_seconds": processor.max_audio_seconds,
        "feature_extractor": processor.feature_extractor.to_dict(),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def codec_fingerprint(codec) -> str | None:
    """A hash of a codec's configuration and weights (None without a codec)."""
    if codec is None:
        return None
    digest = hashlib.sha256(json.dumps(codec.codec_config(), sort_keys=True, default=_json_default).encode())
    for name, tensor in sorted(codec.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def snac_24khz_codec_config() -> dict:
    """`codec_config.json` content of SNAC 24 kHz (built on the meta device: no weights, no download)."""
    import torch

    from ..processing.codecs.snac_codec import SNACCodec, _snac_class

    with torch.device("meta"):
        model = _snac_class()(**SNAC_24KHZ_CONFIG)
    return SNACCodec(model, codec_name=SNAC_24KHZ_NAME, snac_config=SNAC_24KHZ_CONFIG).codec_config()


# ---------------------------------------------------------------------------------------------- encoding
def _encode_rows(batch: dict, indices: list[int], *, processor, codec, max_length, keep_columns, skip_invalid,
                 first_row: int, one_thread: bool = True) -> dict:
    import torch

    from .formats import processor_messages

    if one_thread:  # one clip at a time: extra intra-op threads only add stalls (and fork is unsafe with them)
        torch.set_num_threads(1)
    out: dict[str, list] = {name: [] for name in (*PREPARED_COLUMNS, *keep_columns, "status")}
    for i, (messages, index) in enumerate(zip(batch["messages"], indices)):
        status = "ok"
        try:
            encoded = processor.encode_conversation(processor_messages(messages), codec=codec)
        except (ValueError, FileNotFoundError) as err:
            if not skip_invalid:
                raise ValueError(f"Source row {first_row + index} cannot be encoded: {err} "
                                 "(prepare with skip_invalid=True to drop such rows).") from err
            encoded, status = None, "invalid"
        length = len(encoded["audio_input_mask"]) if encoded is not None else 0
        if encoded is not None and max_length and length > max_length:
            encoded, status = None, "too_long"
        out["status"].append(status)
        out["length"].append(length)
        for name in PREPARED_COLUMNS[:-1]:
            value = None if encoded is None else encoded[name]
            out[name].append([np.asarray(f, dtype=np.float32) for f in value] if name == "input_features" and value
                             else value)
        for name in keep_columns:
            out[name].append(batch[name][i])
    return out


def _encode_shard(shard, *, processor, codec, num_proc, batch_size, max_length, keep_columns, skip_invalid,
                  first_row, work_dir, fingerprint, features):
    """Encode one shard's conversations into `work_dir`; returns (dataset of ok rows, stats)."""
    from datasets import Features, Value

    encoded = shard.map(
        _encode_rows,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(shard) > 1 else None,
        remove_columns=shard.column_names,
        features=Features({**features, "status": Value("string")}),
        fn_kwargs={"processor": processor, "codec": codec, "max_length": max_length,
                   "keep_columns": tuple(keep_columns), "skip_invalid": skip_invalid, "first_row": first_row},
        cache_file_name=os.path.join(work_dir, "encoded.arrow"),
        writer_batch_size=batch_size,  # rows can hold 30 s of log-mel features each: flush often
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc=f"prepare rows {first_row}-{first_row + len(shard) - 1}",
    )
    statuses = encoded["status"]
    stats = {"source_rows": len(shard), "rows": statuses.count("ok"), "too_long": statuses.count("too_long"),
             "invalid": statuses.count("invalid")}
    if stats["rows"] != len(shard):
        encoded = encoded.filter(lambda status: status == "ok", input_columns="status")
    return encoded.remove_columns("status"), stats


def _spool(rows, features, folder: str, batch_size: int):
    """A streamed shard's rows written to an Arrow file as they come (memory stays at a batch), or None
    when there are no rows."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    os.makedirs(folder)
    path = os.path.join(folder, "rows.arrow")
    with ArrowWriter(features=features, path=path, writer_batch_size=batch_size) as writer:
        for row in rows:
            writer.write(row)
        count, _ = writer.finalize()
    if count == 0:
        shutil.rmtree(folder)
        return None
    return datasets.Dataset.from_file(path)


def encode_conversations(dataset, processor, *, codec=None, max_length: int | None = None, num_proc: int | None = None,
                         batch_size: int = 16, skip_invalid: bool = False):
    """Conversations -> the rows :func:`prepare_dataset` writes (:data:`PREPARED_COLUMNS`), without its shards:
    encoded as they are read for an `IterableDataset`, or by a cached `Dataset.map` (reused by a later run with
    the same data, processor, codec and `max_length`). Rows longer than `max_length` steps are dropped."""
    import datasets
    from datasets import Features, Value

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(
            f"encode_conversations takes a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    names = dataset.column_names
    if names is not None and "messages" not in names:
        raise ValueError(f"The dataset has no 'messages' column (it has {names}): load it with "
                         "deeptalk.data.load_conversation_dataset(source, data_format=...) first.")
    options = {
        "function": _encode_rows,
        "batched": True,
        "batch_size": batch_size,
        "with_indices": True,
        "remove_columns": names or ["messages"],
        "features": Features({**prepared_features(), "status": Value("string")}),
        "fn_kwargs": {"processor": processor, "codec": codec, "max_length": max_length, "keep_columns": (),
                      "skip_invalid": skip_invalid, "first_row": 0, "one_thread": bool(num_proc and num_proc > 1)},
    }
    if isinstance(dataset, datasets.IterableDataset):
        encoded = dataset.map(**options)
    else:
        key = json.dumps([dataset._fingerprint, processor_fingerprint(processor), codec_fingerprint(codec), max_length,
                          skip_invalid, MANIFEST_VERSION])
        encoded = dataset.map(**options, num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None,
                              writer_batch_size=batch_size, desc="encode conversations",
                              new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    return encoded.filter(lambda status: status == "ok", input_columns="status").remove_columns("status")


# ---------------------------------------------------------------------------------------------- shards on disk
def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _complete_shards(output_dir: str) -> dict[int, dict]:
    """Shards whose folder has its final name (written whole, then renamed): index -> shard info."""
    shards = {}
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("shard-") and name[6:].isdigit() and os.path.isfile(os.path.join(path, SHARD_INFO_NAME)):
            with open(os.path.join(path, SHARD_INFO_NAME), encoding="utf-8") as f:
                shards[int(name[6:])] = json.load(f)
    return shards


def _write_json(path: str, data: dict):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(output_dir) -> dict:
    path = os.path.join(os.fspath(output_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{output_dir!r} holds no prepared data ({MANIFEST_NAME} missing): run prepare_dataset first.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_prepared_dir(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST_NAME))


def prepared_codec_dir(output_dir) -> str | None:
    """The folder holding the prepared rows' codec (`codec_config.json`, weights when known), or None."""
    codec = read_manifest(output_dir).get("codec")
    return os.path.join(os.fspath(output_dir), codec["path"]) if codec else None


def _describe_source(source) -> str | None:
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return os.path.abspath(path) if os.path.exists(path) else path
    return str(source)


# ---------------------------------------------------------------------------------------------- prepare
def prepare_dataset(dataset, processor, *, output_dir, codec=None, num_proc: int = 1, shard_size: int = 10_000,
                    batch_size: int = 16, max_length: int | None = None, keep_columns: Sequence[str] = (),
                    skip_invalid: bool = False, source=None, data_format: str | None = None, record_codec=None,
                    overwrite: bool = False):
    """Encode a conversation dataset once into Arrow shards under `output_dir`; returns the prepared
    `Dataset` (memory-mapped, :func:`load_prepared_dataset`).

    Args:
        dataset: conversations (`Dataset` or streamed `IterableDataset` with a ``messages`` column).
        processor: the :class:`DeepTalkProcessor` whose layout the rows follow.
        output_dir: where shards and the manifest go; an existing one is resumed.
        codec: encodes speech answers given as audio (and is recorded with its weights).
        num_proc: processes for `datasets.map` within a shard.
        shard_size: source rows per shard (the unit of resumption).
        batch_size: rows per `map` batch.
        max_length: rows longer than this many steps are dropped (counted in the manifest).
        keep_columns: dataset columns carried into the rows (e.g. ``id``).
        skip_invalid: drop (and count) rows the processor rejects instead of stopping.
        source, data_format: recorded in the manifest (where the conversations came from).
        record_codec: the codec the data's own codes belong to, when `codec` is None: a `SpeechCodec`
            (saved with weights) or ``"hubertsiuzdak/snac_24khz"`` (configuration only). Defaults to
            SNAC 24 kHz for ``data_format="voiceassistant"``.
        overwrite: delete what `output_dir` holds and start again.
    """
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"prepare_dataset takes a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
    names = dataset.column_names
    if names is not None and "messages" not in names:
        raise ValueError(
            f"The dataset has no 'messages' column (it has {names}): load it with "
            "deeptalk.data.load_conversation_dataset(source, data_format=...) first."
        )
    missing = [c for c in keep_columns if names is not None and c not in names]
    if missing or set(keep_columns) & set(PREPARED_COLUMNS + ("messages", "status")):
        raise ValueError(f"keep_columns={list(keep_columns)} must name other columns of the dataset ({names}).")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of rows, got {shard_size!r}.")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be a positive number of processes, got {num_proc!r}.")
    if keep_columns and dataset.features is None:
        raise ValueError("keep_columns needs a dataset with known features (a stream of unknown type has none).")

    recorded = codec if codec is not None else record_codec
    if recorded is None and data_format == "voiceassistant":
        recorded = SNAC_24KHZ_NAME
    if isinstance(recorded, str):
        if recorded != SNAC_24KHZ_NAME:
            raise ValueError(
                f"record_codec={recorded!r}: by name only {SNAC_24KHZ_NAME!r} is known; pass a SpeechCodec.")
        codec_config = snac_24khz_codec_config()
        codec_layout = codec_config["layout"]
    elif recorded is not None:
        codec_config, codec_layout = recorded.codec_config(), recorded.layout()
    else:
        codec_config = codec_layout = None
    layout = processor.layout
    if codec_layout and (codec_layout["num_streams"], codec_layout["codebook_size"]) != \
            (layout.num_audio_streams, layout.codebook_size):
        raise ValueError(
            f"The speech codes come from {codec_layout['codec_name']} ({codec_layout['num_streams']} streams x "
            f"{codec_layout['codebook_size']} codes), but the processor lays out {layout.num_audio_streams} streams x "
            f"{layout.codebook_size}: build it with DeepTalkProcessor.from_codec_layout(tokenizer, "
            f"{codec_layout['num_streams']}, {codec_layout['codebook_size']})."
        )

    output_dir = os.fspath(output_dir)
    settings = {
        "format_version": MANIFEST_VERSION,
        "source": _describe_source(source),
        "data_format": data_format,
        "processor_fingerprint": processor_fingerprint(processor),
        "codec_fingerprint": codec_fingerprint(codec),
        "recorded_codec": None if codec_config is None else hashlib.sha256(
            json.dumps(codec_config, sort_keys=True, default=_json_default).encode()).hexdigest()[:16],
        "shard_size": shard_size,
        "max_length": max_length,
        "keep_columns": list(keep_columns),
        "streamed": isinstance(dataset, datasets.IterableDataset),
    }
    if overwrite and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    if os.path.isfile(os.path.join(output_dir, MANIFEST_NAME)):
        previous = read_manifest(output_dir)
        changed = [k for k in settings if k != "streamed" and previous.get(k) != settings[k]]
        if changed:
            raise ValueError(
                f"{output_dir!r} holds data prepared with other settings ({', '.join(changed)} differ): pass "
                "overwrite=True to start again, or another output_dir."
            )
    elif os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir!r} exists and is not a prepared dataset: pick an empty or new folder.")
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # what an interrupted run left half-written
        if ".tmp-" in name:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    codec_entry = None
    if codec_config is not None:
        codec_path = os.path.join(output_dir, CODEC_DIR)
        if not os.path.isdir(codec_path):
            tmp = f"{codec_path}.tmp-{os.getpid()}"
            if isinstance(recorded, str):
                from ..processing.codecs.base import write_codec_config

                write_codec_config(tmp, codec_config)
            else:
                recorded.save_pretrained(tmp)
            os.replace(tmp, codec_path)
        codec_entry = {"path": CODEC_DIR, "name": codec_layout["codec_name"], "weights": not isinstance(recorded, str),
                       "layout": codec_layout}

    def write_manifest(complete: bool):
        shards = _complete_shards(output_dir)
        manifest = dict(settings, codec=codec_entry, complete=complete,
                        shards=[dict(shards[i], name=_shard_name(i)) for i in sorted(shards)],
                        num_rows=sum(s["rows"] for s in shards.values()),
                        source_rows=sum(s["source_rows"] for s in shards.values()))
        _write_json(os.path.join(output_dir, MANIFEST_NAME), manifest)

    done = _complete_shards(output_dir)
    features = prepared_features({c: dataset.features[c] for c in keep_columns})
    kwargs = {"processor": processor, "codec": codec, "num_proc": num_proc, "batch_size": batch_size,
              "max_length": max_length, "keep_columns": keep_columns, "skip_invalid": skip_invalid,
              "features": features}
    write_manifest(complete=False)

    def write_shard(index: int, shard):
        work_dir = os.path.join(output_dir, f"{_shard_name(index)}.tmp-{os.getpid()}")
        os.makedirs(work_dir)
        started = time.perf_counter()
        encoded, stats = _encode_shard(shard, first_row=index * shard_size, work_dir=os.path.join(work_dir, "map"),
                                       fingerprint=f"{settings['processor_fingerprint']}-{index}", **kwargs)
        final = os.path.join(work_dir, "data")
        encoded.save_to_disk(final)
        del encoded
        shutil.rmtree(os.path.join(work_dir, "map"), ignore_errors=True)
        stats["seconds"] = round(time.perf_counter() - started, 3)
        with open(os.path.join(final, SHARD_INFO_NAME), "w", encoding="utf-8") as f:
            json.dump(stats, f)
        os.replace(final, os.path.join(output_dir, _shard_name(index)))
        shutil.rmtree(work_dir)
        write_manifest(complete=False)

    if isinstance(dataset, datasets.Dataset):
        for index in range(math.ceil(len(dataset) / shard_size)):
            if index not in done:
                start = index * shard_size
                write_shard(index, dataset.select(range(start, min(start + shard_size, len(dataset)))))
    else:
        rows = iter(dataset)
        for index in range(2**31):
            shard_rows = islice(rows, shard_size)
            if index in done:  # a complete shard's rows are read and skipped
                if sum(1 for _ in shard_rows) == 0:
                    break
                continue
            spool_dir = os.path.join(output_dir, f"source-{index:05d}.tmp-{os.getpid()}")
            shard = _spool(shard_rows, dataset.features, spool_dir, batch_size)
            if shard is None:
                break
            write_shard(index, shard)
            shutil.rmtree(os.path.dirname(shard.cache_files[0]["filename"]), ignore_errors=True)
    write_manifest(complete=True)
    return load_prepared_dataset(output_dir)


def load_prepared_dataset(output_dir, *, streaming: bool = False, allow_incomplete: bool = False):
    """The rows `prepare_dataset` wrote, memory-mapped (a `Dataset` over all shards, in source order), or
    an `IterableDataset` with one stream shard per prepared shard (`streaming=True`)."""
    import datasets

    output_dir = os.fspath(output_dir)
    manifest = read_manifest(output_dir)
    if not manifest.get("complete") and not allow_incomplete:
        raise ValueError(
            f"{output_dir!r} is only partly prepared ({len(manifest['shards'])} shards): rerun prepare to finish it "
            "(complete shards are kept), or pass allow_incomplete=True."
        )
    shards = [datasets.load_from_disk(os.path.join(output_dir, s["name"])) for s in manifest["shards"] if s["rows"]]
    if not shards:
        raise ValueError(f"{output_dir!r} holds no rows (every row was dropped: see {MANIFEST_NAME}).")
    if streaming:
        return datasets.concatenate_datasets([s.to_iterable_dataset(num_shards=1) for s in shards])
    return datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]


def prepared_summary(output_dir) -> dict[str, Any]:
    """Counts from the manifest: rows, source rows, rows dropped as too long / invalid, shards, codec."""
    manifest = read_manifest(output_dir)
    return {
        "num_rows": manifest["num_rows"],
        "source_rows": manifest["source_rows"],
        "too_long": sum(s["too_long"] for s in manifest["shards"]),
        "invalid": sum(s["invalid"] for s in manifest["shards"]),
        "shards": len(manifest["shards"]),
        "complete": manifest["complete"],
        "codec": (manifest.get("codec") or {}).get("name"),
    }
