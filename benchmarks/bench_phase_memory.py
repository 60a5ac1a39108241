#!/usr/bin/env python
# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Memory of a phase-2 (single-bank experts) training step vs. a full fine-tune step (CPU).

The claim under test (deeptalk/trainers/freezing.py): phase 2 freezes everything but one bank of
experts (plus options) with ``requires_grad_(False)``, so transformers' ``Trainer`` builds AdamW over
the trainable parameters only -- "the phase-2 optimizer state holds only the trainable bank".

The script builds a random DeepSeek-V2-style MoE whose routed experts hold most of the parameters,
converts it with ``DeepTalkForCausalLM.from_text_moe`` (``--speech-experts`` seeded experts of every
MoE layer go to the speech bank), and trains it for ``--steps`` optimizer steps on random token ids
(labels = inputs; no audio) in each configuration:

* ``full``                full fine-tune: ``plan_for_phase("joint")`` + ``apply_phase`` (every
                          parameter trainable, free routing), same loss path as the phase trainers
* ``speech_bank``         ``DeepTalkExpertsTrainer``, modality="speech", train_embeddings="none",
                          train_dense_layers=False (the pure bank-only setting)
* ``speech_paper``        ``DeepTalkExpertsTrainer``, modality="speech", defaults (paper: + embeddings
                          + dense layer 0)
* ``text_bank``           as ``speech_bank`` for modality="text"
* ``text_paper``          as ``speech_paper`` for modality="text"

Each configuration runs in its OWN fresh subprocess so its peak RSS is clean. Per configuration it
reports trainable parameters, optimizer state bytes (sum of the tensors in
``trainer.optimizer.state``), parameter bytes, and the step's peak memory: ``ru_maxrss`` after
``trainer.train()`` minus the RSS measured right before it. Two things keep that difference honest:

* Before the baseline is read, the peak RSS is reset to the current RSS (``echo 5 >
  /proc/self/clear_refs``, Linux >= 4.0), because the conversion (source + converted copy) can peak
  higher than a frozen-model training step; without the reset ``ru_maxrss`` would still hold that
  older peak. The script says so when the reset is not available.
* The worker runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc): every allocation above 64 KiB is
  its own mmap, given back to the OS on free, so RSS follows live tensor memory. With glibc's
  default (dynamic) threshold, freed activations and temporaries stay in the malloc heap and RSS
  runs ahead of live memory (one check: full fine-tune step peak 1053 MiB instead of 881, bank-only
  329 instead of 265). ``--default-malloc`` turns the setting off.

``tracemalloc`` is useless here: torch allocates tensor storage in C++ (c10's CPU allocator, not
PyMem), so it only sees Python objects. By default (``--no-tracemalloc`` skips it) one more full
fine-tune subprocess (one step) runs with ``tracemalloc`` on, to show the gap next to the RSS numbers.

Train times go to ``--json`` and the progress lines only, not the table: memory is deterministic,
time on a shared 2-core machine is not.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_phase_memory.py    # ~1.5 min on 2 idle cores, ~3 when busy
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_phase_memory.py --json mem.json --markdown mem.md

This is a script, not a test. It checks that each optimizer holds exactly the trainable parameters
(and, in the bank-only settings, exactly that bank) but does not assert memory numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # run as a script (benchmarks/ is sys.path[0]) or as `python -m benchmarks.<script>`
    from _common import machine_info
except ModuleNotFoundError:
    from benchmarks._common import machine_info

CONFIGS = ("full", "speech_bank", "speech_paper", "text_bank", "text_paper")
DESCRIPTIONS = {
    "full": "full fine-tune (joint plan: all params)",
    "speech_bank": "phase 2 speech, bank only",
    "speech_paper": "phase 2 speech, paper default (+emb +dense)",
    "text_bank": "phase 2 text, bank only",
    "text_paper": "phase 2 text, paper default (+emb +dense)",
    "full_tracemalloc": "full fine-tune, tracemalloc on",
}
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Memory helpers (Linux)
# --------------------------------------------------------------------------------------------------
def current_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak RSS ("high water mark", which ru_maxrss reads) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process
# --------------------------------------------------------------------------------------------------
def source_config(args):
    from deeptalk.tiny import tiny_text_moe_config

    # DeepSeek-V2-Lite shape in miniature: dense first layer, 1 shared expert, group-limited top-k,
    # MLA attention; the routed experts hold most of the parameters.
    return tiny_text_moe_config(
        "deepseek_v2", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_experts=args.experts, top_k=args.top_k, moe_intermediate_size=args.moe_intermediate,
        intermediate_size=args.dense_intermediate, num_attention_heads=8, num_key_value_heads=8,
        kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=4, topk_group=2,
    )


