"""Data utilities for DeepTalk.

* :mod:`deeptalk.data.formats`: any dataset in (JSON Lines, ``save_to_disk`` folders, parquet / arrow /
  json files, Hub ids), by schema (``messages``, ``asr``, ``voiceassistant``, ``spoken_qa``), as
  conversations; mixing with weights.
* :mod:`deeptalk.data.prepare`: conversations -> training-ready, resumable Arrow shards, read memory-mapped.
* the tiny shipped synthetic demo corpus (:mod:`deeptalk.data.demo_corpus`) and the templated world it is
  built from (:mod:`deeptalk.data.demo_world`): for CPU demos, tests and the quickstart, not a benchmark
  of real speech.
"""

from .demo_corpus import (
    AUDIO_COLUMNS,
    DEMO_SAMPLING_RATE,
    demo_corpus_manifest,
    demo_corpus_path,
    list_demo_voices,
    load_demo_audio,
    load_demo_corpus,
    read_demo_records,
)
from .formats import (
    DATA_FORMATS,
    format_answer_snac,
    load_conversation_dataset,
    mix_datasets,
    parse_answer_snac,
    processor_messages,
)
from .prepare import (
    SNAC_24KHZ_NAME,
    is_prepared_dir,
    load_prepared_dataset,
    prepare_dataset,
    prepared_codec_dir,
    prepared_summary,
)

__all__ = [
    "AUDIO_COLUMNS",
    "DATA_FORMATS",
    "DEMO_SAMPLING_RATE",
    "SNAC_24KHZ_NAME",
    "demo_corpus_manifest",
    "demo_corpus_path",
    "format_answer_snac",
    "is_prepared_dir",
    "list_demo_voices",
    "load_conversation_dataset",
    "load_demo_audio",
    "load_demo_corpus",
    "load_prepared_dataset",
    "mix_datasets",
    "parse_answer_snac",
    "prepare_dataset",
    "prepared_codec_dir",
    "prepared_summary",
    "processor_messages",
    "read_demo_records",
]
