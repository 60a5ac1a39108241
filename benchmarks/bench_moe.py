#!/usr/bin/env python
# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Speed of a converted DeepTalk model vs. its transformers source MoE model (CPU, one process).

For each family and size it builds a random source `*ForCausalLM` (``deeptalk.tiny``), converts it
with ``DeepTalkForCausalLM.from_text_moe`` (25% of each layer's routed experts in the speech bank,
seeded), checks that free-mode logits equal the source's, and times

* prefill: one forward over ``--batch x --seq`` tokens (no cache),
* decode:  per-token greedy ``generate()`` step with the KV cache (``--decode-batch`` prompts of
  ``--prompt-len`` tokens, ``--new-tokens`` new tokens, ``min_new_tokens == max_new_tokens``,
  ``do_sample=False``). Each step is time-stamped by a no-op logits processor, so the prefill step is
  not counted: per token = (last stamp - first stamp) / (new_tokens - 1),

for the source and the converted model in ``free``, ``speech_only`` and ``text_only`` routing.
Runs are interleaved (source, converted modes, in a rotating order, one call each per round) and
the median over rounds is reported, with the ratio converted / source. The ratio is given two ways:
of the medians, and the median of the per-round ratios (robust to load drift on a shared machine).

Both models run the same transformers experts implementation (``--experts-impl``), set with
``set_experts_implementation`` on both and checked on every experts module before timing.

    HF_HUB_OFFLINE=1 python benchmarks/bench_moe.py                      # qwen3_moe + deepseek_v2
    HF_HUB_OFFLINE=1 python benchmarks/bench_moe.py --families all --json bench.json
    HF_HUB_OFFLINE=1 python benchmarks/bench_moe.py --profile           # + where the time goes

This is a script, not a test: it asserts correctness (so it never times a broken model) but does
not assert speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LogitsProcessorList  # noqa: E402

from deeptalk import DeepTalkForCausalLM  # noqa: E402
from deeptalk.tiny import TINY_FAMILIES, tiny_text_moe_config  # noqa: E402

try:  # run as a script (benchmarks/ is sys.path[0]) or as `python -m benchmarks.<script>`
    from _common import (
        EXPERTS_IMPLS,
        NOISY_FOREIGN_LOAD,
        ForeignLoad,
        load_flag,
        machine_info,
        step_timer,
        wait_for_idle,
    )
except ModuleNotFoundError:
    from benchmarks._common import (
        EXPERTS_IMPLS,
        NOISY_FOREIGN_LOAD,
        ForeignLoad,
        load_flag,
        machine_info,
        step_timer,
        wait_for_idle,
    )

MODES = ("free", "speech_only", "text_only")
FREE_MODE_TOLERANCE = 1e-4
# `cpu` counts the CPU time of this process only, so time other processes take from it while it waits for a
# core is left out (wall time is what a user waits; CPU time is steadier on a shared machine)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]

# "small": hidden 256, 4 layers, 16 routed experts, top-4, expert intermediate 128, head dim 32.
SMALL_COMMON = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_experts=16, top_k=4,
                    num_attention_heads=8, num_key_value_heads=4)
SMALL_FAMILY = {
    "deepseek_v2": dict(moe_intermediate_size=128, intermediate_size=512, kv_lora_rank=64, qk_rope_head_dim=16,
                        qk_nope_head_dim=32, v_head_dim=32, num_key_value_heads=8),
    "qwen3_moe": dict(moe_intermediate_size=128, intermediate_size=512, head_dim=32),
    "qwen2_moe": dict(moe_intermediate_size=128, intermediate_size=512, shared_expert_intermediate_size=256),
    "olmoe": dict(intermediate_size=128),
    "mixtral": dict(intermediate_size=128),
}


def size_overrides(family: str, size: str) -> dict:
    if size == "tiny":
        return {}
    if size == "small":
        return {**SMALL_COMMON, **SMALL_FAMILY[family]}
    raise ValueError(f"unknown size {size!r}")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def moe_layers(source) -> list[int]:
    return [
        i for i, layer in enumerate(source.model.layers) if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")
    ]


