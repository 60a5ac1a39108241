"""Data utilities for DeepTalk.

Currently provides the tiny shipped synthetic demo corpus (see
:mod:`deeptalk.data.demo_corpus`) and the templated world it is built from
(:mod:`deeptalk.data.demo_world`). The corpus is for CPU demos, tests and the
quickstart - not a benchmark of real speech.
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

__all__ = [
    "AUDIO_COLUMNS",
    "DEMO_SAMPLING_RATE",
    "demo_corpus_manifest",
    "demo_corpus_path",
    "list_demo_voices",
    "load_demo_audio",
    "load_demo_corpus",
    "read_demo_records",
]
