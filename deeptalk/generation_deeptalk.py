"""Speaking: step-by-step multi-stream decoding of a text + speech answer.

This file is remote code: saved model folders carry it, and `model.generate_speech(processor,
conversation, codec=...)` runs it where the deeptalk package is not installed (the package re-exports
it as `deeptalk.generation`). It needs only torch and transformers.

Each decoder step emits one *column*: one token per stream (text, then the N audio streams) in the
delayed layout of `SpeechTokenLayout` (configuration_deeptalk.py). The layout is enforced by rule, so
the model only ever chooses among the tokens the layout allows:

* audio stream i is PAD_A (or the voice token at step 0) before its delay `d_i`, PAD_A after its EOA;
* the first audio stream decides when speech ends (it may pick EOA); every later stream is forced to
  EOA at the same frame, so the streams always undelay into a rectangular `[N, frames]` code grid;
* the text stream is PAD_T after EOT.

Two strategies (``SpeechDecodingConfig.strategy``):

``"single_pass"``
    One sequence; the text and audio tokens of a step come from the same forward pass. One forward
    per step: the cheapest, and the variant the paper's reviewers asked to see.
``"batch_parallel"``
    The authors' (Mini-Omni style) decoding: a batch of two over the same prompt. Item 1 is a
    text-only copy (its audio streams are PAD_A, so it answers as the text LLM would); its text token
    is fed to both items. Item 0 produces the audio, conditioned on that text. The text-only copy is
    dropped from the batch (and from the KV cache) once the text ends. The prompt is prefilled once
    and the cache repeated, so the extra cost is the second row of each decode step while text lasts.

Sampling follows the authors' code by default: text greedy with repetition penalty 1.2, audio top-k 10
(``audio_top_k=1`` is greedy), through transformers' ``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper`` and ``TopKLogitsWarper``; the N audio streams are drawn together by one
``torch.multinomial`` on the decoding's own seeded generator, so replies are reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

STRATEGIES = ("single_pass", "batch_parallel")
CACHE_IMPLEMENTATIONS = ("dynamic", "static")


@dataclass
class SpeechDecodingConfig:
    """How to decode a spoken answer. Defaults are the authors' sampling settings.

    Args:
        strategy: ``"single_pass"`` or ``"batch_parallel"`` (see the module docstring).
        max_steps: decoder steps at most (one step = one codec frame once speech has started).
        text_repetition_penalty: CTRL-style penalty on text ids already in the answer (authors: 1.2).
        audio_top_k: sample each audio token among the k most likely codes (authors: 10; 1 = greedy).
        audio_temperature: softmax temperature for the audio sampling.
        seed: seed of the sampling generator (None: a fresh, unseeded generator).
        voice: name of a voice (speaker) token (``<|voice:NAME|>`` among the model's audio specials, see
            ``DeepTalkProcessor.from_codec_layout(voices=...)``) placed at step 0 of the audio streams,
            as the authors' speaker tokens; None leaves PAD_A there (`SpeechChat` picks the model's
            first voice when it has any).
        cache_implementation: ``"dynamic"`` (transformers' DynamicCache) or ``"static"`` (a
            pre-allocated StaticCache sized prompt + max_steps; fixed shapes, for ``compile``). A static
            cache cannot shrink its batch, so batch-parallel decoding with it keeps the text-only row
            to the end of the answer (2 rows every step); the dynamic cache drops it when the text ends.
        compile: run the per-step forward through ``torch.compile`` (worth it with a static cache on
            GPU; compilation itself costs seconds to minutes, paid on the first reply).
    """

    strategy: str = "single_pass"
    max_steps: int = 200
    text_repetition_penalty: float = 1.2
    audio_top_k: int = 10
    audio_temperature: float = 1.0
    seed: int | None = 0
    voice: str | None = None
    cache_implementation: str = "dynamic"
    compile: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown decoding strategy {self.strategy!r}; choose one of {STRATEGIES}.")
        if self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"Unknown cache_implementation {self.cache_implementation!r}; choose one of {CACHE_IMPLEMENTATIONS}."
            )
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}.")
        if self.audio_top_k < 1:
            raise ValueError(f"audio_top_k must be >= 1 (1 = greedy), got {self.audio_top_k}.")
        if self.audio_temperature <= 0:
            raise ValueError(f"audio_temperature must be > 0, got {self.audio_temperature}.")
        if self.text_repetition_penalty <= 0:
            raise ValueError(f"text_repetition_penalty must be > 0 (1.0 = off), got {self.text_repetition_penalty}.")


@dataclass
class DecodeStep:
    """One decoder step: the column of global ids `[1 + N]` and when it was ready."""

    step: int
    column: list[int]
    text_token: int | None  # the step's new text id; None once the text has ended
    elapsed_s: float  # since the decode started (prompt encoding included)


@dataclass
class DecodeResult:
    """Everything the steps add up to; filled in as decoding runs."""

    columns: list[list[int]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    expert_load: torch.Tensor | None = None  # [num_moe_layers, 2, num_routed_experts], prompt + answer
    prompt_length: int = 0
    forward_rows: int = 0  # decoder rows run after the prefill (2 per step while batch-parallel text lasts)

    @property
    def layout(self) -> torch.Tensor:
        return torch.tensor(self.columns, dtype=torch.long).T if self.columns else torch.empty(0, 0, dtype=torch.long)


@dataclass
class SpeechAnswer:
    text: str
    codes: torch.Tensor  # [N, frames]
    layout: torch.Tensor  # [1 + N, steps] the generated answer in the delayed layout
    steps: int
    timings: dict[str, float] = field(default_factory=dict)
    expert_load: torch.Tensor | None = None
    waveform: torch.Tensor | None = None  # [samples] float32 at `sampling_rate`, when a codec decoded the codes
    sampling_rate: int | None = None


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepSampler:
    """Chooses each step's column with transformers' logits processors, every audio stream at once.

    The text token: greedy over the text block after `RepetitionPenaltyLogitsProcessor` on the answer's
    text so far. The audio tokens: the head's audio blocks (contiguous, equal-sized) viewed as
    `[N, block]`, restricted to the codebook (plus EOA for the first stream), warped by
    `TemperatureLogitsWarper` + `TopKLogitsWarper` and drawn by one `torch.multinomial` among each
    stream's top k; the layout
    rules then replace what a stream may not choose at this step, in one `torch.where`.
    The end of speech stays on the device (`end_frame`), so choosing a column needs no host sync.
    """

    def __init__(self, layout, config: SpeechDecodingConfig, device: torch.device, generator: torch.Generator):
        num_streams, block, codebook = layout.num_audio_streams, layout.audio_block_size, layout.codebook_size
        self.text_vocab_size = layout.text_vocab_size
        self.audio_span = (layout.stream_range(1)[0], layout.stream_range(num_streams)[1])
        self.num_streams, self.block = num_streams, block
        self.delays = torch.tensor(layout.delays, device=device)
        self.offsets = torch.tensor([layout.stream_offset(i + 1) for i in range(num_streams)], device=device)
        self.pad_a = layout.audio_special_ids("<|pad_a|>").to(device)
        self.eoa = layout.audio_special_ids("<|eoa|>").to(device)
        self.pad_t = torch.tensor([layout.pad_t_id], device=device)
        # the voice (speaker) token opens the audio streams at step 0, as in training (layout.py)
        self.opening = torch.tensor(layout.voice_ids(config.voice), device=device) if config.voice else self.pad_a
        eoa_index = codebook + layout.audio_special_tokens.index("<|eoa|>")
        allowed = torch.zeros(num_streams, block, dtype=torch.bool)
        allowed[:, :codebook] = True
        allowed[0, eoa_index] = True  # the first stream decides when speech ends
        # an additive mask (0 or -inf): a plain add, cheaper than masked_fill's boolean pass
        self.audio_mask = torch.zeros(num_streams, block).masked_fill(~allowed, float("-inf")).to(device)
        self.first_eoa_index = eoa_index
        self.no_end = torch.iinfo(torch.long).max
        self.end_frame = torch.tensor(self.no_end, device=device)  # frame of the first stream's EOA
        self.text_penalty = (RepetitionPenaltyLogitsProcessor(float(config.text_repetition_penalty))
                             if config.text_repetition_penalty != 1.0 else None)
        self.greedy_audio = config.audio_top_k == 1
        self.audio_top_k = min(config.audio_top_k, block)
        # as transformers' generate: a temperature of 1.0 adds no warper
        self.audio_warpers = LogitsProcessorList(
            [TemperatureLogitsWarper(float(config.audio_temperature))] if config.audio_temperature != 1.0 else [])
        self.audio_warpers.append(TopKLogitsWarper(config.audio_top_k))
        self.generator = generator

    def text_token(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """`[1]` the greedy text id from one row of logits, penalising the answer's `history` `[1, L]`."""
        scores = logits[None, : self.text_vocab_size].float()
        if self.text_penalty is not None and history.numel():
            scores = self.text_penalty(history, scores)
        return scores.argmax(dim=-1)

    def audio_tokens(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """`[N]` global ids of the audio streams at `step` from one row of logits."""
        start, end = self.audio_span
        scores = logits[start:end].view(self.num_streams, self.block).float() + self.audio_mask
        if self.greedy_audio:
            picked = scores.argmax(dim=-1)
        else:
            scores = self.audio_warpers(None, scores)
            # the warped distribution is zero outside each stream's top k: drawing among those k gives the same
            # distribution, and a multinomial over the whole block costs far more than the warpers
            top_scores, candidates = scores.topk(self.audio_top_k, dim=-1)
            choice = torch.multinomial(top_scores.softmax(dim=-1), 1, generator=self.generator)
            picked = candidates.gather(-1, choice).squeeze(-1)
        frame = step - self.delays
        ends_now = (picked[0] == self.first_eoa_index) & (frame[0] >= 0) & (frame[0] < self.end_frame)
        self.end_frame = torch.where(ends_now, frame[0], self.end_frame)
        before = self.opening if step == 0 else self.pad_a
        return torch.where(frame < 0, before, torch.where(frame < self.end_frame, picked + self.offsets,
                                                          torch.where(frame == self.end_frame, self.eoa, self.pad_a)))


def _prepare_prompt(processor, conversation, device):
    batch = processor(conversation, add_generation_prompt=True)
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def _new_cache(model, kind: str, max_length: int):
    if kind == "dynamic":
        return None  # the model creates a DynamicCache
    return StaticCache(config=model.config.text_config, max_cache_len=max_length)


def _two_row_static_cache(model, prefilled, max_length: int):
    """A two-row StaticCache holding the one-row `prefilled` cache's keys and values in both rows."""
    static = _new_cache(model, "static", max_length)
    for layer_index, layer in enumerate(prefilled.layers):
        static.update(layer.keys.repeat(2, 1, 1, 1), layer.values.repeat(2, 1, 1, 1), layer_index)
    hidden = getattr(prefilled, "deeptalk_hidden_placeholders", None)  # set by a CTC adapter's prefill
    if hidden is not None:
        static.deeptalk_hidden_placeholders = hidden
    return static


def _check_delays(layout):
    if list(layout.delays) != sorted(layout.delays):
        raise ValueError(
            f"Decoding needs non-decreasing stream delays (the first audio stream leads), got {layout.delays}."
        )


@torch.no_grad()
def decode_steps(model, processor, conversation: list[dict], config: SpeechDecodingConfig | None = None,
                 result: DecodeResult | None = None, *, output_expert_load: bool = False,
                 use_cache: bool = True) -> Iterator[DecodeStep]:
    """Yield the answer to `conversation` (ending with a user turn) one column at a time.

    `result` (a :class:`DecodeResult`) collects the columns, `timings` (seconds: ``features``,
    ``prefill`` (audio encoder + LLM prompt), ``decode``) and, with `output_expert_load`, the router's
    selections per expert and token modality. `use_cache=False` re-runs the whole sequence every step
    (single-pass only): the reference the cached path is tested against.
    """
    config = config or SpeechDecodingConfig()
    result = result if result is not None else DecodeResult()
    layout = processor.layout
    _check_delays(layout)
    if config.voice is not None:
        layout.voice_ids(config.voice)  # an unknown voice is refused before any work
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()
    batch_parallel = config.strategy == "batch_parallel"
    if batch_parallel and not use_cache:
        raise ValueError("use_cache=False is the single-pass reference path; use strategy='single_pass'.")
    model.eval()

    started = time.perf_counter()
    prompt = _prepare_prompt(processor, conversation, device)
    result.timings["features"] = time.perf_counter() - started
    prompt_length = prompt["input_ids"].shape[-1]
    result.prompt_length = prompt_length
    static = config.cache_implementation == "static"
    if static and not use_cache:
        raise ValueError("cache_implementation='static' needs use_cache=True.")
    max_length = prompt_length + config.max_steps + 1
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise ValueError(
            f"The prompt takes {prompt_length} decoder steps and the answer may take max_steps={config.max_steps}: "
            f"{max_length} positions, past the model's context of {context}. Shorten the conversation (drop old "
            "turns from the history, or send shorter audio) or lower max_steps to "
            f"{max(1, context - prompt_length - 1)}."
        )
    # batch-parallel prefills one row into a dynamic cache and then gives it two rows (a static cache
    # cannot be repeated in place: it is rebuilt with two rows below)
    cache = None if batch_parallel else _new_cache(model, config.cache_implementation, max_length)
    # default dynamic shapes: the growing attention mask becomes symbolic after one recompile
    step_forward = torch.compile(model) if config.compile else model

    def record_load(out):
        if output_expert_load and out.expert_load is not None:
            load = out.expert_load.float().cpu()
            result.expert_load = load if result.expert_load is None else result.expert_load + load

    out = model(**prompt, cache=cache, use_cache=use_cache, logits_to_keep=1, output_expert_load=output_expert_load)
    _synchronize(device)
    record_load(out)
    result.timings["prefill"] = time.perf_counter() - started - result.timings["features"]
    cache = out.cache
    if batch_parallel and static:  # the prompt is shared: prefill once, then two rows
        cache = _two_row_static_cache(model, cache, max_length)
    elif batch_parallel:
        cache.batch_repeat_interleave(2)
    two_rows = batch_parallel  # row 0 speaks, row 1 is the text-only copy
    attention_mask = prompt["attention_mask"][:1]
    sequence = prompt["input_ids"]
    sampler = _StepSampler(layout, config, device, generator)
    text_done, frames = False, None  # frames: the answer's speech length, once the first stream ends it
    history = torch.empty(1, 0, dtype=torch.long, device=device)  # the answer's text ids, for the penalty
    first_delay, last_delay, first_eoa = layout.delays[0], layout.delays[-1], layout.audio_special_id("<|eoa|>", 0)
    logits = out.logits[:, -1]  # [rows, vocab]; a prefill shared by both rows has one row
    for step in range(config.max_steps):
        # the text token comes from the text-only copy when batch-parallel (the last row), else the one row
        text_token = sampler.pad_t if text_done else sampler.text_token(logits[-1], history)
        column_ids = torch.cat([text_token, sampler.audio_tokens(logits[0], step)])
        column = column_ids.tolist()  # the step's one host sync: the column is yielded
        result.columns.append(column)
        text_id = column[0]
        yield DecodeStep(step=step, column=column, text_token=None if text_done else text_id,
                         elapsed_s=time.perf_counter() - started)
        if not text_done:
            history = torch.cat([history, text_token[None]], dim=1)
            text_done = text_id == layout.eot_id
        if frames is None and column[1] == first_eoa:
            frames = step - first_delay
        speech_done = frames is not None and step - last_delay >= frames
        if (text_done and speech_done) or step == config.max_steps - 1:
            break
        step_ids = column_ids.view(1, -1, 1)
        if two_rows and text_done and not static:  # the text is complete: drop the text-only copy
            cache.batch_select_indices(torch.tensor([0], device=device))
            two_rows = False
        if two_rows:  # the copy gets the same text token and silent audio streams
            text_only = torch.cat([text_token, sampler.pad_a]).view(1, -1, 1)
            step_ids = torch.cat([step_ids, text_only])
        live_rows = 2 if two_rows else 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
        result.forward_rows += live_rows
        if use_cache:
            out = step_forward(input_ids=step_ids, attention_mask=attention_mask.expand(live_rows, -1), cache=cache,
                               use_cache=True, output_expert_load=output_expert_load)
            cache = out.cache
        else:
            sequence = torch.cat([sequence, step_ids], dim=-1)
            audio_mask = torch.nn.functional.pad(prompt["audio_input_mask"], (0, sequence.shape[-1] - prompt_length)) \
                if "audio_input_mask" in prompt else None
            inputs = {**prompt, "input_ids": sequence, "attention_mask": attention_mask}
            if audio_mask is not None:
                inputs["audio_input_mask"] = audio_mask
            out = model(**inputs, use_cache=False, logits_to_keep=1)
        record_load(out)
        logits = out.logits[:, -1]
    _synchronize(device)
    result.timings["decode"] = time.perf_counter() - started - result.timings["features"] - result.timings["prefill"]
    result.timings["total"] = time.perf_counter() - started


def generate_speech_answer(model, processor, conversation: list[dict], config: SpeechDecodingConfig | None = None, *,
                           codec=None, use_cache: bool = True, output_expert_load: bool = False,
                           **config_kwargs) -> SpeechAnswer:
    """Text + speech answer to `conversation` (ending with a user turn), decoded to the end; with
    `codec` (the model's speech codec) the codes are decoded into `SpeechAnswer.waveform` too.

    Decoding options are a :class:`SpeechDecodingConfig` or its fields as keywords, e.g.
    ``generate_speech_answer(model, processor, conv, strategy="batch_parallel", max_steps=120)``.
    """
    if config is None:
        config = SpeechDecodingConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError("Pass decoding options either as config=SpeechDecodingConfig(...) or as keywords, not both.")
    result = DecodeResult()
    for _ in decode_steps(model, processor, conversation, config, result, use_cache=use_cache,
                          output_expert_load=output_expert_load):
        pass
    layout = result.layout
    text, codes = processor.decode_turn(layout)
    waveform = None if codec is None else codec.decode(codes).float().cpu()
    return SpeechAnswer(text=text, codes=codes, layout=layout, steps=len(result.columns), timings=result.timings,
                        expert_load=result.expert_load, waveform=waveform,
                        sampling_rate=None if codec is None else codec.sampling_rate)


__all__ = [
    "CACHE_IMPLEMENTATIONS",
    "STRATEGIES",
    "DecodeResult",
    "DecodeStep",
    "SpeechAnswer",
    "SpeechDecodingConfig",
    "decode_steps",
    "generate_speech_answer",
]