def speech_map(source, fraction: float, seed: int) -> list[list[int]]:
    """`fraction` of each MoE layer's routed experts as speech experts, seeded, one list per MoE layer."""
    rng = random.Random(seed)
    out = []
    for i in moe_layers(source):
        num_experts = source.model.layers[i].mlp.experts.gate_up_proj.shape[0]
        k = max(1, round(fraction * num_experts))
        out.append(sorted(rng.sample(range(num_experts), k)))
    return out


def experts_impls_in_use(model) -> set[str]:
    """The implementation every experts module will dispatch to (what `use_experts_implementation` reads)."""
    return {
        m.config._experts_implementation for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "config")
    }


def build_pair(family: str, size: str, impl: str, speech_fraction: float, seed: int):
    torch.manual_seed(seed)
    config = tiny_text_moe_config(family, **size_overrides(family, size))
    source = AutoModelForCausalLM.from_config(config).eval()
    speech = speech_map(source, speech_fraction, seed)
    converted = DeepTalkForCausalLM.from_text_moe(source, speech_experts=speech, progress=False).eval()
    # from_text_moe does not carry the source's experts implementation over: set it on both.
    source.set_experts_implementation(impl)
    converted.set_experts_implementation(impl)
    for name, model in (("source", source), ("converted", converted)):
        used = experts_impls_in_use(model)
        if used != {impl}:
            raise RuntimeError(f"{family}/{size}: {name} experts modules use {used}, expected {{{impl!r}}}")
    info = {
        "config": {k: getattr(config, k, None) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_local_experts",
            "num_experts_per_tok", "moe_intermediate_size", "intermediate_size")
            if getattr(config, k, None) is not None},
        "moe_layers": moe_layers(source),
        "speech_experts": speech,
        "params": sum(p.numel() for p in source.parameters()),
        "experts_impl": impl,
        "attn_impl": {"source": source.config._attn_implementation,
                      "converted": converted.config.text_config._attn_implementation},
    }
    return source, converted, config, info


@torch.inference_mode()
def check_models(family, size, source, converted, input_ids, prompt_ids, new_tokens):
    """Free mode must reproduce the source (logits and greedy tokens); masked modes must run."""
    ref = source(input_ids).logits.float()
    got = converted(input_ids, routing_mode="free").logits.float()
    diff = (ref - got).abs().max().item()
    if not diff <= FREE_MODE_TOLERANCE:
        raise AssertionError(f"{family}/{size}: free-mode logits differ from the source by {diff:.3e} "
                             f"(> {FREE_MODE_TOLERANCE}); not timing a broken model.")
    for mode in MODES[1:]:
        out = converted(input_ids, routing_mode=mode).logits
        if not torch.isfinite(out).all():
            raise AssertionError(f"{family}/{size}: non-finite logits in {mode} mode")
    kw = generate_kwargs(prompt_ids, new_tokens)
    ref_tokens = source.generate(prompt_ids, **kw)
    got_tokens = converted.generate(prompt_ids, routing_mode="free", **kw)
    same_tokens = bool(torch.equal(ref_tokens, got_tokens))
    if ref_tokens.shape != got_tokens.shape:
        raise AssertionError(f"{family}/{size}: generate() shapes differ {ref_tokens.shape} vs {got_tokens.shape}")
    return diff, same_tokens


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def generate_kwargs(prompt_ids, new_tokens, timer=None):
    kw = dict(attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=0, use_cache=True)
    if timer is not None:
        kw["logits_processor"] = LogitsProcessorList([timer])
    return kw


def variant_kwargs(variant: str) -> dict:
    return {} if variant == "source" else {"routing_mode": variant.split(":", 1)[1]}


def time_prefill(model, variant, input_ids) -> float:
    kw = variant_kwargs(variant)
    t0 = clock()
    model(input_ids, use_cache=False, **kw)
    return (clock() - t0) * 1e3