class RandomTokens:
    """`n` rows of random token ids, labels = inputs (plain causal-LM loss, text only)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=gen)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def param_group(name: str, moe_layers: set[int]) -> str:
    if "speech_bank" in name:
        return "speech_bank"
    if "text_bank" in name:
        return "text_bank"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if ".layers." in name:
        index = int(name.split(".layers.", 1)[1].split(".", 1)[0])
        if index not in moe_layers:
            return "dense_layers"
        if ".mlp.router" in name:
            return "router"
        if "shared_expert" in name:
            return "shared_experts"
        return "moe_attention"
    return "final_norm" if name.endswith("norm.weight") else "other"


def build_trainer(name: str, model, dataset, args, output_dir: str):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from deeptalk.trainers import DeepTalkExpertsConfig, DeepTalkExpertsTrainer
    from deeptalk.trainers.base import DeepTalkTrainerMixin
    from deeptalk.trainers.freezing import plan_for_phase

    common = dict(output_dir=output_dir, use_cpu=True, max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no", seed=args.seed,
                  data_seed=args.seed, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    base = name.removesuffix("_tracemalloc")
    if base == "full":

        class FullFineTuneTrainer(DeepTalkTrainerMixin, Trainer):
            """The joint plan (everything trainable, free routing) on a plain transformers Trainer,
            with the phase trainers' loss path (routing mode, expert-load and aux-loss outputs)."""

            phase = "joint"

            def __init__(self, model, args, **kwargs):
                model = self._setup_phase(model, plan_for_phase("joint"))
                super().__init__(model=model, args=args, **kwargs)

        return FullFineTuneTrainer(model, TrainingArguments(**common), train_dataset=dataset,
                                   data_collator=default_data_collator)
    modality, setting = base.split("_")
    options = dict(train_embeddings="none", train_dense_layers=False) if setting == "bank" else {}
    config = DeepTalkExpertsConfig(modality=modality, **options, **common)
    return DeepTalkExpertsTrainer(model, config, train_dataset=dataset, data_collator=default_data_collator)


def run_worker(name: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from deeptalk import DeepTalkForCausalLM
    from deeptalk.configuration_deeptalk import DeepTalkConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    source = AutoModelForCausalLM.from_config(source_config(args))
    rng = random.Random(args.seed)
    moe_layers = DeepTalkConfig(text_config=source.config.to_dict()).moe_layer_indices
    speech = [sorted(rng.sample(range(args.experts), args.speech_experts)) for _ in moe_layers]
    model = DeepTalkForCausalLM.from_text_moe(source, speech_experts=speech, progress=False)
    del source
    dataset = RandomTokens(args.steps * args.batch, args.seq, args.vocab, args.seed)

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(name, model, dataset, args, output_dir)
        params = list(model.named_parameters())
        total = sum(p.numel() for _, p in params)
        trainable = [(n, p) for n, p in params if p.requires_grad]

        gc.collect()
        malloc_trim()
        peak_before_reset = maxrss_kib()
        reset_ok = reset_peak_rss()
        rss_before = current_rss_kib()
        peak_at_start = maxrss_kib()
        if name.endswith("_tracemalloc"):
            import tracemalloc

            tracemalloc.start()
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        peak_after = maxrss_kib()
        traced_peak = None
        if name.endswith("_tracemalloc"):
            traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

        optimizer = trainer.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        state_bytes = sum(tensor_bytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
        in_optimizer = {id(p) for group in inner.param_groups for p in group["params"]}
        names = {id(p): n for n, p in params}
        held_groups: dict[str, int] = {}
        for pid in in_optimizer:
            group = param_group(names[pid], set(moe_layers))
            held_groups[group] = held_groups.get(group, 0) + dict(params)[names[pid]].numel()
        # the claim: the optimizer holds exactly the trainable parameters (bank only, when bank-only)
        assert in_optimizer == {id(p) for _, p in trainable}, "optimizer params != trainable params"
        assert set(map(id, inner.state)) <= in_optimizer
        if name.endswith("_bank"):
            modality = name.split("_")[0]
            bank = {id(p) for block in model.moe_blocks() for p in getattr(block, f"{modality}_bank").parameters()}
            assert in_optimizer == bank, f"bank-only optimizer holds more than the {modality} bank"
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == args.steps and all(loss == loss for loss in losses), losses
        return {
            "config": name,
            "total_params": total,
            "trainable_params": sum(p.numel() for _, p in trainable),
            "param_bytes": sum(tensor_bytes(p) for _, p in params),
            "trainable_param_bytes": sum(tensor_bytes(p) for _, p in trainable),
            "optimizer": type(inner).__name__,
            "optimizer_state_bytes": state_bytes,
            "optimizer_groups": held_groups,
            "rss_before_kib": rss_before,
            "peak_rss_kib": peak_after,
            "step_peak_kib": peak_after - rss_before,
            "peak_reset": reset_ok,
            "peak_before_reset_kib": peak_before_reset,
            "peak_at_start_kib": peak_at_start,
            "tracemalloc_peak_bytes": traced_peak,
            "train_seconds": seconds,
            "losses": losses,
            "train_runtime": result.metrics.get("train_runtime"),
        }


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def launch(name: str, args, forwarded: list[str]) -> dict:
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, *forwarded]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {name!r} failed (rc={proc.returncode})")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_seconds"] = wall
    return out


