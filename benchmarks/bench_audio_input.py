#!/usr/bin/env python
# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Cost of DeepTalk's speech input on the CPU: real-length Whisper encoding and the adapter stride.

Everything runs in one process, on random weights (timing does not depend on the weight values):

(a) **encoder**: ``model.model.encode_audio`` (Whisper conv stem + encoder layers + adapter) on the
    clip's real length vs. padded to Whisper's 30 s window (``config.audio_pad_to_30s``), for clips
    of ``--lengths`` seconds, with a random encoder of the ``--encoder`` shape (default: whisper-base
    shape, d_model 512, 6 layers). The whisper-medium shape (d_model 1024, 24 layers, 307 M
    parameters; the paper's encoder) is timed too, with ``--medium-repeats`` (default 2) rounds and
    no padded warm-up, because one padded call takes 7-8.5 s on 2 cores; ``--no-medium`` skips it.
(b) **time to first token**: for adapter strides ``--strides`` (the authors' code uses 1, DeepTalk's
    default is 4) and every clip length: ``DeepTalkProcessor`` (log-mel feature extraction, chat
    template, multi-stream layout) + encoder + adapter + LLM prefill with the KV cache over the
    prompt ``<|system|>text<|eot|><|user|>BOA AUDIO_IN*n EOA<|eot|><|assistant|>``, keeping the
    logits of the last position only (what ``generate()`` needs to pick the first token). The LLM is
    a small converted qwen3_moe (hidden 256, 4 layers, 16 routed experts, top-4; 25% speech experts)
    with 4 audio streams. A reference row per length uses stride 1 with the clip padded to 30 s (the
    authors' setting: 1500 audio positions for every clip).

The speech is real espeak-ng speech from the shipped ``spoken_qa`` demo corpus: question clips
(~0.9-2.3 s each) joined with 0.2 s of silence and cut to the exact length.

Timing: ``torch.inference_mode``, ``torch.set_num_threads(--threads)`` (default 2), ``--warmup``
untimed rounds, then ``--repeats`` rounds; each round calls every variant once, in a rotating order,
and the tables show medians over rounds (padded / real: the median of the per-round ratios; TTFT vs
stride 4: the ratio of the medians). *Other load* is
how many CPU cores other processes used during a round (``/proc/stat`` busy time minus this
process's CPU time; median over rounds, flagged above 0.25). On a shared 2-core machine another busy
process slows 2-thread torch far more than its share, so use ``--wait-idle S`` (wait up to S s for
quiet CPUs before each round) and ``--retries N`` (re-run up to N disturbed rounds).

    HF_HUB_OFFLINE=1 python benchmarks/bench_audio_input.py                 # ~2 min on 2 idle cores
    HF_HUB_OFFLINE=1 python benchmarks/bench_audio_input.py --wait-idle 20 --retries 6   # shared machine
    HF_HUB_OFFLINE=1 python benchmarks/bench_audio_input.py --no-medium --json audio.json

This is a script, not a test. It checks that the inputs are consistent (positions per clip, finite
logits) before timing, but it never asserts speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deeptalk import DeepTalkForCausalLM, DeepTalkProcessor  # noqa: E402
from deeptalk.data import DEMO_SAMPLING_RATE, load_demo_corpus  # noqa: E402
from deeptalk.processing.tokenizer import train_demo_tokenizer  # noqa: E402
from deeptalk.tiny import tiny_text_moe  # noqa: E402

try:  # run as a script (benchmarks/ is sys.path[0]) or as `python -m benchmarks.<script>`
    from _common import (
        EXPERTS_IMPLS,
        NOISY_FOREIGN_LOAD,
        WHISPER_SHAPES,
        ForeignLoad,
        load_flag,
        machine_info,
        wait_for_idle,
        whisper_config,
    )
except ModuleNotFoundError:
    from benchmarks._common import (
        EXPERTS_IMPLS,
        NOISY_FOREIGN_LOAD,
        WHISPER_SHAPES,
        ForeignLoad,
        load_flag,
        machine_info,
        wait_for_idle,
        whisper_config,
    )

GAP_S = 0.2  # silence between joined corpus clips
SYSTEM_PROMPT = "answer the question"

# Whisper encoder shapes (d_model, layers, heads, ffn). Only the encoder is built.
# The LLM: a "small" qwen3_moe (as in bench_moe.py), vocabulary = the demo tokenizer's.
LLM_KWARGS = dict(hidden_size=256, num_hidden_layers=4, num_experts=16, top_k=4, num_attention_heads=8,
                  num_key_value_heads=4, moe_intermediate_size=128, intermediate_size=512, head_dim=32,
                  max_position_embeddings=4096)
STREAMS, CODEBOOK = 4, 1024


# --------------------------------------------------------------------------------------------------
# Inputs and models
# --------------------------------------------------------------------------------------------------
def speech_clips(corpus, lengths_s: list[float]) -> dict[float, np.ndarray]:
    """Real corpus speech of exactly `length` seconds: question clips joined by GAP_S of silence."""
    rows = corpus["train"]
    gap = np.zeros(int(GAP_S * DEMO_SAMPLING_RATE), dtype=np.float32)
    pieces, total, i = [], 0, 0
    need = int(max(lengths_s) * DEMO_SAMPLING_RATE)
    while total < need:
        audio = rows[i]["question_audio"]
        assert audio["sampling_rate"] == DEMO_SAMPLING_RATE
        pieces += [np.asarray(audio["array"], dtype=np.float32), gap]
        total += len(pieces[-2]) + len(gap)
        i += 1
    joined = np.concatenate(pieces)
    return {length: joined[: int(length * DEMO_SAMPLING_RATE)].copy() for length in lengths_s}





def encoder_params(model) -> int:
    """Parameters of the Whisper encoder (the sinusoidal position table included)."""
    return sum(p.numel() for p in model.model.audio_encoder.parameters())


def build_processor(tokenizer, stride: int, pad_to_30s: bool) -> DeepTalkProcessor:
    return DeepTalkProcessor.from_codec_layout(tokenizer, num_audio_streams=STREAMS, codebook_size=CODEBOOK,
                                               audio_adapter_stride=stride, audio_pad_to_30s=pad_to_30s)


def build_model(source, processor: DeepTalkProcessor, encoder_shape: str, impl: str) -> DeepTalkForCausalLM:
    layers = [i for i, layer in enumerate(source.model.layers) if hasattr(layer.mlp, "experts")]
    experts = source.config.num_experts
    gen = torch.Generator().manual_seed(0)
    speech = [sorted(torch.randperm(experts, generator=gen)[: experts // 4].tolist()) for _ in layers]
    torch.manual_seed(0)
    model = DeepTalkForCausalLM.from_text_moe(source, speech_experts=speech, progress=False)
    model.add_speech(audio_config=whisper_config(encoder_shape), mean_resizing=False, **processor.model_speech_kwargs())
    model.set_experts_implementation(impl)
    return model.eval()


def prompt(clip: np.ndarray) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "audio", "audio": clip, "sampling_rate": DEMO_SAMPLING_RATE}]}]


def model_inputs(processor, clip) -> dict:
    batch = processor([prompt(clip)], add_generation_prompt=True)
    return {k: v for k, v in batch.items() if k != "labels"}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def run_rounds(variants: dict, warmup: int, repeats: int, wait_idle_s: float, label: str, retries: int = 0) -> dict:
    """variants: name -> fn() returning {stage: ms}. Interleaved rounds with a rotating order.

    With `wait_idle_s`, each round first waits (up to that long) for quiet CPUs. A round during which
    other processes kept more than NOISY_FOREIGN_LOAD cores busy is run again, at most `retries`
    times in all; the re-run replaces it."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    loads, rerun, t0 = [], 0, time.perf_counter()
    for r in range(repeats):
        shift = r % len(names)
        while True:
            if wait_idle_s:
                wait_for_idle(wait_idle_s)
            with ForeignLoad() as fl:
                sample = {name: variants[name]() for name in names[shift:] + names[:shift]}
            if fl.cores is not None and fl.cores > NOISY_FOREIGN_LOAD and rerun < retries:
                rerun += 1
                continue
            break
        loads.append(fl.cores)
        for name in names:
            times[name].append(sample[name])
    known = [x for x in loads if x is not None]
    load = statistics.median(known) if known else None
    print(f"  {label}: {time.perf_counter() - t0:.1f} s, other load per round {[round(x, 2) for x in known]} "
          f"({rerun} noisy round(s) re-run)", file=sys.stderr)
    return {"times": times, "foreign_load": load, "round_loads": loads, "rounds_rerun": rerun}


def median_stage(samples: list[dict], stage: str) -> float:
    return statistics.median(s[stage] for s in samples)


def median_ratio(num: list[dict], den: list[dict], stage: str) -> float:
    return statistics.median(a[stage] / b[stage] for a, b in zip(num, den))


# --------------------------------------------------------------------------------------------------
# (a) encoder: real length vs 30 s
# --------------------------------------------------------------------------------------------------
def bench_encoder(model, processor, clips, lengths, warmup, repeats, wait_idle_s, label, padded_once=False,
                  retries=0) -> dict:
    """`encode_audio` on the real length vs. with `config.audio_pad_to_30s` (toggled on the model's
    config for the call). A padded call encodes 3000 frames whatever the clip, so `padded_once`
    times it for the longest clip only and compares every length with that one call."""
    cfg = model.config
    assert model.model.config is cfg
    features = {}
    for length in lengths:
        batch = model_inputs(processor, clips[length])
        features[length] = (batch["input_features"], batch["audio_feature_lengths"])

    def encode(length, pad):
        def fn():
            cfg.audio_pad_to_30s = pad
            try:
                feats, lens = features[length]
                ms = timed(lambda: model.model.encode_audio(feats, lens))
            finally:
                cfg.audio_pad_to_30s = False
            return {"encoder": ms}
        return fn

    with torch.inference_mode():  # checks: one adapter frame per config.num_audio_positions, finite
        for length in lengths:
            feats, lens = features[length]
            real = model.model.encode_audio(feats, lens)
            assert real.shape[0] == cfg.num_audio_positions(int(lens[0])) and torch.isfinite(real).all()
        padded_lengths = lengths[-1:] if padded_once else lengths
        variants = {f"{length}s/real": encode(length, False) for length in lengths}
        variants.update({f"{length}s/30s": encode(length, True) for length in padded_lengths})
        result = run_rounds(variants, warmup, repeats, wait_idle_s, label, retries)
        cfg.audio_pad_to_30s = True
        try:
            feats, lens = features[lengths[0]]
            assert model.model.encode_audio(feats, lens).shape[0] == cfg.num_audio_positions(int(lens[0]))
        finally:
            cfg.audio_pad_to_30s = False
    rows = []
    for length in lengths:
        real = result["times"][f"{length}s/real"]
        padded = result["times"][f"{(padded_lengths[0] if padded_once else length)}s/30s"]
        frames = int(features[length][1][0])
        rows.append({
            "clip_s": length, "mel_frames": frames, "encoder_frames": (frames - 1) // 2 + 1,
            "real_ms": median_stage(real, "encoder"), "padded_ms": median_stage(padded, "encoder"),
            "ratio": median_ratio(padded, real, "encoder"),
        })
    return {"rows": rows, **{k: v for k, v in result.items() if k != "times"}, "raw": result["times"]}


# --------------------------------------------------------------------------------------------------
# (b) time to first token over strides
# --------------------------------------------------------------------------------------------------
def bench_ttft(setups, clips, lengths, warmup, repeats, wait_idle_s, retries=0) -> dict:
    """setups: name -> (model, processor). One end-to-end call per variant and round: processor
    (features + layout), then `model(..., use_cache=True, logits_to_keep=1)` and the argmax of the
    first token. `encode_audio_clips` is wrapped (on the instance, for this benchmark only) to time the
    encoder + adapter inside that call; LLM prefill = forward - encoder (stream-embedding mean,
    audio splice, decoder layers, head)."""
    prepared = {}
    with torch.inference_mode():
        for name, (model, processor) in setups.items():
            for length in lengths:
                batch = model_inputs(processor, clips[length])
                n_audio = int(batch["audio_input_mask"].sum())
                assert n_audio == model.config.num_audio_positions(int(batch["audio_feature_lengths"][0]))
                logits = model(**batch, use_cache=True, logits_to_keep=1).logits
                assert logits.shape[1] == 1 and torch.isfinite(logits).all()
                prepared[(name, length)] = dict(n_audio=n_audio, positions=batch["input_ids"].shape[-1])

    def variant(name, length):
        model, processor = setups[name]
        clip = clips[length]
        inner = type(model.model).encode_audio_clips.__get__(model.model)  # what the forward calls
        spent = []

        def encode_audio_clips(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            spent.append((time.perf_counter() - t0) * 1000.0)
            return out

        def fn():
            spent.clear()
            model.model.encode_audio_clips = encode_audio_clips
            try:
                t0 = time.perf_counter()
                inputs = model_inputs(processor, clip)
                t1 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
                t2 = time.perf_counter()
            finally:
                del model.model.encode_audio_clips
            assert len(spent) == 1
            forward = (t2 - t1) * 1000.0
            return {"proc": (t1 - t0) * 1000.0, "encoder": spent[0], "llm": forward - spent[0],
                    "ttft": (t2 - t0) * 1000.0}
        return fn

    with torch.inference_mode():
        variants = {f"{name}@{length}s": variant(name, length) for length in lengths for name in setups}
        result = run_rounds(variants, warmup, repeats, wait_idle_s, "time to first token", retries)
    rows = []
    for length in lengths:
        for name in setups:
            samples = result["times"][f"{name}@{length}s"]
            p = prepared[(name, length)]
            rows.append({
                "clip_s": length, "setup": name, "audio_positions": p["n_audio"], "prompt_positions": p["positions"],
                **{f"{stage}_ms": median_stage(samples, stage) for stage in ("proc", "encoder", "llm", "ttft")},
            })
    return {"rows": rows, **{k: v for k, v in result.items() if k != "times"}, "raw": result["times"]}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def print_machine(info, args):
    print(f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}; "
          f"torch {info['torch']}, transformers {info['transformers']}, deeptalk {info['deeptalk']}, "
          f"Python {info['python']}. Experts implementation {args.experts_impl}; warm-up {args.warmup}, "
          f"median of {args.repeats} rounds.")
    print()


def print_encoder(title, enc):
    print(f"### (a) Encoder + adapter (`encode_audio`), {title}: real length vs. padded to 30 s "
          f"(other load {load_flag(enc['foreign_load'])}, {enc['rounds_rerun']} round(s) re-run)")
    print()
    print("| clip | mel frames | encoder frames | real-length ms | padded 30 s ms | padded / real |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in enc["rows"]:
        print(f"| {r['clip_s']:g} s | {r['mel_frames']} | {r['encoder_frames']} | {r['real_ms']:.1f} | "
              f"{r['padded_ms']:.1f} | {r['ratio']:.1f}x |")
    print()


def print_ttft(ttft, encoder_shape):
    print(f"### (b) Time to first token by adapter stride ({encoder_shape} encoder shape, small qwen3_moe LLM; "
          f"other load {load_flag(ttft['foreign_load'])}, {ttft['rounds_rerun']} round(s) re-run)")
    print()
    print("| clip | stride | audio positions | prompt positions | processor ms | encoder+adapter ms | "
          "LLM prefill ms | **TTFT ms** | TTFT vs stride 4 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["clip_s"]: r["ttft_ms"] for r in ttft["rows"] if r["setup"] == "4"}
    for r in ttft["rows"]:
        rel = f"{r['ttft_ms'] / base[r['clip_s']]:.2f}x" if r["clip_s"] in base else "-"
        print(f"| {r['clip_s']:g} s | {r['setup']} | {r['audio_positions']} | {r['prompt_positions']} | "
              f"{r['proc_ms']:.1f} | {r['encoder_ms']:.1f} | {r['llm_ms']:.1f} | **{r['ttft_ms']:.1f}** | {rel} |")
    print()
    print("TTFT = processor + `model(**inputs, use_cache=True, logits_to_keep=1)` + argmax, one call; the stage "
          "columns are medians of the parts of that call (LLM prefill = forward - encoder).")
    print()


def parse_floats(value: str) -> list[float]:
    return [float(x) for x in value.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=parse_floats, default=[2.0, 5.0, 10.0], help="clip lengths in s (<= 30)")
    parser.add_argument("--strides", default="1,2,4,8", help="adapter strides for (b)")
    parser.add_argument("--encoder", choices=sorted(WHISPER_SHAPES), default="base",
                        help="Whisper encoder shape for (a) and (b) (random weights)")
    parser.add_argument("--no-medium", dest="medium", action="store_false",
                        help="skip (a) with the whisper-medium shape (~25 s)")
    parser.add_argument("--medium-repeats", type=int, default=2)
    parser.add_argument("--no-padded-reference", action="store_true",
                        help="leave out the stride 1 + padded 30 s rows of (b)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts-impl", default="grouped_mm", choices=EXPERTS_IMPLS)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each timed round, wait up to S s for quiet CPUs (shared machines)")
    parser.add_argument("--retries", type=int, default=0,
                        help="re-run up to this many rounds (per table) that other processes disturbed")
    parser.add_argument("--json", metavar="PATH", help="write all raw times, configs and machine info")
    args = parser.parse_args(argv)
    strides = [int(s) for s in args.strides.split(",") if s.strip()]
    if any(not 0 < length <= 30 for length in args.lengths):
        parser.error("--lengths must lie in (0, 30] s")

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)

    corpus = load_demo_corpus("spoken_qa", splits=["train"])
    clips = speech_clips(corpus, args.lengths)
    tokenizer = train_demo_tokenizer([r["question_text"] + " " + r["answer_text"] for r in corpus["train"]])
    processors = {str(s): build_processor(tokenizer, s, False) for s in strides}
    if not args.no_padded_reference:
        processors["1 + pad 30 s"] = build_processor(tokenizer, 1, True)
    text_vocab = next(iter(processors.values())).layout.text_vocab_size
    source = tiny_text_moe("qwen3_moe", seed=0, vocab_size=text_vocab, **LLM_KWARGS)
    source.set_experts_implementation(args.experts_impl)
    setups = {
        name: (build_model(source, proc, args.encoder, args.experts_impl), proc) for name, proc in processors.items()
    }
    print(f"built {len(setups)} models in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    enc_model, enc_proc = setups["4"] if "4" in setups else next(iter(setups.values()))
    enc_params = encoder_params(enc_model)
    encoder = bench_encoder(enc_model, enc_proc, clips, args.lengths, args.warmup, args.repeats, args.wait_idle,
                            f"encoder {args.encoder}", retries=args.retries)
    ttft = bench_ttft(setups, clips, args.lengths, args.warmup, args.repeats, args.wait_idle, args.retries)
    medium = None
    if args.medium:
        del setups
        t0 = time.perf_counter()
        medium_model = build_model(source, enc_proc, "medium", args.experts_impl)
        medium_params = encoder_params(medium_model)
        print(f"built the whisper-medium-shape model in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        medium = bench_encoder(medium_model, enc_proc, clips, args.lengths, 0, args.medium_repeats, args.wait_idle,
                               "encoder medium", padded_once=True, retries=args.retries)
        medium["warmup"] = "one real-length call per clip (the checks); no padded warm-up"

    print()
    print_machine(info, args)
    d, layers, heads, ffn = WHISPER_SHAPES[args.encoder]
    print_encoder(f"whisper-{args.encoder} shape (d_model {d}, {layers} layers, {heads} heads, ffn {ffn}, "
                  f"{enc_params / 1e6:.1f} M params)", encoder)
    if medium is not None:
        d, layers, heads, ffn = WHISPER_SHAPES["medium"]
        print_encoder(f"whisper-medium shape (d_model {d}, {layers} layers, {medium_params / 1e6:.0f} M "
                      f"params; {args.medium_repeats} round(s), no padded warm-up, one padded call per round "
                      "compared with every length)", medium)
    print_ttft(ttft, f"whisper-{args.encoder}")
    total = time.perf_counter() - start
    print(f"Total wall time {total:.0f} s.")

    if args.json:
        payload = {
            "machine": info, "args": {k: v for k, v in vars(args).items()}, "total_s": total,
            "llm_config": source.config.to_dict(), "streams": STREAMS, "codebook_size": CODEBOOK,
            "encoder_shapes": {
                k: dict(zip(("d_model", "layers", "heads", "ffn"), v)) for k, v in WHISPER_SHAPES.items()
            },
            "encoder": encoder, "encoder_medium": medium, "ttft": ttft,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
