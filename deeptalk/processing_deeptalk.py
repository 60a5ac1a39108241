"""`DeepTalkProcessor`: conversations with speech and text -> the model's multi-stream inputs.

This file is remote code: saved model folders carry it (with `configuration_deeptalk.py`), and
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)` builds the processor where the deeptalk
package is not installed. User audio is read by the package's `load_audio` when deeptalk is installed,
else by `read_audio` here (soundfile for files, torchaudio to resample).

A conversation is a list of chat messages (transformers' multimodal chat format):

    [{"role": "user", "content": [{"type": "audio", "audio": "question.flac"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "seven"},
                                        {"type": "audio", "audio_codes": codes}]}]   # codes: [N, frames]

The chat template renders the text stream with two placeholders; the processor then builds every
stream position by position:

* user audio (`<|audio_in|>`) becomes `BOA, AUDIO_IN x n, EOA` in the audio streams (text stream
  PAD_T), where n = `num_audio_positions(mel frames)`; the model splices the Whisper adapter's
  outputs in at the AUDIO_IN positions (`audio_input_mask`).
* an assistant turn with speech (`<|speech_turn|>`) becomes the delayed text + speech layout
  (`SpeechTokenLayout.build_delayed_layout`);
* every other text token sits in the text stream with PAD_A in the audio streams.

Labels follow the paper: only the last assistant turn is learned (its text + EOT, and its codes +
EOA for each audio stream); everything else is -100.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin, WhisperFeatureExtractor

from .configuration_deeptalk import AUDIO_SPECIAL_TOKENS, SpeechTokenLayout, num_audio_positions, voice_token

TEXT_SPECIAL_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "eot": "<|eot|>",  # ends a turn's text (the paper's EOT)
    "pad_t": "<|pad_t|>",  # fills the text stream while speech goes on (PAD_T)
    "audio_in": "<|audio_in|>",  # placeholder for a user audio segment (expanded by the processor)
    "speech_turn": "<|speech_turn|>",  # placeholder for an assistant turn laid out as text + speech
}
"""Special tokens of the text stream. The two placeholders never reach the model: the processor
replaces them by the audio segment and by the delayed text+speech layout."""


def add_deeptalk_tokens(tokenizer) -> int:
    """Add DeepTalk's text specials to `tokenizer` (a pad token too if it has none). Returns how
    many were added; resize the model's text block to `len(tokenizer)` afterwards."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(TEXT_SPECIAL_TOKENS.values())})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = TEXT_SPECIAL_TOKENS["pad_t"]
    return added


IGNORE_INDEX = -100

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] + '<|eot|>' -}}"
    "{%- elif message['role'] == 'assistant' and "
    "(message['content'] | selectattr('type', 'equalto', 'audio') | list | length) > 0 -%}"
    "{{- '<|speech_turn|>' -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' -%}{{- '<|audio_in|>' -}}{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|eot|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""Renders the text stream: `<|role|>` markers, text, `<|eot|>` after each turn, and the two
