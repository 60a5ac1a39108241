#!/usr/bin/env python
# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Latency of a spoken reply: time to the first audio chunk and end to end, stage by stage.

One request = a spoken question (a file of the shipped demo corpus) -> a text + speech answer, decoded
with ``deeptalk.generation.decode_steps`` and streamed with ``IncrementalSpeechDecoder``, the same
loop as ``SpeechChat.stream``. The loop is instrumented from the outside (no library code changes):

* **features**: the processor (audio file loading, resampling, Whisper log-mel, chat template,
  layout): ``DecodeResult.timings["features"]``;
* **encoder**: Whisper encoder + adapter on the clip (``model.model.encode_audio_clips``, wrapped on the
  instance to time it inside the prefill call);
* **LLM prefill**: ``DecodeResult.timings["prefill"]`` minus the encoder (the multi-stream
  embedding, the audio splice, the decoder layers over the prompt, cache creation, the head);
* **decode to 1st chunk**: the decoder steps until the first chunk's frames are complete (each step:
  one forward over the new column + the text/audio sampling; the number of steps is
  ``max(delays) + first_chunk_frames + lookahead_frames``, the first column comes from the prefill);
* **codec 1st chunk**: ``IncrementalSpeechDecoder.push`` of the column that completes the chunk
  (``codec.decode_frames`` with its context, then the waveform to a NumPy array, as ``SpeechChat``);
* **stream overhead**: the other ``push`` calls and the incremental detokenization of the text, which
  ``SpeechChat.stream`` does per step;
* **TTFC**: wall-clock time from the request to the first chunk in hand. The stages above tile
  that interval without gaps (the loop's own overhead counts as decode); the JSON keeps the per-run
  residual TTFC - sum(stages) as a check;
* **end to end** for a fixed-length answer of ``--answer-seconds`` of speech (3 s by default):
  random weights never end an answer by themselves, so the number of decoder steps is forced with
  ``max_steps = frames + max(delays)`` and a one-op logits bias (added in a forward hook) keeps the
  first audio stream from picking EOA; the same bias ends the text after ``--text-tokens`` tokens
  (EOT forced at that step, never earlier), so batch-parallel decoding runs its second (text-only)
  row for a fixed number of steps. The bias costs one ``add_`` per forward.

Per-step decode time is compared with the source transformers MoE's own per-token decode time
(the model ``from_text_moe`` converted, random, same sizes), timed in the same process with greedy
``generate()`` (batch 1, a random prompt of the same length, as many new tokens as the answer has
steps, ``disable_compile=True``; a no-op ``LogitsProcessor`` stamps each step so the prefill is left
out), with the same cache implementation. The ratio is given of the medians and [median of
per-round ratios]. "step" ratios compare the whole step (forward + DeepTalk's sampling of 1 + N
streams vs. generate()'s own per-token work), "forward" ratios the model forward alone (forward
hooks on both models). Part of the forward difference is inherent: DeepTalk's head also scores the
N audio blocks, so the script times the LM head of both models on one position too.

Variants (``--grid`` runs the full product instead): strategy ``single_pass`` vs ``batch_parallel``
and ``dynamic`` vs ``static`` cache (first chunk 1 frame, codec-default lookahead), and
``first_chunk_frames`` 1 vs 4 x lookahead 0 vs the codec default (single_pass, dynamic). Later chunks
are ``--chunk-frames`` (8) frames. One extra row runs the public ``SpeechChat.stream`` (which also
asks for the expert load) with the first variant's settings as a cross-check.

Configs:

``tiny``   the quickstart's sizes (DeepSeek-V2 family, hidden 192, 4 layers, 16 routed experts top-4,
           4 speech experts; Whisper d_model 64 x 2 layers; adapter stride 4) and the shipped MelVQ
           demo codec (4 streams x 128 codes, 25 frames/s), fp32 on the CPU.
``small``  DeepSeek-V2 family, text vocab 32000, hidden 512, 8 layers (first dense), 32 routed
           experts top-6 + 2 shared, expert intermediate 256, MLA (kv_lora 128, rope 32, nope 64,
           v 64, 8 heads); Whisper-base shape (d_model 512, 6 layers); SNAC-24 kHz shape (random,
           7 streams x 4096 codes, hop 512, 11.7 frames/s), fp32 on the CPU.
