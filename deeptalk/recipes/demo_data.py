"""Everything the offline quickstart needs from the shipped demo corpus, encoded once.

The demo corpus (:mod:`deeptalk.data.demo_corpus`) holds a tiny templated world spoken by espeak-ng.
This module turns it into training-ready data for every DeepTalk phase, on a 2-core CPU, in seconds:

* :func:`build_demo_tokenizer` -- a byte-level BPE fitted on every corpus text (with DeepTalk's specials);
* :func:`fit_demo_codec` -- a :class:`~deeptalk.processing.codecs.MelVQCodec` fitted on the assistant
  voice's answer audio (seeded, a few k-means iterations; 25 LLM steps per second by default, so a
  one-word answer of ~0.7 s is ~18 steps);
* :func:`build_demo_processor` -- the :class:`~deeptalk.DeepTalkProcessor` for that tokenizer and codec;
* :func:`build_demo_data` -> :class:`DemoData` -- ``datasets.DatasetDict``s already encoded with
  ``processor.encode_batch`` (columns ``input_ids``, ``labels``, ``audio_input_mask``,
  ``input_features``, ``audio_feature_lengths`` + ``id`` / ``task`` / ``target_text``), ready for
  :class:`~deeptalk.DeepTalkDataCollator`, plus the raw records for evaluation.

Tasks and the phases they serve (the paper's schedule, §4 of ``paper.md``):

===================  ===============================================  ===================
dataset              conversation                                     phases
===================  ===============================================  ===================
``asr``              user: ASR instruction + audio -> assistant text  1 (modality alignment)
``spoken_qa_speech`` user: audio question -> assistant text + speech  2a, 3
``text_qa``          user: text question -> assistant text            2b, 3
``spoken_qa_text``   user: audio question -> assistant text           speech-to-text evaluation / extra
===================  ===============================================  ===================

The ASR turn carries a text instruction (:data:`ASR_INSTRUCTION`) because the ASR task re-uses the
spoken questions' audio: without it, the same input would have two targets (transcript vs answer).
``spoken_qa_speech`` and ``spoken_qa_text`` share their prompt on purpose: their text streams agree up
to EOT (the speech layout puts the text first), they differ only in whether speech follows.

Example::

    from deeptalk.recipes import build_demo_tokenizer, fit_demo_codec, build_demo_processor, build_demo_data

    tokenizer = build_demo_tokenizer()
    codec = fit_demo_codec()
    processor = build_demo_processor(tokenizer, codec)
    data = build_demo_data(processor, codec)
    data.spoken_qa_speech["train"][0]["input_ids"]       # [1 + N][T] global ids
    data.phase_dataset("3", "train")                      # spoken_qa_speech + text_qa, shuffled
    data.test_records["spoken_qa"][0]["question_audio"]   # absolute .flac path for evaluation
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..data.demo_corpus import SPLITS, read_demo_records

ASR_INSTRUCTION = "transcribe"
"""Text placed before the audio in an ASR user turn (see the module docstring)."""

DEMO_TASKS = ("text_qa", "asr", "spoken_qa_speech", "spoken_qa_text")

PHASES: dict[str, tuple[str, ...]] = {
    "1": ("asr",),
    "2a": ("spoken_qa_speech",),
    "2b": ("text_qa",),
    "3": ("spoken_qa_speech", "text_qa"),
}
"""Which :class:`DemoData` datasets each training phase uses (see :meth:`DemoData.phase_dataset`)."""

PHASE_ALIASES = {"align": "1", "experts_speech": "2a", "experts_text": "2b", "joint": "3"}
"""The shipped recipes' names (`deeptalk/recipes/tiny_cpu/*.yaml`) for the phases."""

DEFAULT_CODEC_OPTIONS = {"n_mels": 128, "codebook_size": 128, "num_quantizers": 2, "frames_per_step": 2}
"""MelVQCodec options of the demo codec: 4 streams x 128 codes at 25 steps/s (640 samples a step), 128 mel
bands (80 lose words: docs/quickstart_results.md, "Codec intelligibility")."""


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def single_thread():
    """Run torch on one intra-op thread inside the block (restored after).

    Encoding runs thousands of tiny ops (one Whisper log-mel per clip); on a small, busy CPU a second
    OpenMP thread only adds synchronisation stalls (measured: ~1 ms vs ~50 ms per clip on 2 cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _datasets_progress(show: bool):
    """Show or hide `datasets`' progress bars inside the block (restored after)."""
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()


def _records(task: str, splits: Iterable[str], limit: int | None = None) -> dict[str, list[dict]]:
    out = {}
    for split in splits:
        records = read_demo_records(task, split, absolute_paths=True)
        out[split] = records[:limit] if limit is not None else records
    return out