placeholders the processor expands (`<|audio_in|>` per user audio, `<|speech_turn|>` for an
assistant turn that speaks)."""


class DeepTalkProcessor(ProcessorMixin):
    r"""Tokenizer + Whisper feature extractor + the speech token layout, in one processor.

    Args:
        feature_extractor (`WhisperFeatureExtractor`): log-mel features of user audio (16 kHz).
        tokenizer: the LLM's tokenizer, with DeepTalk's text specials (`add_deeptalk_tokens`).
        chat_template (`str`, *optional*): defaults to `DEFAULT_CHAT_TEMPLATE`.
        speech_layout (`dict`): `SpeechTokenLayout` fields (text vocabulary size, number of audio
            streams, codebook size, delays, EOT / PAD_T ids). Build it with `from_codec_layout`.
        audio_adapter_stride (`int`), audio_pad_to_30s (`bool`): must match the model's config; they
            decide how many positions a clip takes.
        max_audio_seconds (`float`): longer user audio is rejected (Whisper sees 30 s at most).
    """

    attributes = ["feature_extractor", "tokenizer"]

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        speech_layout: dict | None = None,
        audio_adapter_stride: int = 4,
        audio_pad_to_30s: bool = False,
        max_audio_seconds: float = 30.0,
    ):
        if speech_layout is None:
            raise ValueError(
                "DeepTalkProcessor needs a speech_layout; build one with DeepTalkProcessor.from_codec_layout."
            )
        self.speech_layout = dict(speech_layout)
        self.audio_adapter_stride = int(audio_adapter_stride)
        self.audio_pad_to_30s = bool(audio_pad_to_30s)
        self.max_audio_seconds = float(max_audio_seconds)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)
        self.layout = SpeechTokenLayout(**self.speech_layout)
        self._special_ids = {
            name: tokenizer.convert_tokens_to_ids(token) for name, token in TEXT_SPECIAL_TOKENS.items()
        }
        unknown = [
            TEXT_SPECIAL_TOKENS[n] for n, i in self._special_ids.items() if i is None or i == tokenizer.unk_token_id
        ]
        if unknown:
            raise ValueError(
                f"The tokenizer lacks DeepTalk's special tokens {unknown}: call add_deeptalk_tokens(tokenizer)."
            )
        if self.layout.text_vocab_size < len(tokenizer):
            raise ValueError(
                f"speech_layout.text_vocab_size={self.layout.text_vocab_size} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens): rebuild the layout after adding tokens."
            )

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_codec_layout(
        cls,
        tokenizer,
        num_audio_streams: int,
        codebook_size: int,
        *,
        delays: list[int] | None = None,
        text_vocab_size: int | None = None,
        feature_extractor=None,
        voices: Sequence[str] = (),
        **kwargs,
    ) -> DeepTalkProcessor:
        """Processor for a codec's layout (e.g. `codec.num_streams`, `codec.codebook_size`). Adds
        DeepTalk's specials to `tokenizer`; the text block covers at least `len(tokenizer)` ids.
        `voices` adds one voice (speaker) token per name to every audio stream; an assistant turn
        picks one with `"voice": NAME` and generation with `voice=NAME`."""
        add_deeptalk_tokens(tokenizer)
        layout = SpeechTokenLayout(
            text_vocab_size=max(text_vocab_size or 0, len(tokenizer)),
            num_audio_streams=num_audio_streams,
            codebook_size=codebook_size,
            eot_id=tokenizer.convert_tokens_to_ids(TEXT_SPECIAL_TOKENS["eot"]),
            pad_t_id=tokenizer.convert_tokens_to_ids(TEXT_SPECIAL_TOKENS["pad_t"]),
            delays=list(delays or []),
            audio_special_tokens=[*AUDIO_SPECIAL_TOKENS, *(voice_token(v) for v in voices)],
        )
        feature_extractor = feature_extractor or WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
        return cls(feature_extractor, tokenizer, speech_layout=layout.to_dict(), **kwargs)

    def model_speech_kwargs(self) -> dict:
        """Arguments for `DeepTalkForCausalLM.add_speech` that make the model match this processor."""
        return {"layout": self.layout, "audio_adapter_stride": self.audio_adapter_stride,
                "audio_pad_to_30s": self.audio_pad_to_30s}

    def num_audio_positions(self, mel_frames: int) -> int:
        return num_audio_positions(mel_frames, self.audio_adapter_stride, self.audio_pad_to_30s)

    # ---- one conversation -----------------------------------------------------------------------
    def encode_conversation(self, messages: list[dict], *, audio: Sequence | None = None,
                            add_generation_prompt: bool = False, codec=None) -> dict:
        """One conversation -> unpadded model inputs (lists / arrays, `datasets`-friendly).

        `audio` fills, in order, audio parts given without data (`{"type": "audio"}`), e.g. from a
        `datasets.Audio` column. Assistant speech comes as `audio_codes` ([N, frames]) or as a
        waveform encoded with `codec`. A user audio part may carry its `"transcript"`: its text ids
        become the clip's row of `audio_transcript_ids` (the CTC adapter's training target; empty without).
        """
        messages = [_without_unset_fields(message) for message in messages]
        self._check_turns(messages, add_generation_prompt)
        pending_audio = list(audio) if audio is not None else []
        user_clips, transcripts, speech_turns = [], [], []
        for message in messages:
            if isinstance(message["content"], str):
                self._check_text(message["content"])
                continue
            for part in message["content"]:
                kind = part.get("type")
                if kind == "text":
                    self._check_text(part.get("text", ""))
                elif kind != "audio":
                    raise ValueError(
                        f"Unknown content type {kind!r} in a {message['role']} turn: use 'text' or 'audio'."
                    )
            if message["role"] == "assistant" and any(p["type"] == "audio" for p in message["content"]):
                speech_turns.append(self._assistant_turn(message, codec, pending_audio))
            else:
                for part in message["content"]:
                    if part["type"] == "audio":
                        user_clips.append(self._user_clip(part, pending_audio))
                        text = part.get("transcript")
                        transcripts.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else [])
        if pending_audio:
            raise ValueError(
                f"{len(pending_audio)} audio input(s) left over: the conversation has fewer empty audio parts."
            )

        features, lengths = [], []
        for clip in user_clips:
            mel = self.feature_extractor(clip, sampling_rate=self.feature_extractor.sampling_rate, padding="longest",
                                         return_attention_mask=True, return_tensors="np")
            length = int(mel["attention_mask"][0].sum())
            features.append(mel["input_features"][0, :, :length].astype(np.float32))
            lengths.append(length)

        rendered = self.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self._lay_out(ids, lengths, speech_turns, learn_last_turn=not add_generation_prompt) | {
            "input_features": features,
            "audio_feature_lengths": lengths,
            "audio_transcript_ids": transcripts,
        }

    def _lay_out(self, ids, clip_lengths, speech_turns, learn_last_turn: bool) -> dict:
        layout, special = self.layout, self._special_ids
        pad_a = [layout.audio_special_id("<|pad_a|>", i) for i in range(layout.num_audio_streams)]
        columns, label_columns, audio_mask = [], [], []
        learning = False
        last_assistant = max((i for i, t in enumerate(ids) if t == special["assistant"]), default=-1)
        clips, turns = iter(clip_lengths), iter(speech_turns)
        for position, token in enumerate(ids):
            if token == special["audio_in"]:
                n = self.num_audio_positions(next(clips))
                for name, count, is_input in (("<|boa|>", 1, False), ("<|audio_in|>", n, True), ("<|eoa|>", 1, False)):
                    audio = [layout.audio_special_id(name, i) for i in range(layout.num_audio_streams)]
                    for _ in range(count):
                        columns.append([layout.pad_t_id, *audio])
                        label_columns.append([IGNORE_INDEX] * layout.num_streams)
                        audio_mask.append(is_input)
            elif token == special["speech_turn"]:
                text_ids, codes, voice = next(turns)
                grid = layout.build_delayed_layout(text_ids, codes, voice=voice)
                learn = learning and learn_last_turn
                labels = self._speech_turn_labels(grid, len(text_ids), codes.shape[1]) if learn else None
                for step in range(grid.shape[1]):
                    columns.append(grid[:, step].tolist())
                    label_columns.append(labels[:, step].tolist() if learn else [IGNORE_INDEX] * layout.num_streams)
                    audio_mask.append(False)
                learning = False
            else:
                columns.append([token, *pad_a])
                target = token if learning and learn_last_turn else IGNORE_INDEX
                label_columns.append([target] + [IGNORE_INDEX] * layout.num_audio_streams)
                audio_mask.append(False)
                if token == special["eot"]:
                    learning = False
            if position == last_assistant:
                learning = True  # the tokens after the last <|assistant|> marker are the answer
        return {
            "input_ids": np.array(columns, dtype=np.int64).T.tolist(),
            "labels": np.array(label_columns, dtype=np.int64).T.tolist(),
            "audio_input_mask": audio_mask,
        }

    def _speech_turn_labels(self, grid: torch.Tensor, text_length: int, frames: int) -> torch.Tensor:
        """Learn the answer's text + EOT and each stream's codes + EOA; not the pads around them."""
        labels = torch.full_like(grid, IGNORE_INDEX)
        labels[0, : text_length + 1] = grid[0, : text_length + 1]
        for i, delay in enumerate(self.layout.delays):
            labels[i + 1, delay : delay + frames + 1] = grid[i + 1, delay : delay + frames + 1]
        return labels

    def _user_clip(self, part: dict, pending_audio: list) -> np.ndarray:
        source = part.get("audio", part.get("path"))
        if source is None:
            if not pending_audio:
                raise ValueError("An audio part has no data and no audio=... input is left to fill it.")
            source = pending_audio.pop(0)
        return load_user_audio(source, part.get("sampling_rate"),
                               target_sampling_rate=self.feature_extractor.sampling_rate,
                               max_seconds=self.max_audio_seconds)

    def _assistant_turn(self, message: dict, codec, pending_audio: list) -> tuple[list[int], torch.Tensor, str | None]:
        text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        audio_parts = [p for p in message["content"] if p["type"] == "audio"]
        if len(audio_parts) != 1:
            raise ValueError("An assistant turn carries at most one spoken answer (one audio part).")
        part = audio_parts[0]
        if "audio_codes" in part:
            codes = part["audio_codes"]
            if not isinstance(codes, torch.Tensor):
                codes = np.asarray(codes)
                if codes.dtype == object:  # rows of arrays (numpy-formatted Arrow rows)
                    codes = np.stack([np.asarray(row) for row in part["audio_codes"]])
            codes = torch.as_tensor(codes, dtype=torch.long)
        else:
            if codec is None:
                raise ValueError(
                    "The assistant's audio is a waveform but no codec was given: pass codec=... (e.g. a "
                    "SNACCodec or MelVQCodec) or give the answer as audio_codes=[N, frames]."
                )
            source = part.get("audio", part.get("path"))
            if source is None and pending_audio:
                source = pending_audio.pop(0)
            waveform = load_user_audio(source, part.get("sampling_rate"), target_sampling_rate=codec.sampling_rate)
            codes = codec.encode(torch.from_numpy(waveform), codec.sampling_rate)
        if codes.dim() != 2 or codes.shape[0] != self.layout.num_audio_streams:
            raise ValueError(
                f"audio_codes must be [num_audio_streams={self.layout.num_audio_streams}, frames], "
                f"got {tuple(codes.shape)}."
            )
        return text_ids, codes, part.get("voice", message.get("voice"))

    def _check_turns(self, messages, add_generation_prompt: bool):
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("A conversation is a non-empty list of {'role': ..., 'content': ...} messages.")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"Message {i} is a {type(message).__name__}, not a mapping: write it as "
                                 "{'role': 'user', 'content': '...'}.")
        roles = [m.get("role") for m in messages]
        for i, role in enumerate(roles):
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"Message {i} has role {role!r}: use 'system', 'user' or 'assistant'.")
            if role == "system" and i != 0:
                raise ValueError(f"Message {i} is a system message: only the first message may be one.")
            self._check_content(messages[i], i)
        turns = roles[1:] if roles[0] == "system" else roles
        for i, role in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(
                    f"Chat turns are out of order at message {i + (roles[0] == 'system')}: expected {expected!r}, got "
                    f"{role!r}. Turns alternate user, assistant, user, ... starting with the user."
                )
        if add_generation_prompt and turns[-1:] != ["user"]:
            raise ValueError("add_generation_prompt=True needs the conversation to end with a user turn.")
        if not add_generation_prompt and turns[-1:] != ["assistant"]:
            raise ValueError(
                "A training conversation ends with the assistant turn to learn (or pass add_generation_prompt=True)."
            )

    @staticmethod
    def _check_content(message: dict, i: int):
        """The message's 'content': a string, or a non-empty list of text / audio parts."""
        where = f"Message {i} ({message['role']})"
        if "content" not in message:
            raise ValueError(f"{where} has no 'content': give a string or a list of parts.")
        content = message["content"]
        if isinstance(content, str):
            return
        if not isinstance(content, (list, tuple)):
            raise ValueError(f"{where}: 'content' must be a string or a list of parts such as "
                             f"{{'type': 'text', 'text': '...'}}, got {type(content).__name__} {content!r:.40}.")
        if not content:
            raise ValueError(f"{where}: 'content' is an empty list; give at least one text or audio part.")
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(f"{where}, part {j}: a part is a mapping such as {{'type': 'text', 'text': '...'}}, "
                                 f"got {type(part).__name__} {part!r:.40}.")
            kind = part.get("type")
            if kind not in ("text", "audio"):
                raise ValueError(f"{where}, part {j}: 'type' is {kind!r}; use 'text' or 'audio'.")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"{where}, part {j}: a text part needs 'text' as a string, got "
                                 f"{type(part.get('text')).__name__} {part.get('text')!r:.40}.")

    def _check_text(self, text: str):
        reserved = [t for t in [*TEXT_SPECIAL_TOKENS.values(), *self.tokenizer.all_special_tokens] if t and t in text]
        if reserved:
            raise ValueError(
                f"Message text contains reserved special token(s) {sorted(set(reserved))}; remove them "
                "(the processor inserts all special tokens itself)."
            )

    # ---- batches --------------------------------------------------------------------------------
    def __call__(self, conversations, *, audio=None, add_generation_prompt: bool = False, codec=None,
                 padding_side: str = "right", return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """Conversations (one, or a list) -> padded tensors: `input_ids` / `labels` `[B, 1 + N, T]`,
        `attention_mask` / `audio_input_mask` `[B, T]`, `input_features` `[clips, 80, frames]`,
        `audio_feature_lengths` `[clips]`. Left padding suits generation."""
        examples = self.encode_batch(
            conversations, audio=audio, add_generation_prompt=add_generation_prompt, codec=codec
        )
        rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
        return self.pad(rows, padding_side=padding_side, return_tensors=return_tensors)

    def encode_batch(self, conversations, *, audio=None, add_generation_prompt: bool = False, codec=None) -> dict:
        """Column-wise unpadded encodings, for `datasets.Dataset.map(batched=True)`."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
            audio = None if audio is None else [audio]
        out: dict[str, list] = {}
        for i, messages in enumerate(conversations):
            clip = None if audio is None else audio[i]
            clip = None if clip is None else (clip if isinstance(clip, (list, tuple)) else [clip])
            try:
                encoded = self.encode_conversation(messages, audio=clip, add_generation_prompt=add_generation_prompt,
                                                   codec=codec)
            except ValueError as err:
                if len(conversations) == 1:
                    raise
                raise ValueError(f"Conversation {i}: {err}") from None
            for key, value in encoded.items():
                out.setdefault(key, []).append(value)
        return out

    def pad(self, examples: list[dict], padding_side: str = "right", return_tensors: str = "pt") -> BatchFeature:
        """Pad encoded examples into a batch (the data collator's job)."""
        layout = self.layout
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        length = max(len(e["audio_input_mask"]) for e in examples)
        audio_pads = [layout.audio_special_id("<|pad_a|>", i) for i in range(layout.num_audio_streams)]
        pad_column = torch.tensor([layout.pad_t_id] + audio_pads)
        input_ids = pad_column[None, :, None].repeat(len(examples), 1, length)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
        audio_input_mask = torch.zeros(len(examples), length, dtype=torch.bool)
        features, lengths, transcripts = [], [], []
        for b, example in enumerate(examples):
            n = len(example["audio_input_mask"])
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[b, :, span] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[b, :, span] = torch.as_tensor(example["labels"], dtype=torch.long)
            attention_mask[b, span] = 1
            audio_input_mask[b, span] = torch.as_tensor(example["audio_input_mask"], dtype=torch.bool)
            # rows formatted as numpy / torch (`Dataset.with_format`) hold arrays: test for None, not truthiness
            clips = example.get("input_features")
            if clips is not None and len(clips):
                features.extend(torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in clips)
                lengths.extend(int(n) for n in example["audio_feature_lengths"])
                rows = example.get("audio_transcript_ids")
                transcripts.extend([list(r) for r in rows] if rows is not None else [[]] * len(clips))
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "audio_input_mask": audio_input_mask,
        }
        if features:
            frames = max(f.shape[-1] for f in features)
            batch["input_features"] = torch.stack(
                [torch.nn.functional.pad(f, (0, frames - f.shape[-1])) for f in features]
            )
            batch["audio_feature_lengths"] = torch.tensor(lengths, dtype=torch.long)
            if any(transcripts):
                longest = max(len(t) for t in transcripts)
                batch["audio_transcript_ids"] = torch.tensor(
                    [[int(i) for i in t] + [IGNORE_INDEX] * (longest - len(t)) for t in transcripts], dtype=torch.long)
        return BatchFeature(batch, tensor_type=return_tensors)

    # ---- outputs --------------------------------------------------------------------------------
    def decode_turn(self, grid) -> tuple[str, torch.Tensor]:
        """A generated assistant layout `[1 + N, steps]` -> (text, codes `[N, frames]`)."""
        text_ids, codes = self.layout.undelay_layout(torch.as_tensor(grid))
        return self.tokenizer.decode(text_ids.tolist(), skip_special_tokens=True), codes

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "audio_input_mask", "input_features", "audio_feature_lengths"]