def time_decode(model, variant, prompt_ids, new_tokens) -> float:
    timer = step_timer(clock)
    model.generate(prompt_ids, **generate_kwargs(prompt_ids, new_tokens, timer), **variant_kwargs(variant))
    stamps = timer.stamps
    assert len(stamps) == new_tokens, (len(stamps), new_tokens)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


@torch.inference_mode()
def ops_per_decode_step(model, variant, prompt_ids, steps: int = 4) -> float:
    """aten operators one cached decode step dispatches: a load-independent view of per-token work, since
    small models on a CPU spend their decode time in per-operator overhead."""
    kw = variant_kwargs(variant)
    out = model(prompt_ids, use_cache=True, **kw)
    token = prompt_ids[:, -1:]
    out = model(token, past_key_values=out.past_key_values, use_cache=True, **kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(token, past_key_values=out.past_key_values, use_cache=True, **kw)
    return sum(e.name.startswith("aten::") for e in prof.events()) / steps


@torch.inference_mode()
def run_interleaved(models: dict, fn, warmup: int, repeats: int, wait_idle_s: float = 0.0):
    """Call `fn(model, variant)` for every variant, one call each per round, rotating the order."""
    variants = list(models)
    for _ in range(warmup):
        for v in variants:
            fn(models[v], v)
    if wait_idle_s > 0:
        wait_for_idle(wait_idle_s)
    times = defaultdict(list)
    with ForeignLoad() as load:
        for r in range(repeats):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for v in order:
                times[v].append(fn(models[v], v))
    return dict(times), load.cores


def summarize(timed) -> dict:
    times, foreign_cores = timed
    src = times["source"]
    out = {"foreign_load_cores": foreign_cores}
    for v, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[v] = {
            "median_ms": med,
            "min_ms": min(ts),
            "iqr_ms": q[2] - q[0],
            "ratio_of_medians": med / statistics.median(src),
            "median_paired_ratio": statistics.median(t / s for t, s in zip(ts, src)),
            "times_ms": ts,
        }
    return out


# --------------------------------------------------------------------------------------------------
# Profile (optional): where does the converted model spend its extra time in free mode?
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def labelled_stages():
    """Wrap DeepTalk's and transformers' MoE stages in `record_function` labels (runtime only)."""
    from transformers.integrations import moe as tf_moe

    from deeptalk import modeling_deeptalk as md

    patches = []

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, wrapped)

    wrap(md.DeepTalkSparseMoeBlock, "forward", "dt::moe_block")
    wrap(md.DeepTalkRouter, "forward", "dt::router_linear")
    wrap(md, "route_tokens", "dt::route_tokens")
    wrap(md, "allowed_experts", "dt::allowed_experts")
    wrap(md.DeepTalkSparseMoeBlock, "_run_experts", "dt::run_experts(dispatch+banks)")
    # The experts kernels are looked up in ALL_EXPERTS_FUNCTIONS at every call: override them locally.
    interface = tf_moe.ALL_EXPERTS_FUNCTIONS
    saved_local = dict(interface._local_mapping)
    for key in ("grouped_mm", "batched_mm"):
        kernel = interface[key]

        def labelled(*args, _kernel=kernel, _label=f"tf::{key}_experts_kernel", **kwargs):
            with torch.profiler.record_function(_label):
                return _kernel(*args, **kwargs)

        interface[key] = labelled
    try:
        yield
    finally:
        interface._local_mapping.clear()
        interface._local_mapping.update(saved_local)
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


@contextlib.contextmanager
def label_source_blocks(source):
    """Label the source's MoE block and router forwards (instance-level, undone on exit)."""
    done = []
    for i in moe_layers(source):
        mlp = source.model.layers[i].mlp
        for module, label in ((mlp, "src::moe_block"), (mlp.gate, "src::router(gate)")):
            original = module.forward

            def wrapped(*args, _original=original, _label=label, **kwargs):
                with torch.profiler.record_function(_label):
                    return _original(*args, **kwargs)

            module.forward = wrapped
            done.append(module)
    try:
        yield
    finally:
        for module in done:
            del module.forward