def demo_corpus_texts(asr_instruction: str = ASR_INSTRUCTION) -> list[str]:
    """Every text of the corpus (all splits): text_qa and spoken_qa questions and answers, ASR
    transcripts, and the ASR instruction. What the demo tokenizer is fitted on."""
    texts = [asr_instruction]
    for split in SPLITS:
        for task in ("text_qa", "spoken_qa"):
            for record in read_demo_records(task, split, absolute_paths=False):
                texts += [record["question_text"], record["answer_text"]]
        texts += [record["text"] for record in read_demo_records("asr", split, absolute_paths=False)]
    return texts


# ---------------------------------------------------------------------------------------------- conversations
def text_qa_conversation(question: str, answer: str | None = None) -> list[dict]:
    """Text question (-> text answer). Without `answer`, a prompt for generation."""
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _audio_part(audio, transcript: str | None) -> dict:
    return {"type": "audio", "audio": audio} | ({"transcript": transcript} if transcript else {})


def spoken_question_conversation(audio, answer: str | None = None, answer_codes=None,
                                 question: str | None = None) -> list[dict]:
    """Spoken question (path, array dict, ...) -> text answer, or text + speech answer when
    `answer_codes` (`[N, frames]`) is given. Without `answer`, a prompt for generation. `question`: the
    clip's transcript (the CTC adapter's training target)."""
    messages = [{"role": "user", "content": [_audio_part(audio, question)]}]
    if answer is not None:
        content = [{"type": "text", "text": answer}]
        if answer_codes is not None:
            content.append({"type": "audio", "audio_codes": answer_codes})
        messages.append({"role": "assistant", "content": content})
    return messages


def asr_conversation(audio, transcript: str | None = None, instruction: str = ASR_INSTRUCTION) -> list[dict]:
    """ASR instruction + audio -> transcript. Without `transcript`, a prompt for generation."""
    content = ([{"type": "text", "text": instruction}] if instruction else []) + [_audio_part(audio, transcript)]
    messages = [{"role": "user", "content": content}]
    if transcript is not None:
        messages.append({"role": "assistant", "content": transcript})
    return messages


# ---------------------------------------------------------------------------------------------- builders
def build_demo_tokenizer(corpus_texts: Sequence[str] | None = None, vocab_size: int = 400):
    """`train_demo_tokenizer` over `corpus_texts` (default: :func:`demo_corpus_texts`, every text of
    the corpus). Deterministic; ~20 ms."""
    from ..processing.tokenizer import train_demo_tokenizer

    texts = list(corpus_texts) if corpus_texts is not None else demo_corpus_texts()
    return train_demo_tokenizer(texts, vocab_size=vocab_size)


ANSWER_AUDIO_COLUMNS = ("answer_audio", "answer_sentence_audio")
"""The spoken_qa columns of assistant-voice answers: the one-word answer and the sentence answer."""


def demo_answer_audio_paths(
    splits: Iterable[str] = ("train",), columns: Iterable[str] = ("answer_audio",)
) -> list[str]:
    """Sorted distinct answer-audio files of `columns` (all in the assistant voice): by default one per answer
    word; `ANSWER_AUDIO_COLUMNS` adds the sentence answers."""
    columns = tuple(columns)
    if unknown := [c for c in columns if c not in ANSWER_AUDIO_COLUMNS]:
        raise ValueError(f"columns={unknown} are not answer-audio columns; use {ANSWER_AUDIO_COLUMNS}.")
    records = [r for s in splits for r in read_demo_records("spoken_qa", s, absolute_paths=True)]
    return sorted({r[column] for r in records for column in columns})


def fit_demo_codec(*, splits: Iterable[str] = ("train",), columns: Iterable[str] = ANSWER_AUDIO_COLUMNS, iters: int = 8,
                   seed: int = 0, **codec_options):
    """A :class:`MelVQCodec` fitted on the distinct assistant-voice answer files of `splits` and `columns`
    (see :func:`demo_answer_audio_paths`).

    The default fits on the train split's one-word and sentence answers (~8 minutes of audio; held-out
    records share a recording with a train record only where their answers are the same words); the codec
    still encodes anything else the same voice says. Fitted
    on the one-word answers alone (`columns=("answer_audio",)`), it cannot say a sentence. `codec_options`
    override :data:`DEFAULT_CODEC_OPTIONS` (e.g. `codebook_size=64`, `frames_per_step=4` for 12.5 steps/s
    with 8 streams). Seeded and deterministic; ~5 s on one CPU core (~1.5 s with `iters=3`).
    """
    from ..data.demo_corpus import DEMO_SAMPLING_RATE, load_demo_audio
    from ..processing.codecs import MelVQCodec

    options = {**DEFAULT_CODEC_OPTIONS, **codec_options}
    waveforms = [load_demo_audio(path)["array"] for path in demo_answer_audio_paths(splits, columns)]
    with single_thread():
        return MelVQCodec(**options).fit(waveforms, DEMO_SAMPLING_RATE, iters=iters, seed=seed)