class DeepTalkDataCollator:
    """Turns examples into a padded batch with per-stream labels. Accepts examples already encoded
    by `DeepTalkProcessor.encode_batch` (e.g. stored by `datasets.map`) or raw `{"messages": ...}`
    conversations (optionally with an `"audio"` entry), which it encodes on the fly."""

    def __init__(self, processor: DeepTalkProcessor, padding_side: str = "right", codec=None):
        self.processor, self.padding_side, self.codec = processor, padding_side, codec

    def __call__(self, examples: list[dict]) -> BatchFeature:
        encoded = []
        for example in examples:
            if "input_ids" in example:
                encoded.append(example)
            else:
                audio = example.get("audio")
                audio = None if audio is None else (audio if isinstance(audio, (list, tuple)) else [audio])
                encoded.append(self.processor.encode_conversation(example["messages"], audio=audio, codec=self.codec))
        return self.processor.pad(encoded, padding_side=self.padding_side)


def _without_unset_fields(message):
    """A message with its content parts' unset (None) fields dropped: rows read from Arrow datasets carry
    every field of the schema in every part (`{"type": "text", "text": ..., "audio": None, "audio_codes": None}`)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), (list, tuple)):
        return message
    parts = []
    for part in message["content"]:
        if isinstance(part, dict):
            part = {k: v for k, v in part.items() if v is not None}
            if isinstance(part.get("audio"), dict):
                part["audio"] = {k: v for k, v in part["audio"].items() if v is not None}
        parts.append(part)
    return {**{k: v for k, v in message.items() if v is not None}, "content": parts}


# ---- user audio -------------------------------------------------------------------------------------
def load_user_audio(source, sampling_rate=None, *, target_sampling_rate: int,
                    max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 samples at `target_sampling_rate`: deeptalk's `load_audio` (thorough checks, every
    source kind) where the package is installed, else `read_audio`."""
    try:
        from deeptalk.processing.audio import load_audio
    except ImportError:
        return read_audio(source, sampling_rate, target_sampling_rate=target_sampling_rate, max_seconds=max_seconds)
    return load_audio(source, sampling_rate, target_sampling_rate=target_sampling_rate, max_seconds=max_seconds)


