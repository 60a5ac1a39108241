"""`SpeechChat`: talk to a DeepTalk model — audio and/or text in, streamed text and speech out.

    chat = SpeechChat.from_pretrained("deeptalk_output/quickstart/model")   # model, processor, codec
    reply = chat(audio="question.wav")                  # ChatReply: .text, .waveform, .timings, ...
    for event in chat.stream(audio="question.wav"):     # TextDelta / AudioChunk, then the ChatReply
        ...
    chat(text="and why?", history=reply.history)        # multi-turn

The reply's `timings` are measured on the request itself (seconds since it started): ``features``,
``prefill`` (audio encoder + prompt), ``first_text``, ``first_audio_chunk`` (codec decode included),
``codec_decode`` (all chunks), ``total``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from .decoding import DecodeResult, SpeechDecodingConfig, decode_steps
from .streaming import AudioChunk, IncrementalSpeechDecoder, TextDelta


@dataclass
class ChatReply:
    text: str
    waveform: np.ndarray | None  # float32 mono at `sampling_rate`; None without a codec
    sampling_rate: int | None
    codes: torch.Tensor  # [N, frames]
    layout: torch.Tensor  # [1 + N, steps]
    steps: int
    timings: dict[str, float] = field(default_factory=dict)
    expert_load: torch.Tensor | None = None  # [num_moe_layers, 2 (text, speech), num_routed_experts] (if asked)
    history: list[dict] = field(default_factory=list)  # the conversation, this reply's text included


def user_message(audio=None, text: str | None = None) -> dict:
    """A user turn from `audio` (a path, `(array, sampling_rate)` or `{"array", "sampling_rate"}`)
    and/or `text`."""
    if audio is None and not text:
        raise ValueError("Ask something: give audio=... (a file or (array, sampling_rate)) and/or text='...'.")
    content = []
    if audio is not None:
        if isinstance(audio, (str, os.PathLike)):
            content.append({"type": "audio", "audio": os.fspath(audio)})
        elif isinstance(audio, dict) and "array" in audio:
            content.append({"type": "audio", "audio": audio["array"], "sampling_rate": audio["sampling_rate"]})
        elif isinstance(audio, tuple) and len(audio) == 2:
            first, second = audio
            array, rate = (second, first) if np.isscalar(first) else (first, second)  # gradio gives (rate, array)
            if rate is None or isinstance(rate, bool) or not np.isscalar(rate):
                raise ValueError(
                    f"audio=(samples, sampling_rate) needs the sampling rate in Hz as a number, got {rate!r}: pass "
                    "e.g. (samples, 16000), or a file path."
                )
            content.append({"type": "audio", "audio": np.asarray(array), "sampling_rate": rate})
        else:
            raise ValueError(
                f"audio must be a file path, (array, sampling_rate) or {{'array', 'sampling_rate'}}, got {type(audio).__name__}."
            )
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


class SpeechChat:
    """A model, its processor and codec, and how to decode and stream its replies.

    Args:
        model, processor, codec: a DeepTalk model, its `DeepTalkProcessor`, and the speech codec it was
            trained with (None: text and codes only, no waveform).
        config: a :class:`SpeechDecodingConfig` (strategy, sampling, voice, cache...).
        chunk_frames / first_chunk_frames / lookahead_frames: streaming chunk sizes in codec frames
            (see :class:`IncrementalSpeechDecoder`).
        output_expert_load: count the router's selections per expert and token modality over the
            prompt and the reply (`ChatReply.expert_load`; the Space's expert view).
    """

    def __init__(self, model, processor, codec=None, config: SpeechDecodingConfig | None = None, *,
                 chunk_frames: int = 8, first_chunk_frames: int | None = None, lookahead_frames: int | None = None,
                 output_expert_load: bool = False):
        self.model, self.processor, self.codec = model.eval(), processor, codec
        self.output_expert_load = output_expert_load  # counting costs ~0.5 ms per step (and a GPU sync)
        # A model routes through one shared RoutingState (and SNAC decodes through shared noise state):
        # concurrent requests on one model would mix them, so a chat answers one request at a time.
        self._lock = threading.Lock()
        self.config = config or SpeechDecodingConfig()
        if self.config.voice is None and processor.layout.voices:  # a model trained with voices expects one
            self.config = replace(self.config, voice=processor.layout.voices[0])
        self.chunk_frames, self.first_chunk_frames, self.lookahead_frames = chunk_frames, first_chunk_frames, lookahead_frames

    @classmethod
    def from_pretrained(cls, name_or_path: str, codec=None, *, device: str | None = None, dtype=None, **kwargs) -> "SpeechChat":
        """Load the model, processor and codec (from `codec`, else the repository's `codec/` folder)."""
        from transformers import AutoModelForCausalLM, AutoProcessor

        import deeptalk  # noqa: F401  (registers the Auto classes)

        from ..processing.codecs import load_codec

        folder = name_or_path
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        if device:
            model = model.to(device)
        processor = AutoProcessor.from_pretrained(folder)
        if codec is None and os.path.isdir(os.path.join(folder, "codec")):
            codec = os.path.join(folder, "codec")
        if isinstance(codec, (str, os.PathLike)):
            codec = load_codec(os.fspath(codec))
        if codec is not None and device:
            codec = codec.to(device)
        return cls(model, processor, codec, **kwargs)

    def _config(self, overrides: dict) -> SpeechDecodingConfig:
        known = {f.name for f in fields(SpeechDecodingConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"Unknown decoding option(s) {sorted(unknown)}; SpeechDecodingConfig has {sorted(known)}.")
        return replace(self.config, **overrides)

    def __call__(self, audio=None, text: str | None = None, history: list[dict] | None = None, **decoding) -> ChatReply:
        """The whole reply at once (the stream, consumed)."""
        for event in self.stream(audio=audio, text=text, history=history, **decoding):
            pass
        return event

    def stream(self, audio=None, text: str | None = None, history: list[dict] | None = None, *,
               chunk_frames: int | None = None, first_chunk_frames: int | None = None,
               lookahead_frames: int | None = None, **decoding) -> Iterator[TextDelta | AudioChunk | ChatReply]:
        """Yield the reply as it is decoded: :class:`TextDelta` and :class:`AudioChunk` events, and
        last the :class:`ChatReply`. Keyword `decoding` options override the chat's config.
        Requests on one `SpeechChat` run one at a time (a second thread waits for the first)."""
        config = self._config(decoding)
        with self._lock:
            yield from self._stream(config, audio, text, history, chunk_frames, first_chunk_frames, lookahead_frames)

    def _stream(self, config, audio, text, history, chunk_frames, first_chunk_frames, lookahead_frames):
        started = time.perf_counter()
        conversation = list(history or []) + [user_message(audio, text)]
        chunker = None
        if self.codec is not None:
            chunker = IncrementalSpeechDecoder(
                self.codec, self.processor.layout, chunk_frames=chunk_frames or self.chunk_frames,
                first_chunk_frames=first_chunk_frames or self.first_chunk_frames,
                lookahead_frames=self.lookahead_frames if lookahead_frames is None else lookahead_frames)
        tokenizer, layout = self.processor.tokenizer, self.processor.layout
        result = DecodeResult()
        text_ids: list[int] = []
        shown = ""
        waveform_parts: list[np.ndarray] = []
        timings: dict[str, float] = {"codec_decode": 0.0}

        def audio_events(decode_chunks, step: int) -> list[AudioChunk]:
            before = time.perf_counter()
            chunks = decode_chunks()
            timings["codec_decode"] += time.perf_counter() - before
            return [self._audio_event(chunk, chunker, waveform_parts, timings, started, step) for chunk in chunks]

        for step in decode_steps(self.model, self.processor, conversation, config, result,
                                 output_expert_load=self.output_expert_load):
            if step.text_token is not None and step.text_token != layout.eot_id:
                text_ids.append(step.text_token)
                text_now = tokenizer.decode(text_ids, skip_special_tokens=True)
                # hold back a partly decoded character (byte-level BPE) until its last byte arrives
                if len(text_now) > len(shown) and text_now.startswith(shown) and not text_now.endswith("\ufffd"):
                    timings.setdefault("first_text", time.perf_counter() - started)
                    yield TextDelta(text_now[len(shown):], time.perf_counter() - started)
                    shown = text_now
            if chunker is not None:
                yield from audio_events(lambda: chunker.push(step.column), step.step)
        if chunker is not None:
            yield from audio_events(chunker.flush, len(result.columns) - 1)
        text, codes = self.processor.decode_turn(result.layout)
        if text != shown and text.startswith(shown) and text[len(shown):]:
            yield TextDelta(text[len(shown):], time.perf_counter() - started)
        timings.update({k: v for k, v in result.timings.items() if k in ("features", "prefill")})
        timings["total"] = time.perf_counter() - started
        waveform = None
        if self.codec is not None:
            waveform = np.concatenate(waveform_parts) if waveform_parts else np.zeros(0, np.float32)
        history_out = conversation + [{"role": "assistant", "content": text}]
        yield ChatReply(text=text, waveform=waveform, sampling_rate=getattr(self.codec, "sampling_rate", None),
                        codes=codes, layout=result.layout, steps=len(result.columns), timings=timings,
                        expert_load=result.expert_load, history=history_out)

    def _audio_event(self, chunk, chunker, parts, timings, started, step) -> AudioChunk:
        samples = chunk.detach().float().cpu().numpy()
        parts.append(samples)
        elapsed = time.perf_counter() - started
        if "first_audio_chunk" not in timings:
            timings["first_audio_chunk"] = elapsed
            timings["steps_to_first_audio_chunk"] = step + 1
        spf = self.codec.samples_per_frame
        end = chunker.emitted_frames
        return AudioChunk(waveform=samples, sampling_rate=self.codec.sampling_rate, index=chunker.num_chunks - 1,
                          start_frame=end - samples.size // spf, end_frame=end, elapsed_s=elapsed)