def build_demo_processor(tokenizer, codec, audio_adapter_stride: int = 4, **kwargs):
    """The :class:`DeepTalkProcessor` for `tokenizer` and `codec`'s layout (`num_streams` x
    `codebook_size`, default delays `i + 1`). `kwargs` go to `from_codec_layout` (e.g. `delays`)."""
    from ..processing.processing_deeptalk import DeepTalkProcessor

    return DeepTalkProcessor.from_codec_layout(
        tokenizer, codec.num_streams, codec.codebook_size, audio_adapter_stride=audio_adapter_stride, **kwargs
    )


def encode_answer_audio(codec, paths: Iterable[str], cache: dict | None = None) -> dict[str, torch.Tensor]:
    """`{path: codes [N, frames]}` for each distinct path, encoded once (`cache` is filled in place)."""
    from ..data.demo_corpus import DEMO_SAMPLING_RATE, load_demo_audio

    cache = {} if cache is None else cache
    with single_thread(), torch.no_grad():
        for path in dict.fromkeys(paths):
            if path not in cache:
                waveform = torch.from_numpy(load_demo_audio(path)["array"])
                cache[path] = codec.encode(waveform, DEMO_SAMPLING_RATE).cpu()
    return cache


def _features():
    import datasets

    ids = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
    return datasets.Features({
        "id": datasets.Value("string"),
        "task": datasets.Value("string"),
        "target_text": datasets.Value("string"),
        "input_ids": ids,
        "labels": ids,
        "audio_input_mask": datasets.Sequence(datasets.Value("bool")),
        "input_features": datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32")))),
        "audio_feature_lengths": datasets.Sequence(datasets.Value("int64")),
        "audio_transcript_ids": ids,
    })


@dataclass
class DemoData:
    """The demo corpus encoded for every phase (see the module docstring).

    Attributes:
        processor, codec: what encoded it.
        text_qa, asr, spoken_qa_speech, spoken_qa_text: `datasets.DatasetDict`s (one `Dataset` per
            split) with the processor's unpadded columns + `id`, `task`, `target_text`.
        records: raw corpus records, `records[corpus_task][split]` for `"text_qa"`, `"spoken_qa"`,
            `"asr"` (absolute audio paths), as encoded (after `limit`).
        answer_codes: `{answer audio path: codes [N, frames]}`, the codec cache.
        timings: seconds spent per step.
    """

    processor: object
    codec: object
    text_qa: object
    asr: object
    spoken_qa_speech: object
    spoken_qa_text: object
    records: dict[str, dict[str, list[dict]]]
    answer_codes: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def test_records(self) -> dict[str, list[dict]]:
        """`{corpus task: raw test records}` (empty lists if the test split was not built)."""
        return {task: splits.get("test", []) for task, splits in self.records.items()}

    def dataset(self, name: str):
        """The `DatasetDict` called `name` (one of :data:`DEMO_TASKS`)."""
        if name not in DEMO_TASKS:
            raise ValueError(f"Unknown demo dataset {name!r}; choose one of {DEMO_TASKS}.")
        return getattr(self, name)

    def phase_dataset(self, phase: str, split: str = "train", seed: int | None = 0):
        """The `split` of every dataset phase `phase` uses (:data:`PHASES`; recipe names such as
        `"joint"` work too, :data:`PHASE_ALIASES`), concatenated and, when `seed` is not None and there
        are several, shuffled."""
        phase = PHASE_ALIASES.get(phase, phase)
        if phase not in PHASES:
            raise ValueError(f"Unknown phase {phase!r}; choose one of {list(PHASES)} or {list(PHASE_ALIASES)}.")
        return self.tasks_dataset(PHASES[phase], split, seed)

    def tasks_dataset(self, tasks, split: str = "train", seed: int | None = 0):
        """The `split` of the datasets `tasks` (names in :data:`DEMO_TASKS`), concatenated and, when
        `seed` is not None and there are several, shuffled."""
        import datasets

        unknown = [t for t in tasks if t not in DEMO_TASKS]
        if unknown or not tasks:
            raise ValueError(f"Unknown demo tasks {unknown or tasks!r}; choose from {DEMO_TASKS}.")
        parts = [self.dataset(name)[split] for name in tasks]
        if len(parts) == 1:
            return parts[0]
        joined = datasets.concatenate_datasets(parts)
        return joined.shuffle(seed=seed) if seed is not None else joined

    def sizes(self) -> dict[str, dict[str, int]]:
        """`{dataset: {split: rows}}`."""
        return {name: {split: len(ds) for split, ds in self.dataset(name).items()} for name in DEMO_TASKS}

    def max_length(self) -> dict[str, int]:
        """Longest encoded example (positions) per dataset, over all its splits."""
        return {
            name: max((len(m) for ds in self.dataset(name).values() for m in ds["audio_input_mask"]), default=0)
            for name in DEMO_TASKS
        }