``v2lite`` DeepSeek-V2-Lite's public config.json (vocab 102400, hidden 2048, 27 layers, first dense
           with intermediate 10944, 64 routed experts top-6 + 2 shared, expert intermediate 1408,
           MLA: q_lora none, kv_lora 512, rope 64, nope 128, v 128, 16 heads; greedy top-k,
           routed scaling 1.0, yarn rope x40), 16 speech experts per layer; Whisper-medium shape
           (d_model 1024, 24 layers, 16 heads, ffn 4096); SNAC-24 kHz shape. bf16 (the routers stay
           fp32, as ``from_text_moe`` makes them), built directly on the GPU; CUDA only. The source
           baseline is timed first, then the model is converted and the source freed (two 15.7 B
           models do not fit next to each other comfortably on an 80 GB card). Target: <= 60 ms to
           the first chunk. ``--smoke`` shrinks it (2 layers, hidden 256, 8 experts) to exercise
           this path on a CPU in bf16.

All weights are random: timing does not depend on their values.

    HF_HUB_OFFLINE=1 python benchmarks/latency.py                          # tiny, ~45 s on 1 CPU thread
    HF_HUB_OFFLINE=1 python benchmarks/latency.py --config small --repeats 5
    HF_HUB_OFFLINE=1 python benchmarks/latency.py --config v2lite          # needs a CUDA GPU (~40 GB)
    HF_HUB_OFFLINE=1 python benchmarks/latency.py --config all --json out.json

Results go to ``benchmarks/results/latency_<config>_<device>.json`` unless ``--json`` is given.
This is a script, not a test: it checks that every answer has the forced length, but it never
asserts speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList  # noqa: E402

from deeptalk import DeepTalkForCausalLM  # noqa: E402
from deeptalk.generation import (  # noqa: E402
    DecodeResult,
    IncrementalSpeechDecoder,
    SpeechChat,
    SpeechDecodingConfig,
    decode_steps,
    user_message,
)

try:  # run as a script (benchmarks/ is sys.path[0]) or as `python -m benchmarks.<script>`
    from _common import ForeignLoad, load_flag, machine_info, step_timer, wait_for_idle, whisper_config
except ModuleNotFoundError:
    from benchmarks._common import ForeignLoad, load_flag, machine_info, step_timer, wait_for_idle, whisper_config

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG_NAMES = ("tiny", "small", "v2lite")

# The keys every DeepTalk variant reports (medians, ms unless named otherwise).
FIRST_CHUNK_KEYS = ("features_ms", "encoder_ms", "llm_prefill_ms", "decode_to_first_chunk_ms",
                    "codec_first_chunk_ms", "stream_overhead_ms", "ttfc_ms")
BREAKDOWN_KEYS = FIRST_CHUNK_KEYS + (
    "prefill_ms", "steps_to_first_chunk", "decode_forwards_to_first_chunk", "per_step_ms", "step_forward_ms",
    "decode_ms", "codec_total_ms", "e2e_ms", "steps", "frames", "audio_s", "rtf", "forward_rows")

SNAC_24KHZ = dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
                  decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                  vq_strides=[4, 2, 1], noise=True, depthwise=True)  # hubertsiuzdak/snac_24khz (19.8 M)

# deepseek-ai/DeepSeek-V2-Lite config.json
V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
               n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0, kv_lora_rank=512,
               q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy",
               n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=False,
               max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
               bos_token_id=100000, eos_token_id=100001,
               rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                    original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                    mscale=0.707, mscale_all_dim=0.707))
V2_LITE_SMOKE = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                     kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
SMALL_LLM = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, n_shared_experts=2,
                 n_routed_experts=32, num_experts_per_tok=6, routed_scaling_factor=1.0, kv_lora_rank=128,
                 q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, topk_method="greedy",
                 n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=False,
                 max_position_embeddings=4096, tie_word_embeddings=False)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)