@torch.inference_mode()
def profile_forward(source, converted, input_ids, iters: int, top: int, label: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    result = {}
    with labelled_stages(), label_source_blocks(source):
        for name, call in (("source", lambda: source(input_ids, use_cache=False)),
                           ("converted", lambda: converted(input_ids, use_cache=False, routing_mode="free"))):
            for _ in range(3):
                call()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(iters):
                    call()
            rows = {}
            for evt in prof.key_averages():
                rows[evt.key] = {"self_us": evt.self_cpu_time_total / iters, "total_us": evt.cpu_time_total / iters,
                                 "calls": evt.count / iters}
            result[name] = rows
    src, conv = result["source"], result["converted"]
    total = {n: sum(r["self_us"] for r in rows.values()) for n, rows in result.items()}
    print(f"\n### Profile: {label}, free mode, {tuple(input_ids.shape)} forward, {iters} iters "
          f"(torch.profiler, per forward)\n")
    print(f"Profiled self-CPU total per forward: source {total['source'] / 1e3:.2f} ms, "
          f"converted {total['converted'] / 1e3:.2f} ms (profiler overhead included)\n")
    stages = [k for k in sorted(set(src) | set(conv)) if k.startswith(("dt::", "src::", "tf::"))]
    print("| stage (record_function) | source total us | converted total us | calls/fwd src | calls/fwd conv |")
    print("|---|---:|---:|---:|---:|")
    for k in stages:
        s, c = src.get(k, {}), conv.get(k, {})
        print(f"| {k} | {s.get('total_us', 0):.0f} | {c.get('total_us', 0):.0f} | "
              f"{s.get('calls', 0):.1f} | {c.get('calls', 0):.1f} |")
    ops = [k for k in set(src) | set(conv) if k.startswith("aten::")]
    ops.sort(key=lambda k: -abs(conv.get(k, {}).get("self_us", 0) - src.get(k, {}).get("self_us", 0)))
    print(f"\nTop {top} aten ops by |converted - source| self-CPU time per forward:\n")
    print("| op | source self us | converted self us | delta us | calls/fwd src | calls/fwd conv |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in ops[:top]:
        s, c = src.get(k, {}), conv.get(k, {})
        print(f"| {k} | {s.get('self_us', 0):.0f} | {c.get('self_us', 0):.0f} | "
              f"{c.get('self_us', 0) - s.get('self_us', 0):+.0f} | {s.get('calls', 0):.1f} | {c.get('calls', 0):.1f} |")
    return {"per_forward_us": result, "self_total_us": total}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_list(value: str, allowed, name: str) -> list[str]:
    items = list(allowed) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"--{name}: unknown {bad}; choose from {list(allowed)} or 'all'")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="qwen3_moe,deepseek_v2", help=f"comma list or 'all' of {list(TINY_FAMILIES)}")
    p.add_argument("--sizes", default="tiny,small", help="comma list of tiny,small")
    p.add_argument("--modes", default=",".join(MODES), help=f"converted-model routing modes to time, of {list(MODES)}")
    p.add_argument("--batch", type=int, default=4, help="prefill batch size")
    p.add_argument("--seq", type=int, default=128, help="prefill sequence length")
    p.add_argument("--decode-batch", type=int, default=1, help="decode batch size")
    p.add_argument("--prompt-len", type=int, default=32, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode run")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds (every variant once per round)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--clock", default="wall", choices=CLOCKS,
                   help="wall: elapsed time; cpu: this process's CPU time (steadier while other processes run)")
    p.add_argument("--experts-impl", default="grouped_mm", choices=EXPERTS_IMPLS,
                   help="transformers experts implementation, set on BOTH models")
    p.add_argument("--speech-fraction", type=float, default=0.25,
                   help="fraction of each layer's experts in the speech bank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each timed block, wait up to S seconds until other processes are idle")
    p.add_argument("--no-decode", action="store_true", help="skip the decode timing")
    p.add_argument("--speech-streams", type=int, default=7, help="audio streams of the speech-step layout (SNAC: 7)")
    p.add_argument("--speech-codebook", type=int, default=4096,
                   help="codebook size of the speech-step layout (SNAC: 4096)")
    p.add_argument("--no-speech-step", action="store_true", help="skip the speech decode step timing")
    p.add_argument("--profile", action="store_true",
                   help="also profile free-mode prefill (torch.profiler) per family/size")
    p.add_argument("--profile-iters", type=int, default=10)
    p.add_argument("--json", help="write raw numbers here")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run the whole benchmark in N fresh processes, one after another, and report the median "
                        "over processes of each ratio (a process's memory layout moves its ratios by a few %%)")
    args = p.parse_args(argv)
    if args.processes > 1:
        return run_processes(argv if argv is not None else sys.argv[1:], args)

    families = parse_list(args.families, TINY_FAMILIES, "families")
    sizes = parse_list(args.sizes, ("tiny", "small"), "sizes")
    modes = parse_list(args.modes, MODES, "modes")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    info = machine_info(args.threads)
    print("## Machine")
    print(f"- CPU: {info['cpu_model']} ({info['logical_cpus']} logical CPUs visible), torch threads: {args.threads}")
    print(f"- torch {info['torch']}, transformers {info['transformers']}, deeptalk {info['deeptalk']}, "
          f"Python {info['python']}")
    if info["loadavg_start"]:
        print(f"- load average at start: {', '.join(f'{x:.2f}' for x in info['loadavg_start'])}")
    print(f"- experts implementation (both models): {args.experts_impl}; prefill {args.batch}x{args.seq}; "
          f"decode batch {args.decode_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
          f"warm-up {args.warmup}, repeats {args.repeats} (median); speech experts {args.speech_fraction:.0%}/layer; "
          f"clock: {args.clock}")
    sys.stdout.flush()

    variants = ["source"] + [f"converted:{m}" for m in modes]
    results = []
    t_start = time.perf_counter()
    for family in families:
        for size in sizes:
            t0 = time.perf_counter()
            source, converted, config, minfo = build_pair(
                family, size, args.experts_impl, args.speech_fraction, args.seed
            )
            models = {v: (source if v == "source" else converted) for v in variants}
            gen = torch.Generator().manual_seed(args.seed)
            input_ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=gen)
            prompt_ids = torch.randint(3, config.vocab_size, (args.decode_batch, args.prompt_len), generator=gen)
            diff, same_tokens = check_models(family, size, source, converted, input_ids, prompt_ids, args.new_tokens)
            entry = {"family": family, "size": size, **minfo, "free_max_abs_logit_diff": diff,
                     "free_greedy_tokens_equal": same_tokens}
            entry["prefill"] = summarize(run_interleaved(
                models, lambda m, v: time_prefill(m, v, input_ids), args.warmup, args.repeats, args.wait_idle))
            if not args.no_decode:
                entry["decode"] = summarize(run_interleaved(
                    models, lambda m, v: time_decode(m, v, prompt_ids, args.new_tokens), args.warmup, args.repeats,
                    args.wait_idle))
                entry["decode_ops"] = {v: ops_per_decode_step(m, v, prompt_ids) for v, m in models.items()}
            if not args.no_speech_step:
                entry["speech_step"] = time_speech_step(source, converted, config, args)
            if args.profile:
                entry["profile"] = profile_forward(
                    source, converted, input_ids, args.profile_iters, 15, f"{family}/{size}"
                )
            entry["wall_s"] = time.perf_counter() - t0
            results.append(entry)
            pf = entry["prefill"]
            print(f"\n{family}/{size}: {minfo['params'] / 1e6:.2f}M params, free-mode max |dlogit| {diff:.1e}, "
                  f"greedy tokens equal: {same_tokens}; prefill source {pf['source']['median_ms']:.2f} ms, "
                  f"converted free x{pf.get('converted:free', {}).get('ratio_of_medians', float('nan')):.3f} "
                  f"({entry['wall_s']:.1f} s)")
            sys.stdout.flush()
            del source, converted, models

    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(results, modes, args)
    print(f"\nTotal wall time {time.perf_counter() - t_start:.1f} s; load average at end: "
          f"{', '.join(f'{x:.2f}' for x in info['loadavg_end'] or [])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": results}, f, indent=1)
        print(f"raw numbers written to {args.json}")
    return 0


