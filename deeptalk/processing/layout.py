"""The multi-stream token layout: 1 text stream + N audio streams per decoder step.

DeepTalk (after Mini-Omni/LUCY) emits text and speech from one decoder step by step. Each step
carries one token per stream; the decoder's input embedding is the mean of the streams' embeddings.
An assistant turn with text ids `x` and codec codes `c` (`[N, F]`, one row per audio stream)
becomes, with `d_i` the delay of stream i (paper: `d_i = i + 1`):

    step          0     1     2   ...  d_i+f ...   d_i+F   ...
    text         x0    x1    x2   ...  EOT  PAD_T PAD_T ...          text runs ahead, then pads
    audio i    PAD_A PAD_A  ...        c[i,f] ...  EOA   PAD_A ...   stream i starts at step d_i

All ids are *global* ids of one extended vocabulary: text ids first (`[0, text_vocab_size)`),
then one block of `codebook_size + len(audio_special_tokens)` ids per audio stream. So one
embedding table and one output head serve every stream; the head is sliced per stream.
`build_delayed_layout` and `undelay_layout` are exact inverses (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..configuration_deeptalk import AUDIO_SPECIAL_TOKENS, stream_range

VOICE_PREFIX = "<|voice:"


def voice_token(voice: str) -> str:
    """The audio special token of a voice (speaker) name: `<|voice:NAME|>`."""
    if not voice or any(c in voice for c in "<|>") or voice != voice.strip():
        raise ValueError(f"A voice name is a plain non-empty word such as 'assistant' or 'f10', got {voice!r}.")
    return f"{VOICE_PREFIX}{voice}|>"


@dataclass
class SpeechTokenLayout:
    """Where each stream's ids live in the extended vocabulary, and how streams are delayed.

    Built from a codec (`num_audio_streams`, `codebook_size`) and the text tokenizer
    (`text_vocab_size`, and the ids of its `eot_id` / `pad_t_id` special tokens). Stored in
    `DeepTalkConfig` so other codecs fit without code changes.
    """

    text_vocab_size: int
    num_audio_streams: int
    codebook_size: int
    eot_id: int
    pad_t_id: int
    delays: list[int] = field(default_factory=list)
    audio_special_tokens: list[str] = field(default_factory=lambda: list(AUDIO_SPECIAL_TOKENS))

    def __post_init__(self):
        if not self.delays:
            self.delays = [i + 1 for i in range(self.num_audio_streams)]
        if len(self.delays) != self.num_audio_streams:
            raise ValueError(
                f"{len(self.delays)} delays for {self.num_audio_streams} audio streams: give one delay per stream."
            )
        if any(d < 0 for d in self.delays):
            raise ValueError(f"Stream delays must be >= 0, got {self.delays}.")
        for name, value in (("eot_id", self.eot_id), ("pad_t_id", self.pad_t_id)):
            if not 0 <= value < self.text_vocab_size:
                raise ValueError(f"{name}={value} is not a text id (text vocabulary has {self.text_vocab_size}).")
        missing = [t for t in ("<|eoa|>", "<|pad_a|>") if t not in self.audio_special_tokens]
        if missing:
            raise ValueError(f"audio_special_tokens must include {missing}.")

    # ---- vocabulary ------------------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        return 1 + self.num_audio_streams

    @property
    def audio_block_size(self) -> int:
        return self.codebook_size + len(self.audio_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.num_audio_streams * self.audio_block_size

    def stream_range(self, stream: int) -> tuple[int, int]:
        """`[start, end)` of `stream`'s ids (0 = text, 1..N = audio streams)."""
        return stream_range(self.text_vocab_size, self.audio_block_size, stream)

    def stream_offset(self, stream: int) -> int:
        """First global id of `stream`."""
        return self.stream_range(stream)[0]

    def audio_special_id(self, name: str, audio_stream: int) -> int:
        """Global id of special `name` in audio stream `audio_stream` (0-based among audio streams)."""
        return self.stream_offset(audio_stream + 1) + self.codebook_size + self.audio_special_tokens.index(name)

    def audio_special_ids(self, name: str) -> torch.Tensor:
        """`[N]` global ids of special `name`, one per audio stream."""
        return torch.tensor([self.audio_special_id(name, i) for i in range(self.num_audio_streams)])

    @property
    def voices(self) -> list[str]:
        """Names of the voice (speaker) tokens `<|voice:NAME|>` among the audio specials."""
        return [t[len(VOICE_PREFIX) : -2] for t in self.audio_special_tokens if t.startswith(VOICE_PREFIX)]

    def voice_ids(self, voice: str) -> list[int]:
        """Global ids of `voice`'s token, one per audio stream; ValueError naming the known voices."""
        name = voice_token(voice)
        if name not in self.audio_special_tokens:
            raise ValueError(
                f"Unknown voice {voice!r}: this layout's voices are {self.voices or 'none'}. Build the processor with "
                "`DeepTalkProcessor.from_codec_layout(..., voices=[...])` (and the model with its "
                "`model_speech_kwargs()`), or leave the voice out."
            )
        return [self.audio_special_id(name, i) for i in range(self.num_audio_streams)]

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- layout ------------------------------------------------------------------------------
    def build_delayed_layout(self, text_ids, codes, voice: str | None = None) -> torch.Tensor:
        """`[1 + N, T]` global ids of one assistant turn from text ids `[L]` and codes `[N, F]`.

        Codes are codebook indices in `[0, codebook_size)`; out-of-range codes raise ValueError.
        `voice` puts that voice's token at step 0 of every delayed audio stream (the authors' speaker
        token at the answer start): a condition the model reads, never a label.
        """
        voice_ids = self.voice_ids(voice) if voice is not None else None
        if voice_ids is not None and not any(self.delays):
            raise ValueError("A voice token sits before the audio starts: it needs stream delays > 0.")
        text_ids = torch.as_tensor(text_ids, dtype=torch.long).reshape(-1)
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 2 or codes.shape[0] != self.num_audio_streams:
            raise ValueError(
                f"codes must be [num_audio_streams={self.num_audio_streams}, frames], got {tuple(codes.shape)}."
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got min {int(codes.min())}, max {int(codes.max())}: "
                "they are not this codec's codes (wrong codec, or already offset into the vocabulary?)."
            )
        if text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= self.text_vocab_size):
            raise ValueError(f"text ids must lie in [0, {self.text_vocab_size}).")
        frames = codes.shape[1]
        length = max(text_ids.numel() + 1, max(self.delays, default=0) + frames + 1)
        layout = torch.empty(self.num_streams, length, dtype=torch.long)
        layout[0] = self.pad_t_id
        layout[0, : text_ids.numel()] = text_ids
        layout[0, text_ids.numel()] = self.eot_id
        for i, delay in enumerate(self.delays):
            offset = self.stream_offset(i + 1)
            layout[i + 1] = self.audio_special_id("<|pad_a|>", i)
            if voice_ids is not None and delay > 0:
                layout[i + 1, 0] = voice_ids[i]
            layout[i + 1, delay : delay + frames] = codes[i] + offset
            layout[i + 1, delay + frames] = self.audio_special_id("<|eoa|>", i)
        return layout

    def undelay_layout(self, layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `build_delayed_layout`: `(text_ids [L], codes [N, F])`.

        Text ends at the first EOT; stream i's codes start at its delay and end at its EOA (or the
        end of the layout when generation stopped early). Streams are cut to the shortest one so
        the result is a rectangular code matrix.
        """
        layout = torch.as_tensor(layout, dtype=torch.long)
        if layout.dim() != 2 or layout.shape[0] != self.num_streams:
            raise ValueError(f"layout must be [{self.num_streams}, steps], got {tuple(layout.shape)}.")
        text = layout[0]
        eot = (text == self.eot_id).nonzero()
        text_ids = text[: int(eot[0]) if len(eot) else len(text)]
        text_ids = text_ids[text_ids != self.pad_t_id]
        streams = []
        for i, delay in enumerate(self.delays):
            row = layout[i + 1, delay:] - self.stream_offset(i + 1)
            end = ((row < 0) | (row >= self.codebook_size)).nonzero()
            streams.append(row[: int(end[0]) if len(end) else len(row)])
        frames = min((len(s) for s in streams), default=0)
        codes = torch.stack([s[:frames] for s in streams]) if streams else torch.empty(0, 0, dtype=torch.long)
        return text_ids, codes