def speech_map(num_moe_layers: int, num_experts: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [sorted(rng.sample(range(num_experts), count)) for _ in range(num_moe_layers)]


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Setups
# --------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    name: str
    device: torch.device
    dtype: torch.dtype
    source: object  # the transformers MoE (None once freed)
    model: object  # DeepTalkForCausalLM (None until converted)
    processor: object
    codec: object
    conversation: list
    audio_path: str
    text_vocab_used: int  # ids the tokenizer can decode; the bias keeps random text inside them
    info: dict = field(default_factory=dict)
    convert: object = None  # callable building `model` from `source` (lazy for the sequential configs)
    sequential: bool = False  # time the source first, then convert and free it


def demo_question() -> str:
    from deeptalk.data import load_demo_corpus

    return load_demo_corpus("spoken_qa", decode_audio=False)["test"][0]["question_audio"]


def build_setup(name: str, device: torch.device, args) -> Setup:
    from deeptalk.recipes import build_demo_processor, build_demo_tokenizer, fit_demo_codec
    from deeptalk.tiny import tiny_text_moe_config, tiny_whisper_config

    tokenizer = build_demo_tokenizer()
    if name == "tiny":
        from deeptalk.quickstart import QuickstartSettings

        s = QuickstartSettings()
        dtype = torch.float32
        codec = fit_demo_codec(seed=s.seed)
        processor = build_demo_processor(tokenizer, codec, audio_adapter_stride=s.audio_adapter_stride)
        text_config = tiny_text_moe_config(
            s.family, vocab_size=len(tokenizer), hidden_size=s.hidden_size, num_hidden_layers=s.num_hidden_layers,
            num_experts=s.num_experts, top_k=s.top_k, pad_token_id=processor.layout.pad_t_id,
            eos_token_id=processor.layout.eot_id, bos_token_id=tokenizer.bos_token_id)
        audio_config = tiny_whisper_config(d_model=64, encoder_layers=2)  # as the quickstart
        num_speech, codec_desc = s.num_speech_experts, "MelVQ demo codec (fit_demo_codec)"
    else:
        from deeptalk.processing.codecs import SNACCodec

        if name == "small":
            dtype, llm, shape, num_speech = torch.float32, dict(SMALL_LLM), "base", 8
        elif name == "v2lite":
            dtype, llm, shape, num_speech = torch.bfloat16, dict(V2_LITE), "medium", 16
            if args.smoke:
                llm.update(V2_LITE_SMOKE)
                shape, num_speech = "smoke", 2
        else:
            raise ValueError(name)
        codec = SNACCodec.from_config(**SNAC_24KHZ).to(device=device, dtype=getattr(torch, args.codec_dtype) if
                                                       args.codec_dtype else dtype)
        processor = build_demo_processor(tokenizer, codec, audio_adapter_stride=4, text_vocab_size=llm["vocab_size"])
        llm.update(vocab_size=processor.layout.text_vocab_size, pad_token_id=processor.layout.pad_t_id)
        text_config = AutoConfig.for_model("deepseek_v2", **llm)
        audio_config = whisper_config(shape)
        codec_desc = "SNAC-24kHz shape, random (7 streams x 4096, hop 512)"
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        source = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    source.eval()
    if args.experts_impl:
        source.set_experts_implementation(args.experts_impl)
    built_s = time.perf_counter() - t0
    moe_layers = [i for i, layer in enumerate(source.model.layers) if hasattr(layer.mlp, "experts")]
    num_experts = source.model.layers[moe_layers[0]].mlp.experts.gate_up_proj.shape[0]
    speech = speech_map(len(moe_layers), num_experts, num_speech, args.seed)

    def convert(src):
        torch.manual_seed(args.seed)
        model = DeepTalkForCausalLM.from_text_moe(src, speech_experts=speech, progress=False)
        with torch.device(device):
            model.add_speech(audio_config=audio_config, mean_resizing=False, **processor.model_speech_kwargs())
        model.model.audio_encoder.to(device=device, dtype=dtype)
        model.model.audio_adapter.to(device=device, dtype=dtype)
        if args.experts_impl:
            model.set_experts_implementation(args.experts_impl)
        return model.eval()

    path = args.audio or demo_question()
    import soundfile

    info = {
        "llm": {k: v for k, v in text_config.to_dict().items() if k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
            "num_experts_per_tok", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
            "topk_method", "first_k_dense_replace", "rope_parameters")},
        "llm_params": count_params(source),
        "speech_experts_per_layer": num_speech,
        "whisper": {"d_model": audio_config.d_model, "encoder_layers": audio_config.encoder_layers,
                    "encoder_attention_heads": audio_config.encoder_attention_heads,
                    "encoder_ffn_dim": audio_config.encoder_ffn_dim},
        "codec": {"description": codec_desc, "class": type(codec).__name__, "num_streams": codec.num_streams,
                  "codebook_size": codec.codebook_size, "frame_rate": codec.frame_rate,
                  "samples_per_frame": codec.samples_per_frame, "sampling_rate": codec.sampling_rate,
                  "default_decode_context": codec.default_decode_context, "params": count_params(codec),
                  "dtype": str(next(codec.parameters()).dtype) if count_params(codec) else "n/a"},
        "delays": list(processor.layout.delays),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "audio": {"path": os.path.relpath(path, os.getcwd()) if not args.audio else path,
                  "seconds": soundfile.info(path).duration},
        "adapter_stride": processor.audio_adapter_stride,
        "experts_impl": args.experts_impl or source.config._experts_implementation,
        "source_build_s": built_s,
    }
    setup = Setup(name=name + ("_smoke" if name == "v2lite" and args.smoke else ""), device=device, dtype=dtype,
                  source=source, model=None, processor=processor, codec=codec,
                  conversation=[user_message(audio=path)], audio_path=path, text_vocab_used=len(tokenizer), info=info,
                  convert=convert, sequential=name == "v2lite")
    if not setup.sequential:
        setup.model = convert(source)
        finish_model_info(setup)
    return setup


