"""Streaming: turn decoder columns into audio chunks as soon as their frames exist.

In the delayed layout, codec frame f is complete once the last audio stream has emitted it, i.e.
`max(delays)` steps after the first stream did. :class:`IncrementalSpeechDecoder` collects the columns,
and whenever `chunk_frames` new complete frames are available (plus `lookahead_frames` more, which the
codec decoder sees as right context) it decodes them with :meth:`SpeechCodec.decode_frames`. Every
chunk is decoded with `context_frames` of real codes on each side and then cropped, so with a context
at least the decoder's receptive field the joined chunks equal one offline decode (tested per codec);
no fades are needed at the joins because nothing is cut mid-receptive-field.

Latency trade-off: the first chunk waits for `max(delays) + first_chunk_frames + lookahead_frames`
decoder steps. `first_chunk_frames` can be smaller than `chunk_frames` to start playback early.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TextDelta:
    """New text of the reply (decoded incrementally, so tokenizer merges come out right)."""

    text: str
    elapsed_s: float


@dataclass
class AudioChunk:
    """A piece of the reply's waveform, ready to play. `index` counts chunks from 0."""

    waveform: np.ndarray  # float32, mono
    sampling_rate: int
    index: int
    start_frame: int
    end_frame: int
    elapsed_s: float  # since the request started


class IncrementalSpeechDecoder:
    """Collect decoder columns, return waveform chunks (1-D float32 tensors) as frames complete.

    Args:
        codec: the model's :class:`~deeptalk.processing.codecs.SpeechCodec`.
        layout: the processor's :class:`~deeptalk.processing.layout.SpeechTokenLayout`.
        chunk_frames: frames per chunk after the first.
        first_chunk_frames: frames of the first chunk (default `chunk_frames`).
        lookahead_frames: complete frames held back as right context (default: the codec's
            `default_decode_context`; 0 for the lowest latency at some cost at the joins).
        context_frames: frames of context decoded on each side of a chunk (default: the codec's).
    """

    def __init__(self, codec, layout, chunk_frames: int = 8, first_chunk_frames: int | None = None,
                 lookahead_frames: int | None = None, context_frames: int | None = None):
        if chunk_frames < 1 or (first_chunk_frames is not None and first_chunk_frames < 1):
            raise ValueError(
                f"chunk_frames and first_chunk_frames must be >= 1, got {chunk_frames}, {first_chunk_frames}."
            )
        for name, value in (("lookahead_frames", lookahead_frames), ("context_frames", context_frames)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (0 = none), got {value}.")
        if codec.num_streams != layout.num_audio_streams or codec.codebook_size != layout.codebook_size:
            raise ValueError(
                f"The codec ({codec.num_streams} streams x {codec.codebook_size} codes) does not match the model's "
                f"speech layout ({layout.num_audio_streams} x {layout.codebook_size}); "
                "load the codec saved with the model."
            )
        self.codec, self.layout = codec, layout
        self.chunk_frames = chunk_frames
        self.first_chunk_frames = first_chunk_frames or chunk_frames
        default_context = codec.default_decode_context
        self.lookahead_frames = default_context if lookahead_frames is None else lookahead_frames
        self.context_frames = default_context if context_frames is None else context_frames
        self.streams: list[list[int]] = [[] for _ in range(layout.num_audio_streams)]
        self.ended = [False] * layout.num_audio_streams
        self.step = 0
        self.emitted_frames = 0
        self.num_chunks = 0

    @property
    def complete_frames(self) -> int:
        return min((len(s) for s in self.streams), default=0)

    @property
    def codes(self) -> torch.Tensor:
        """The complete frames so far, `[N, frames]` codebook indices."""
        frames = self.complete_frames
        return torch.tensor([s[:frames] for s in self.streams], dtype=torch.long).view(len(self.streams), frames)

    def push(self, column) -> list[torch.Tensor]:
        """Add one decoder column (`[1 + N]` global ids); return the chunks it completes (maybe none)."""
        for i, delay in enumerate(self.layout.delays):
            if self.step < delay or self.ended[i]:
                continue
            code = int(column[i + 1]) - self.layout.stream_offset(i + 1)
            if 0 <= code < self.layout.codebook_size:
                self.streams[i].append(code)
            else:  # EOA (or any special): the stream is over
                self.ended[i] = True
        self.step += 1
        chunks = []
        while True:
            size = self.first_chunk_frames if self.num_chunks == 0 else self.chunk_frames
            ready = self.complete_frames - self.lookahead_frames
            if ready - self.emitted_frames < size:
                break
            chunks.append(self._decode(self.emitted_frames + size))
        if all(self.ended):  # speech is over: no more right context can come, so hold nothing back
            chunks += self.flush()
        return chunks

    def flush(self) -> list[torch.Tensor]:
        """The remaining frames as a last chunk (call once decoding has ended)."""
        if self.complete_frames > self.emitted_frames:
            return [self._decode(self.complete_frames)]
        return []

    def _decode(self, end: int) -> torch.Tensor:
        codes = self.codes
        chunk = self.codec.decode_frames(codes, self.emitted_frames, end, context=self.context_frames)
        self.emitted_frames = end
        self.num_chunks += 1
        return chunk