def run_processes(argv: list[str], args) -> int:
    """`--processes N`: this script N times in fresh processes (sequentially, so they do not compete), then each
    ratio's median over the processes, next to every process's value."""
    import subprocess
    import tempfile

    child_argv, skip_value = [], False
    for arg in argv:  # everything but --processes and --json (and their values)
        if not skip_value and not arg.startswith(("--processes", "--json")):
            child_argv.append(arg)
        skip_value = arg in ("--processes", "--json")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            path = os.path.join(tmp, f"run{i}.json")
            print(f"## process {i + 1}/{args.processes}", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), *child_argv, "--json", path], check=True)
            with open(path) as f:
                runs.append(json.load(f))
    print(f"\n## Median over {args.processes} processes (ratio of medians [median of per-round ratios]; "
          "each process's ratio of medians after it)\n")
    print("| family | size | phase | mode | ratio | per process |")
    print("|---|---|---|---|---:|---|")
    summary = []
    for index, entry in enumerate(runs[0]["results"]):
        for phase in ("prefill", "decode"):
            if phase not in entry:
                continue
            for variant in [v for v in entry[phase] if v.startswith("converted:")]:
                cells = [run["results"][index][phase][variant] for run in runs]
                of_medians = statistics.median(c["ratio_of_medians"] for c in cells)
                paired = statistics.median(c["median_paired_ratio"] for c in cells)
                summary.append({"family": entry["family"], "size": entry["size"], "phase": phase, "mode": variant,
                                "ratio_of_medians": of_medians, "median_paired_ratio": paired,
                                "per_process": [c["ratio_of_medians"] for c in cells]})
                per_process = ", ".join(f"{c['ratio_of_medians']:.3f}" for c in cells)
                print(f"| {entry['family']} | {entry['size']} | {phase} | {variant.split(':')[1]} | "
                      f"{of_medians:.3f} [{paired:.3f}] | {per_process} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_over_processes": summary, "runs": runs}, f, indent=1)
        print(f"raw numbers written to {args.json}")
    return 0