def finish_model_info(setup: Setup):
    model = setup.model
    setup.info.update(
        deeptalk_params=count_params(model), encoder_params=count_params(model.model.audio_encoder),
        attn_impl=model.config.text_config._attn_implementation,
        routing_mode=model.config.routing_mode)


# --------------------------------------------------------------------------------------------------
# Instrumentation
# --------------------------------------------------------------------------------------------------
class Probe:
    """Hooks on one DeepTalk model: times each forward and the encoder inside the prefill, and adds
    the logits bias that gives a random model a fixed-length answer (see the module docstring)."""

    def __init__(self, model, layout, text_vocab_used: int, text_tokens: int, device):
        self.model, self.device, self.text_tokens = model, device, text_tokens
        config = model.config
        start, _ = config.stream_range(1)
        self.eoa = start + config.layout.codebook_size  # what decode_steps reads as EOA of the first stream
        assert self.eoa == layout.audio_special_id("<|eoa|>", 0)
        self.eot, self.text_vocab, self.text_used = layout.eot_id, layout.text_vocab_size, text_vocab_used
        self.biases: dict = {}
        self.forward_s: list[float] = []
        self.encoder_s: list[float] = []
        self.calls = 0
        self._t0 = 0.0
        inner = type(model.model).encode_audio_clips.__get__(model.model)  # what the forward calls

        def encode_audio_clips(*a, **kw):
            sync(device)
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            sync(device)
            self.encoder_s.append(time.perf_counter() - t0)
            return out

        model.model.encode_audio_clips = encode_audio_clips
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def reset(self):
        self.forward_s, self.encoder_s, self.calls = [], [], 0

    def remove(self):
        for h in self.handles:
            h.remove()
        del self.model.model.encode_audio_clips

    def _bias(self, phase: str, logits: torch.Tensor) -> torch.Tensor:
        key = (phase, logits.shape[-1], logits.dtype, logits.device)
        if key not in self.biases:
            bias = torch.zeros(logits.shape[-1], dtype=torch.float32)
            bias[self.eoa] = -float("inf")  # speech never ends by itself: max_steps decides
            if phase == "text":  # text stays in the tokenizer's ids and does not end yet
                bias[self.text_used:self.text_vocab] = -float("inf")
                bias[self.eot] = -float("inf")
            elif phase == "end":  # EOT now
                keep = bias[self.eot].item()
                bias[: self.text_vocab] = -float("inf")
                bias[self.eot] = keep
            self.biases[key] = bias.to(device=logits.device, dtype=logits.dtype)
        return self.biases[key]

    def _pre(self, module, args):
        sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        sync(self.device)
        self.forward_s.append(time.perf_counter() - self._t0)
        step = self.calls  # forward i gives the logits of step i (the prefill gives step 0)
        phase = "text" if step < self.text_tokens else ("end" if step == self.text_tokens else "after")
        output.logits.add_(self._bias(phase, output.logits))
        self.calls += 1


@dataclass(frozen=True)
class Variant:
    strategy: str = "single_pass"
    cache: str = "dynamic"
    first_chunk_frames: int = 1
    lookahead: int | None = None  # None: the codec's default_decode_context

    def label(self, codec) -> str:
        la = codec.default_decode_context if self.lookahead is None else self.lookahead
        return f"{self.strategy} / {self.cache} / first {self.first_chunk_frames} / lookahead {la}"


def default_variants(grid: bool) -> list[Variant]:
    if grid:
        return [Variant(s, c, f, la) for s in ("single_pass", "batch_parallel") for c in ("dynamic", "static")
                for f in (1, 4) for la in (None, 0)]
    return [
        Variant("single_pass", "dynamic", 1, None),
        Variant("batch_parallel", "dynamic", 1, None),
        Variant("single_pass", "static", 1, None),
        Variant("batch_parallel", "static", 1, None),
        Variant("single_pass", "dynamic", 4, None),
        Variant("single_pass", "dynamic", 1, 0),
        Variant("single_pass", "dynamic", 4, 0),
    ]