def markdown(results: list[dict], args) -> str:
    full = next(r for r in results if r["config"] == "full")
    header = ("| config | trainable params | % of params | optimizer holds | optimizer state MiB "
              "| state / trainable bytes | param MiB (all) | RSS before MiB | peak RSS MiB "
              "| step peak (peak − before) MiB | step peak − (grads + state) MiB | opt state × full "
              "| step peak × full |")
    rows = [header, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["config"].endswith("_tracemalloc"):
            continue
        groups = "+".join(sorted(r["optimizer_groups"], key=lambda g: -r["optimizer_groups"][g]))
        if r["config"] == "full":
            groups = "all"
        other = r["step_peak_kib"] * 1024 - r["trainable_param_bytes"] - r["optimizer_state_bytes"]
        rows.append(
            f"| {DESCRIPTIONS[r['config']]} | {r['trainable_params']:,} "
            f"| {100 * r['trainable_params'] / r['total_params']:.1f} "
            f"| {groups} | {r['optimizer_state_bytes'] / MIB:.1f} "
            f"| {r['optimizer_state_bytes'] / r['trainable_param_bytes']:.3f} | {r['param_bytes'] / MIB:.1f} "
            f"| {r['rss_before_kib'] / 1024:.0f} | {r['peak_rss_kib'] / 1024:.0f} | {r['step_peak_kib'] / 1024:.0f} "
            f"| {other / MIB:.0f} | {r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.3f} "
            f"| {r['step_peak_kib'] / full['step_peak_kib']:.3f} |"
        )
    notes = []
    traced = [r for r in results if r["config"].endswith("_tracemalloc")]
    for r in traced:
        notes.append(
            "tracemalloc (full fine-tune, separate process): "
            f"peak {r['tracemalloc_peak_bytes'] / MIB:.2f} MiB traced vs. "
            f"{r['step_peak_kib'] / 1024:.0f} MiB step peak by RSS ({len(r['losses'])} step) -- tracemalloc does not "
            "see torch's tensor storage."
        )
    if not all(r["peak_reset"] for r in results):
        notes.append("WARNING: /proc/self/clear_refs could not reset the peak RSS; step peaks may include the "
                     "conversion's earlier peak.")
    return "\n".join(rows + ([""] + notes if notes else []))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (the first is dense)")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--dense-intermediate", type=int, default=1536)
    parser.add_argument("--speech-experts", type=int, default=8, help="speech experts per MoE layer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false",
                        help="skip the extra full fine-tune run with tracemalloc on")
    parser.add_argument("--default-malloc", action="store_true", help="do not set MALLOC_MMAP_THRESHOLD_ in workers")
    parser.add_argument("--json", help="write every number, the machine and the settings here")
    parser.add_argument("--markdown", help="write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, args)), flush=True)
        return

    forwarded = list(sys.argv[1:])
    for flag in ("--json", "--markdown", "--configs"):  # driver-only options
        while flag in forwarded:
            i = forwarded.index(flag)
            del forwarded[i:i + 2]
    forwarded = [a for a in forwarded if not a.startswith(("--json=", "--markdown=", "--configs="))]
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown or "full" not in names:
        parser.error(f"--configs must include 'full' and only use {CONFIGS}; got {names}")
    if args.tracemalloc:
        names.append("full_tracemalloc")

    started = time.perf_counter()
    results = []
    for name in names:
        # the tracemalloc run only has to show the gap: one optimizer step (AdamW's state exists after it)
        r = launch(name, args, forwarded + (["--steps", "1"] if name.endswith("_tracemalloc") else []))
        print(f"[{name}] trainable {r['trainable_params']:,}/{r['total_params']:,}  optimizer state "
              f"{r['optimizer_state_bytes'] / MIB:.1f} MiB  step peak {r['step_peak_kib'] / 1024:.0f} MiB  "
              f"({r['train_seconds']:.1f} s train, {r['process_wall_seconds']:.1f} s process, "
              f"losses {[round(x, 3) for x in r['losses']]})", flush=True)
        results.append(r)
    info = machine_info(args.threads, mem_total=True, deeptalk_version=False, loadavg=False)
    table = markdown(results, args)
    print()
    print(f"Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, {info['mem_total_mib']} MiB RAM; "
          f"torch {info['torch']}, transformers {info['transformers']}; "
          f"total wall {time.perf_counter() - started:.0f} s")
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