def _encode_dataset(processor, rows: list[dict], conversation, batch_size: int):
    """rows -> Dataset.from_list(...).map(batched) calling processor.encode_batch."""
    import datasets

    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in _features()}, features=_features())
    source = datasets.Dataset.from_list(rows)

    def encode(batch):
        keys = list(batch)
        examples = [dict(zip(keys, values)) for values in zip(*batch.values())]
        encoded = processor.encode_batch([conversation(e) for e in examples])
        return {
            "id": batch["id"],
            "task": batch["task"],
            "target_text": batch["target_text"],
            **encoded,
        }

    return source.map(encode, batched=True, batch_size=batch_size, remove_columns=source.column_names,
                      features=_features(), desc=None)


def build_demo_data(
    processor,
    codec,
    *,
    splits: Sequence[str] = SPLITS,
    tasks: Sequence[str] = DEMO_TASKS,
    limit: int | None = None,
    asr_instruction: str = ASR_INSTRUCTION,
    answer_codes: dict | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> DemoData:
    """Encode the demo corpus for every phase with `processor` (and `codec` for spoken answers).

    Args:
        splits: which corpus splits to encode.
        tasks: which of :data:`DEMO_TASKS` to build (the others are empty `DatasetDict`s).
        limit: keep only the first `limit` records of each task/split (fast tests).
        asr_instruction: text before the audio in ASR user turns.
        answer_codes: a codec cache (`{path: codes}`) to reuse and fill.
        batch_size: `datasets.map` batch size.
        progress: show `datasets`' progress bars.

    The whole corpus (1167 text, 420 ASR, 2 x 360 spoken QA examples) takes ~3 s on 2 CPU cores
    (~55 MB of Arrow tables, mostly log-mel features).
    """
    import datasets

    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise ValueError(f"Unknown demo tasks {unknown}; choose from {DEMO_TASKS}.")
    if processor.layout.num_audio_streams != codec.num_streams or processor.layout.codebook_size != codec.codebook_size:
        raise ValueError(
            f"The processor's layout ({processor.layout.num_audio_streams} streams x {processor.layout.codebook_size}) "
            f"does not match the codec ({codec.num_streams} x {codec.codebook_size}): "
            "build it with build_demo_processor."
        )
    timings: dict[str, float] = {}
    records = {
        "text_qa": _records("text_qa", splits, limit),
        "asr": _records("asr", splits, limit),
        "spoken_qa": _records("spoken_qa", splits, limit),
    }
    cache = {} if answer_codes is None else answer_codes
    start = time.perf_counter()
    if {"spoken_qa_speech"} & set(tasks):
        encode_answer_audio(codec, (r["answer_audio"] for rs in records["spoken_qa"].values() for r in rs), cache)
    timings["answer_codes"] = time.perf_counter() - start

    builders = {
        "text_qa": (
            "text_qa",
            lambda r: {
                "id": r["id"], "task": "text_qa", "target_text": r["answer_text"], "question": r["question_text"]
            },
            lambda e: text_qa_conversation(e["question"], e["target_text"]),
        ),
        "asr": (
            "asr",
            lambda r: {"id": r["id"], "task": "asr", "target_text": r["text"], "audio": r["audio"]},
            lambda e: asr_conversation(e["audio"], e["target_text"], asr_instruction),
        ),
        "spoken_qa_speech": (
            "spoken_qa",
            lambda r: {"id": r["id"], "task": "spoken_qa_speech", "target_text": r["answer_text"],
                       "audio": r["question_audio"], "answer_audio": r["answer_audio"], "question": r["question_text"]},
            lambda e: spoken_question_conversation(e["audio"], e["target_text"], cache[e["answer_audio"]],
                                                   e["question"]),
        ),
        "spoken_qa_text": (
            "spoken_qa",
            lambda r: {
                "id": r["id"], "task": "spoken_qa_text", "target_text": r["answer_text"], "audio": r["question_audio"],
                "question": r["question_text"],
            },
            lambda e: spoken_question_conversation(e["audio"], e["target_text"], question=e["question"]),
        ),
    }
    built = {}
    with single_thread(), _datasets_progress(progress):
        for name in DEMO_TASKS:
            start = time.perf_counter()
            corpus_task, row, conversation = builders[name]
            built[name] = datasets.DatasetDict(
                {
                    split: _encode_dataset(
                        processor, [row(r) for r in records[corpus_task][split]], conversation, batch_size
                    )
                    for split in splits
                    if name in tasks
                }
            )
            timings[name] = time.perf_counter() - start
    timings["total"] = sum(timings.values())
    return DemoData(processor=processor, codec=codec, records=records, answer_codes=cache, timings=timings, **built)