def run_request(setup: Setup, probe: Probe, variant: Variant, max_steps: int, chunk_frames: int) -> dict:
    """One spoken request through decode_steps + IncrementalSpeechDecoder; every stage in ms."""
    model, processor, codec, device = setup.model, setup.processor, setup.codec, setup.device
    layout, tokenizer = processor.layout, processor.tokenizer
    config = SpeechDecodingConfig(strategy=variant.strategy, max_steps=max_steps, cache_implementation=variant.cache,
                                  seed=0)
    chunker = IncrementalSpeechDecoder(codec, layout, chunk_frames=chunk_frames,
                                       first_chunk_frames=variant.first_chunk_frames,
                                       lookahead_frames=variant.lookahead)
    result = DecodeResult()
    probe.reset()
    gen_s, other_s, codec_s = [], [], []
    first = None
    samples = 0
    text_ids, shown = [], ""
    sync(device)
    t0 = time.perf_counter()
    steps = decode_steps(model, processor, setup.conversation, config, result)
    d = t0  # the intervals below tile [t0, end] without gaps
    while True:
        step = next(steps, None)
        b = time.perf_counter()
        gen_s.append(b - d)
        if step is None:
            break
        if step.text_token is not None and step.text_token != layout.eot_id:  # as SpeechChat.stream
            text_ids.append(step.text_token)
            text_now = tokenizer.decode(text_ids, skip_special_tokens=True)
            if len(text_now) > len(shown) and text_now.startswith(shown) and not text_now.endswith("\ufffd"):
                shown = text_now
        c = time.perf_counter()
        chunks = chunker.push(step.column)
        for chunk in chunks:
            samples += chunk.detach().float().cpu().numpy().size
        d = time.perf_counter()
        other_s.append(c - b)
        codec_s.append(d - c)
        if chunks and first is None:
            first = (step.step, d - t0)
    f0 = time.perf_counter()
    for chunk in chunker.flush():
        samples += chunk.detach().float().cpu().numpy().size
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{variant}: no audio chunk in {max_steps} steps; raise --answer-seconds.")
    k, ttfc = first
    t = result.timings
    encoder = sum(probe.encoder_s)
    steps_done = len(result.columns)
    ms = 1e3
    out = {
        "features_ms": t["features"] * ms,
        "encoder_ms": encoder * ms,
        "llm_prefill_ms": (t["prefill"] - encoder) * ms,
        "prefill_ms": t["prefill"] * ms,
        "steps_to_first_chunk": k + 1,
        "decode_forwards_to_first_chunk": k,
        "decode_to_first_chunk_ms": (sum(gen_s[: k + 1]) - t["features"] - t["prefill"]) * ms,
        "codec_first_chunk_ms": codec_s[k] * ms,
        "stream_overhead_ms": (sum(other_s[: k + 1]) + sum(codec_s[:k])) * ms,
        "ttfc_ms": ttfc * ms,
        "per_step_ms": statistics.median(gen_s[1:steps_done]) * ms if steps_done > 1 else float("nan"),
        "step_forward_ms": statistics.median(probe.forward_s[1:]) * ms if len(probe.forward_s) > 1 else float("nan"),
        "decode_ms": (sum(gen_s) - t["features"] - t["prefill"]) * ms,
        "codec_total_ms": (sum(codec_s) + end - f0) * ms,
        "e2e_ms": (end - t0) * ms,
        "steps": steps_done,
        "frames": chunker.complete_frames,
        "audio_s": samples / codec.sampling_rate,
        "forward_rows": result.forward_rows,
        "text_tokens": len(text_ids),
        "prompt_length": result.prompt_length,
        "num_forwards": probe.calls,
    }
    out["rtf"] = out["e2e_ms"] / 1e3 / out["audio_s"]
    parts = sum(out[key] for key in FIRST_CHUNK_KEYS[:-1])  # encoder + LLM prefill = the prefill
    out["ttfc_residual_ms"] = out["ttfc_ms"] - parts
    return out


def run_chat(setup: Setup, probe: Probe, variant: Variant, max_steps: int, chunk_frames: int) -> dict:
    """The public API with the same settings: SpeechChat.stream's own timings."""
    chat = SpeechChat(setup.model, setup.processor, setup.codec,
                      SpeechDecodingConfig(strategy=variant.strategy, max_steps=max_steps,
                                           cache_implementation=variant.cache, seed=0),
                      chunk_frames=chunk_frames, first_chunk_frames=variant.first_chunk_frames,
                      lookahead_frames=variant.lookahead)
    probe.reset()
    sync(setup.device)
    t0 = time.perf_counter()
    for event in chat.stream(audio=setup.audio_path):
        pass
    wall = time.perf_counter() - t0
    t = event.timings
    return {"features_ms": t["features"] * 1e3, "prefill_ms": t["prefill"] * 1e3,
            "ttfc_ms": t["first_audio_chunk"] * 1e3, "steps_to_first_chunk": t["steps_to_first_audio_chunk"],
            "codec_total_ms": t["codec_decode"] * 1e3,
            "e2e_ms": t["total"] * 1e3, "wall_ms": wall * 1e3, "steps": event.steps,
            "audio_s": event.waveform.size / event.sampling_rate}