def step_flops(model, vocab_rows: int) -> float:
    """Matmul FLOPs of one decode step for one token: 2 x (weights it multiplies by), counting top-k of the
    routed experts, the shared experts, attention projections and the head (attention over the context
    and the elementwise work are left out)."""
    config = model.config.get_text_config()
    routed = shared = other = 0
    top_k = config.num_experts_per_tok
    for name, p in model.named_parameters():
        if "embed_tokens" in name or name.startswith("lm_head"):
            continue
        if "experts.gate_up_proj" in name or "experts.down_proj" in name or "_bank." in name:
            routed += p.numel()
        elif "router" in name or ".gate.weight" in name:
            other += p.numel()
        elif "shared_expert" in name:
            shared += p.numel()
        elif p.dim() >= 2:
            other += p.numel()
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
    return 2.0 * (routed * top_k / num_experts + shared + other + vocab_rows * config.hidden_size)


def time_speech_step(source, converted, config, args) -> dict:
    """One cached decode step of the converted model with a speech vocabulary (a `[1, 1 + N, 1]` column
    through the multi-stream embedding and the head over the extended vocabulary) vs the source's text
    step, with the extra head's share of the step's FLOPs printed beside the time ratio."""
    import copy

    from deeptalk.configuration_deeptalk import SpeechTokenLayout

    speech = copy.deepcopy(converted)
    layout = SpeechTokenLayout(text_vocab_size=config.vocab_size, num_audio_streams=args.speech_streams,
                               codebook_size=args.speech_codebook, eot_id=2, pad_t_id=0)
    speech.add_speech(layout, mean_resizing=False).eval()  # outside inference_mode: ordinary tensors
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len))
    column = layout.pad_column().view(1, -1, 1).clone()
    column[0, 1:, 0] = torch.tensor([layout.stream_offset(i + 1) + 7 for i in range(layout.num_audio_streams)])
    text_token = torch.tensor([[5]])
    state = {}

    def prefill(model, variant):
        ids = prompt if variant == "source" else layout.pad_column().view(1, -1, 1).repeat(1, 1, args.prompt_len)
        if variant != "source":
            ids[0, 0] = prompt[0]
        state[variant] = model(ids, use_cache=True).cache

    def one_step(model, variant):
        prefill(model, variant)
        step_ids = text_token if variant == "source" else column
        position = torch.tensor([[args.prompt_len]])
        t0 = clock()
        for _ in range(8):
            model(step_ids, cache=state[variant], use_cache=True, position_ids=position)
            state[variant].crop(-1)  # drop the step again: every timed step sees the same context
        return (clock() - t0) / 8 * 1e3

    summary = summarize(run_interleaved({"source": source, "converted:speech": speech}, one_step, args.warmup,
                                        args.repeats, args.wait_idle))
    text_flops, speech_flops = step_flops(source, config.vocab_size), step_flops(speech, layout.vocab_size)
    summary["flops"] = {"source_text_step": text_flops, "speech_step": speech_flops,
                        "extra_head_share": (speech_flops - text_flops) / speech_flops,
                        "flop_ratio": speech_flops / text_flops}
    return summary