def read_audio(source, sampling_rate=None, *, target_sampling_rate: int,
               max_seconds: float | None = None) -> np.ndarray:
    """A small reader for where the deeptalk package is absent: an audio file's path or bytes (read with
    soundfile), a `{"array", "sampling_rate"}` or `{"path"}` / `{"bytes"}` dict, or float samples with their
    `sampling_rate`. Channels are averaged; other rates are resampled with torchaudio."""
    if isinstance(source, dict):
        if source.get("array") is not None:
            source, sampling_rate = source["array"], source.get("sampling_rate", sampling_rate)
        else:
            source = source.get("bytes") if source.get("bytes") is not None else source.get("path")
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise FileNotFoundError(f"Audio file {os.fspath(source)!r} does not exist.")
        try:
            import soundfile
        except ImportError:
            raise ImportError("Reading audio files needs soundfile: `pip install soundfile` (or pass the samples "
                              "with their sampling_rate).") from None
        file = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        samples, rate = soundfile.read(file, dtype="float32", always_2d=True)
        samples = samples.mean(axis=1)
    else:
        if sampling_rate is None:
            raise ValueError("Audio given as samples needs its sampling_rate, e.g. "
                             "{'array': x, 'sampling_rate': 16000}.")
        samples = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
        if not np.issubdtype(samples.dtype, np.floating):
            raise ValueError(f"Audio samples must be floats in [-1, 1], got {samples.dtype}; scale integer PCM first "
                             "(e.g. x.astype('float32') / 32768 for 16-bit).")
        if samples.ndim == 2:  # the smaller axis holds the channels
            samples = samples.mean(axis=int(np.argmin(samples.shape)))
        if samples.ndim != 1:
            raise ValueError(f"Audio samples must be [samples] or [channels, samples], got shape {samples.shape}.")
        rate = int(sampling_rate)
    if samples.size == 0:
        raise ValueError("The audio is empty (0 samples).")
    if max_seconds is not None and samples.size / rate > max_seconds:
        raise ValueError(f"The audio lasts {samples.size / rate:.1f} s; at most {max_seconds:g} s are accepted.")
    if rate != target_sampling_rate:
        try:
            import torchaudio.functional
        except ImportError:
            raise ImportError(f"Audio at {rate} Hz must be resampled to {target_sampling_rate} Hz, which needs "
                              "torchaudio: `pip install torchaudio`, or pass audio at that rate.") from None
        with torch.no_grad():
            samples = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)),
                                                     rate, target_sampling_rate).numpy()
    return np.ascontiguousarray(samples, dtype=np.float32)