def run_source(setup: Setup, cache: str, prompt_ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy generate() of the source: per-token time (stamps) and the median forward of a step (hooks)."""
    timer = step_timer()
    device, forward_s, started = setup.device, [], []

    def pre(module, args):
        sync(device)
        started.append(time.perf_counter())

    def post(module, args, output):
        sync(device)
        forward_s.append(time.perf_counter() - started[-1])

    handles = [setup.source.register_forward_pre_hook(pre), setup.source.register_forward_hook(post)]
    kw = dict(attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=setup.source.config.pad_token_id or 0, use_cache=True,
              disable_compile=True, logits_processor=LogitsProcessorList([timer]))
    if cache == "static":
        kw["cache_implementation"] = "static"
    try:
        with torch.no_grad():
            setup.source.generate(prompt_ids, **kw)
    finally:
        for h in handles:
            h.remove()
    stamps = timer.stamps
    assert len(stamps) == new_tokens == len(forward_s), (len(stamps), new_tokens, len(forward_s))
    return {"per_token_ms": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3,
            "forward_ms": statistics.median(forward_s[1:]) * 1e3}


def head_ms(model, device, reps: int = 30) -> float:
    """Median time of the LM head on one position (the speech vocabulary makes DeepTalk's larger)."""
    head = model.get_output_embeddings()
    hidden = torch.randn(1, 1, head.in_features, device=device, dtype=head.weight.dtype)
    times = []
    with torch.no_grad():
        for i in range(reps + 5):
            sync(device)
            t0 = time.perf_counter()
            head(hidden)
            sync(device)
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# --------------------------------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------------------------------
def run_rounds(calls: dict, warmup: int, repeats: int, wait_idle_s: float, label: str) -> dict:
    """calls: name -> fn() -> dict. Each round calls every fn once, in a rotating order, each after an
    untimed gc.collect() (without it, a full collection landed in the same variant's processor call
    in 4 of 5 rounds: allocation counts repeat from round to round)."""
    names = list(calls)
    t0 = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            calls[name]()
    runs = {name: [] for name in names}
    loads = []
    for r in range(repeats):
        if wait_idle_s:
            wait_for_idle(wait_idle_s)
        shift = r % len(names)
        with ForeignLoad() as fl:
            for name in names[shift:] + names[:shift]:
                gc.collect()  # untimed: keeps a collection of the previous call's garbage out of this one
                runs[name].append(calls[name]())
        loads.append(fl.cores)
        print(f"  {label}: round {r + 1}/{repeats} done ({time.perf_counter() - t0:.1f} s, other load "
              f"{load_flag(fl.cores)})", file=sys.stderr, flush=True)
    known = [x for x in loads if x is not None]
    return {"runs": runs, "round_loads": loads, "foreign_load": statistics.median(known) if known else None}


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_config(name: str, device: torch.device, args) -> dict:
    t_start = time.perf_counter()
    setup = build_setup(name, device, args)
    codec, layout = setup.codec, setup.processor.layout
    frames = math.ceil(round(args.answer_seconds * codec.frame_rate, 6))
    max_steps = frames + max(layout.delays)
    variants = default_variants(args.grid)
    prompt_length = len(setup.processor(setup.conversation, add_generation_prompt=True)["attention_mask"][0])
    gen = torch.Generator().manual_seed(args.seed)
    prompt_ids = torch.randint(3, setup.text_vocab_used, (1, prompt_length), generator=gen).to(device)
    source_calls = {f"source:{cache}": (lambda c=cache: run_source(setup, c, prompt_ids, max_steps))
                    for cache in ("dynamic", "static")}
    print(f"[{setup.name}] built in {time.perf_counter() - t_start:.1f} s; answer {frames} frames = "
          f"{frames / codec.frame_rate:.2f} s -> {max_steps} steps; prompt {prompt_length} positions",
          file=sys.stderr, flush=True)

    lm_head = {"source_vocab": setup.source.get_output_embeddings().out_features,
               "source_ms": head_ms(setup.source, device)}
    source_block = None
    if setup.sequential:  # the source first, then convert and free it
        source_block = run_rounds(source_calls, args.warmup, args.repeats, args.wait_idle, f"{setup.name} source")
        t0 = time.perf_counter()
        setup.model = setup.convert(setup.source)
        setup.source = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        finish_model_info(setup)
        setup.info["convert_s"] = time.perf_counter() - t0
    else:
        finish_model_info(setup)

    lm_head.update(deeptalk_vocab=setup.model.get_output_embeddings().out_features,
                   deeptalk_ms=head_ms(setup.model, device))
    probe = Probe(setup.model, layout, setup.text_vocab_used, args.text_tokens, device)
    calls = {}
    labels = {}
    for i, v in enumerate(variants):
        key = f"v{i}"
        labels[key] = v
        calls[key] = (lambda v=v: run_request(setup, probe, v, max_steps, args.chunk_frames))
    if not args.no_chat:
        calls["chat_api"] = lambda: run_chat(setup, probe, variants[0], max_steps, args.chunk_frames)
    if not setup.sequential:
        calls.update(source_calls)
    block = run_rounds(calls, args.warmup, args.repeats, args.wait_idle, setup.name)
    if source_block is not None:
        block["runs"].update(source_block["runs"])
    runs = block["runs"]
    # every answer must have the forced length, or the timings compare different work
    text_tokens = min(args.text_tokens, max_steps)
    for key, v in labels.items():
        for r in runs[key]:
            if r["steps"] != max_steps or r["frames"] != frames or r["text_tokens"] != text_tokens:
                raise AssertionError(f"{v}: answer of {r['steps']} steps / {r['frames']} frames / {r['text_tokens']} "
                                     f"text tokens, expected {max_steps} / {frames} / {text_tokens}")
    src = {c: [r["per_token_ms"] for r in runs[f"source:{c}"]] for c in ("dynamic", "static")}
    src_fwd = {c: [r["forward_ms"] for r in runs[f"source:{c}"]] for c in ("dynamic", "static")}
    rows = []
    for key, v in labels.items():
        med = medians(runs[key])
        row = {"variant": dataclasses.asdict(v), "label": v.label(codec), **med,
               "lookahead_frames": codec.default_decode_context if v.lookahead is None else v.lookahead}
        for what, base in (("per_step_ms", src[v.cache]), ("step_forward_ms", src_fwd[v.cache])):
            mine = [r[what] for r in runs[key]]
            row[f"{what}_vs_source"] = statistics.median(mine) / statistics.median(base)
            row[f"{what}_vs_source_paired"] = (statistics.median(a / b for a, b in zip(mine, base))
                                               if not setup.sequential else None)
        missing = [k for k in BREAKDOWN_KEYS if k not in row]
        assert not missing, f"{v}: no {missing}"
        rows.append(row)
    out = {
        "config": setup.name, "info": setup.info, "answer": {"seconds": args.answer_seconds, "frames": frames,
                                                            "max_steps": max_steps, "text_tokens": args.text_tokens,
                                                            "chunk_frames": args.chunk_frames},
        "prompt_length": prompt_length,
        "source": {c: {"per_token_ms": statistics.median(src[c]), "forward_ms": statistics.median(src_fwd[c]),
                       "runs_ms": src[c]} for c in src},
        "lm_head": lm_head,
        "source_interleaved": not setup.sequential,
        "rows": rows,
        "chat_api": ({"variant": labels["v0"].label(codec), **medians(runs["chat_api"])}
                     if "chat_api" in runs else None),
        "foreign_load": block["foreign_load"], "round_loads": block["round_loads"],
        "raw": {key: runs[key] for key in runs},
        "wall_s": time.perf_counter() - t_start,
    }
    probe.remove()
    return out


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def device_slug(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def print_result(res: dict, machine: dict):
    info, ans = res["info"], res["answer"]
    llm = info["llm"]
    print(f"\n## `{res['config']}` on {machine['device_name']}\n")
    print(f"- LLM: {llm.get('model_type')} hidden {llm.get('hidden_size')}, {llm.get('num_hidden_layers')} layers, "
          f"{llm.get('n_routed_experts')} routed experts top-{llm.get('num_experts_per_tok')}, "
          f"vocab {llm.get('vocab_size')} ({info['llm_params'] / 1e6:.1f} M source params, "
          f"{info['deeptalk_params'] / 1e6:.1f} M with speech), "
          f"{info['speech_experts_per_layer']} speech experts/layer, {info['dtype']}, experts {info['experts_impl']}, "
          f"attention {info['attn_impl']}, routing {info['routing_mode']}")
    w = info["whisper"]
    c = info["codec"]
    print(f"- Whisper encoder d_model {w['d_model']} x {w['encoder_layers']} layers "
          f"({info['encoder_params'] / 1e6:.1f} M), "
          f"adapter stride {info['adapter_stride']}; codec: {c['description']}, {c['num_streams']} streams x "
          f"{c['codebook_size']}, {c['frame_rate']:.2f} frames/s, delays {info['delays']}, default context "
          f"{c['default_decode_context']} ({c['params'] / 1e6:.1f} M params, {c['dtype']})")
    print(f"- question: {info['audio']['path']} ({info['audio']['seconds']:.2f} s) -> prompt {res['prompt_length']} "
          f"positions; answer forced to {ans['frames']} frames = {ans['frames'] / c['frame_rate']:.2f} s of speech "
          f"({ans['max_steps']} steps, text EOT after {ans['text_tokens']} tokens), "
          f"later chunks {ans['chunk_frames']} frames")
    print(f"- medians over rounds; other load {load_flag(res['foreign_load'])}; wall {res['wall_s']:.0f} s\n")
    print("| variant | features | encoder | LLM prefill | decode to 1st chunk (steps) | codec 1st chunk | "
          "stream overhead | **TTFC ms** |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['label']} | {r['features_ms']:.1f} | {r['encoder_ms']:.1f} | {r['llm_prefill_ms']:.1f} | "
              f"{r['decode_to_first_chunk_ms']:.1f} ({r['steps_to_first_chunk']:.0f}) | "
              f"{r['codec_first_chunk_ms']:.1f} | "
              f"{r['stream_overhead_ms']:.2f} | **{r['ttfc_ms']:.1f}** |")
    src = res["source"]
    print("\n| variant | per step ms | source per token ms | step / source | step forward ms | source forward ms | "
          "forward / source | rows run | codec total ms | **end to end ms** | RTF |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(r, what):
        paired = r[f"{what}_vs_source_paired"]
        return f"{r[f'{what}_vs_source']:.2f}" + (f" [{paired:.2f}]" if paired is not None else "")

    for r in res["rows"]:
        base = src[r["variant"]["cache"]]
        print(f"| {r['label']} | {r['per_step_ms']:.2f} | {base['per_token_ms']:.2f} | {ratio(r, 'per_step_ms')} | "
              f"{r['step_forward_ms']:.2f} | {base['forward_ms']:.2f} | {ratio(r, 'step_forward_ms')} | "
              f"{r['forward_rows']:.0f} | {r['codec_total_ms']:.1f} | **{r['e2e_ms']:.1f}** | {r['rtf']:.2f} |")
    head = res["lm_head"]
    print(f"\nLM head alone, one position: source {head['source_ms']:.3f} ms (vocab {head['source_vocab']}), DeepTalk "
          f"{head['deeptalk_ms']:.3f} ms (vocab {head['deeptalk_vocab']}, the audio blocks included).")
    best = min(res["rows"], key=lambda r: r["ttfc_ms"])
    target = " (target for v2lite: <= 60 ms)" if res["config"].startswith("v2lite") else ""
    print(f"\nFastest first chunk: `{best['label']}`, {best['ttfc_ms']:.1f} ms after "
          f"{best['steps_to_first_chunk']:.0f} steps{target}.")
    chat = res.get("chat_api")
    if chat:
        print(f"\n`SpeechChat.stream` (public API) with `{chat['variant']}`: first audio chunk "
              f"{chat['ttfc_ms']:.1f} ms after {chat['steps_to_first_chunk']:.0f} steps, total {chat['e2e_ms']:.1f} ms "
              f"({chat['steps']:.0f} steps, {chat['audio_s']:.2f} s of audio).")
    if not res["source_interleaved"]:
        print("\n(the source baseline was timed in its own block before the conversion, in the same process)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=CONFIG_NAMES + ("all",))
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--answer-seconds", type=float, default=3.0, help="speech in the forced answer")
    p.add_argument("--text-tokens", type=int, default=10, help="text tokens before the forced EOT")
    p.add_argument("--chunk-frames", type=int, default=8, help="frames per chunk after the first")
    p.add_argument("--grid", action="store_true", help="all 16 strategy x cache x first chunk x lookahead variants")
    p.add_argument("--no-chat", action="store_true", help="skip the SpeechChat.stream cross-check row")
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation (both models)")
    p.add_argument("--codec-dtype", default=None, choices=("float32", "bfloat16"),
                   help="SNAC dtype (default: the model's dtype)")
    p.add_argument("--audio", help="question audio file (default: the first spoken_qa test question)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--smoke", action="store_true", help="v2lite: shrunk sizes, allowed on the CPU (checks the path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help="wait up to S s for quiet CPUs per round")
    p.add_argument("--json", help="output file (default benchmarks/results/latency_<config>_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    machine = machine_info(args.threads)
    if device.type == "cuda":
        machine.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                       gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        machine["device_name"] = f"CPU {machine['cpu_model']}, {args.threads} torch thread(s)"
    print(f"Machine: {machine['device_name']}; CPU {machine['cpu_model']} ({machine['logical_cpus']} logical CPUs); "
          f"torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}", flush=True)

    names = list(CONFIG_NAMES) if args.config == "all" else [args.config]
    results = []
    for name in names:
        if name == "v2lite" and device.type != "cuda" and not args.smoke:
            print("\nv2lite: skipped, no CUDA device (bf16 15.7 B parameters; use --smoke to check the path on a CPU)")
            continue
        res = bench_config(name, device, args)
        res["machine"], res["args"] = machine, vars(args)
        results.append(res)
        print_result(res, machine)
        if not args.json:
            os.makedirs(RESULTS_DIR, exist_ok=True)
            path = os.path.join(RESULTS_DIR, f"latency_{res['config']}_{device_slug(device)}.json")
            with open(path, "w") as f:
                json.dump(res, f, indent=1, default=str)
            print(f"\nwrote {os.path.relpath(path)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json and results:
        payload = results[0] if len(results) == 1 else {"machine": machine, "results": results}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