def print_table(results, modes, args):
    print(f"\n## Results (median {args.clock}-clock ms; ratio = converted / source: of the medians [median of "
          "per-round ratios]; other load = CPU cores other processes used while timing)\n")
    phases = ["prefill"] + ([] if args.no_decode else ["decode"])
    head = ["family", "size", "phase", "source ms"]
    for m in modes:
        head += [f"{m} ms", f"{m} ratio"]
    head.append("other load")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
    noisy = False
    for e in results:
        for phase in phases:
            r = e[phase]
            label = (f"prefill {args.batch}x{args.seq}" if phase == "prefill"
                     else f"decode/token b{args.decode_batch}")
            row = [e["family"], e["size"], label, f"{r['source']['median_ms']:.2f}"]
            for m in modes:
                c = r[f"converted:{m}"]
                row += [f"{c['median_ms']:.2f}", f"{c['ratio_of_medians']:.3f} [{c['median_paired_ratio']:.3f}]"]
            foreign = r.get("foreign_load_cores")
            row.append(load_flag(foreign))
            noisy |= foreign is not None and foreign > NOISY_FOREIGN_LOAD
            print("| " + " | ".join(row) + " |")
    if noisy:
        print(f"\n(!) other processes kept > {NOISY_FOREIGN_LOAD} cores busy while timing these rows: rerun them "
              "(e.g. with --wait-idle 60) before trusting the numbers.")
    op_rows = [e for e in results if "decode_ops" in e]
    if op_rows:
        print("\n## aten operators per cached decode step (load-independent; ratio = converted / source)\n")
        print("| family | size | source | " + " | ".join(f"{m} (ratio)" for m in modes) + " |")
        print("|---|---|---:|" + "---:|" * len(modes))
        for e in op_rows:
            ops = e["decode_ops"]
            cells = [f"{ops[f'converted:{m}']:.0f} ({ops[f'converted:{m}'] / ops['source']:.3f})" for m in modes]
            print(f"| {e['family']} | {e['size']} | {ops['source']:.0f} | " + " | ".join(cells) + " |")
    speech_rows = [e for e in results if "speech_step" in e]
    if speech_rows:
        print(f"\n## Speech decode step vs the source's text step ({args.speech_streams} audio streams x "
              f"{args.speech_codebook} codes; median ms of 8 cached steps)\n")
        print("| family | size | source text step ms | speech step ms | time ratio | FLOP ratio | "
              "extra head's FLOP share |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for e in speech_rows:
            r = e["speech_step"]
            print(f"| {e['family']} | {e['size']} | {r['source']['median_ms']:.2f} | "
                  f"{r['converted:speech']['median_ms']:.2f} | "
                  f"{r['converted:speech']['ratio_of_medians']:.3f} | {r['flops']['flop_ratio']:.3f} | "
                  f"{r['flops']['extra_head_share']:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
