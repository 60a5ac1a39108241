#!/usr/bin/env python
# Copyright 2026 The deeptalk authors. Apache-2.0.
"""The paper's claim in miniature: with the same compute, which way of adding speech to a MoE LLM
keeps its text ability and learns speech? (arXiv 2506.21864, Table 2/3 and the §7 ablations.)

Per seed, everything up to the branching point is done ONCE (the offline quickstart pipeline):

1. build the demo data, teach a tiny DeepSeek-V2-style MoE LLM the corpus's text QA ("the original
   LLM"), measure its text QA accuracy;
2. convert it to DeepTalk, add speech (tiny random Whisper encoder + adapter, MelVQ codec tokens),
   run phase 1 alignment (the LLM stays frozen), measure the modality load (free routing).

Then the phase-1 model is `copy.deepcopy`-ed into one branch per strategy; every branch gets the
same optimizer steps on the same data in the same order (the tiny_cpu recipes' steps, times
`--steps-scale`): S speech steps (spoken QA with spoken answers), T text steps (text QA), J joint
steps (both, shuffled), batch 16:

* ``adaptive``   the paper: top-k of rhoA*(1-rhoT) per layer -> speech bank; 2a speech experts
                 (``speech_only``), 2b text experts (``text_only``), 3 joint (free routing);
* ``random``     the same with a seeded random choice of the speech experts (seed = run seed);
* ``moextend``   ``model.add_new_speech_experts(k)``: k NEW experts (+ new router rows) per layer
                 form the speech bank, then the same 2a / 2b / 3 schedule;
* ``full_ft``    PureMoE: no modality split, free routing, everything but Whisper/adapter trains
                 (the joint plan, ``DeepTalkJointTrainer``) in every stage;
* ``lora``       LoRA-PureMoE: LoRA (r 8) on attention, the dense MLP, the shared experts and the
                 routed-expert bank (peft ``target_parameters``), plus the new audio rows of the
                 embedding table and head (the new vocabulary has to be learned by every
                 strategy), free routing, every stage; merged before evaluation;
* ``adaptive_bank_only`` (ablation, not run by default): ``adaptive`` with DeepSeek's dense first
                 layer frozen in 2a (``train_dense_layers=False``), so 2a trains the speech bank and the
                 audio rows only.

Every stage runs in fp32 on the CPU (TRL's config would turn bf16 autocast on for the joint
trainer even on a CPU; it is set off explicitly).

With ``--baseline-schedule staged`` (default) the two PureMoE baselines follow the same three stages
(same data, learning rates and steps as 2a / 2b / 3), so the ONLY difference from ``adaptive`` is
the modality split and its freezing. With ``joint`` they spend all S+T+J steps on the joint mix at
the joint learning rate (a plain "fine-tune on mixed data" baseline).

Metrics per branch, on the validation + test splits (``--eval-splits``; nothing is tuned on
them): text QA accuracy and its relative drop vs the original LLM ((base - new) / base, the
paper's headline), the change in teacher-forced cross-entropy of the text answers (a continuous
companion of the exact-match accuracy, less noisy on ~240 questions), spoken question -> text
answer accuracy, teacher-forced audio-token accuracy on held-out spoken answers, and the text
metrics once more right after each branch's first (speech-data-only) stage, where forgetting shows
before the text and joint stages repair it. Mean +- half the min-max range over ``--seeds``, plus a
paired table: per seed, strategy minus ``adaptive`` (same original LLM and phase-1 model, so most of
the seed-to-seed noise cancels). ``--json`` keeps every seed and stage (losses, steps, seconds);
``--replot JSON`` redraws table and plot from it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/retention.py                   # 2 seeds, 12-15 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/retention.py --seeds 0 --steps-scale 0.25   # smoke run
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/retention.py --json retention.json --strategies adaptive,full_ft

A script, not a test: nothing is asserted about which strategy wins.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STRATEGIES = ("adaptive", "random", "moextend", "full_ft", "lora")
EXTRA_STRATEGIES = ("adaptive_bank_only",)  # ablation, not run by default
LABELS = {
    "original": "original LLM (text only)",
    "phase1": "after phase 1 (shared start)",
    "adaptive": "adaptive experts (DeepTalk)",
    "adaptive_bank_only": "adaptive, 2a without the dense layer",
    "random": "random experts",
    "moextend": "MoExtend (new experts)",
    "full_ft": "PureMoE full fine-tune",
    "lora": "LoRA-PureMoE",
}
STAGES = (("speech", "experts_speech", "spoken_qa_speech"), ("text", "experts_text", "text_qa"), ("joint", "joint", "joint"))
# DeepSeek-V2 module names inside the language model (the Whisper encoder's q_proj/... are excluded)
LORA_TARGET_MODULES = (r".*model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                       r"|mlp\.(gate_proj|up_proj|down_proj)|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))")
LORA_TARGET_PARAMETERS = ["text_bank.gate_up_proj", "text_bank.down_proj", "speech_bank.gate_up_proj", "speech_bank.down_proj"]

_START = time.perf_counter()


def torch_no_grad(fn):
    def wrapped(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapped


def log(message: str):
    print(f"[retention {time.perf_counter() - _START:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def recipe_steps(scale: float) -> dict[str, int]:
    from deeptalk.trainers.recipes import load_recipe

    steps = {}
    for name in ("align", "experts_speech", "experts_text", "joint"):
        steps[name] = max(1, round(load_recipe(f"tiny_cpu/{name}")["args"]["max_steps"] * scale))
    return steps


def clone(model):
    """`copy.deepcopy` of a DeepTalk model (or a PeftModel around one), made safe for two things:

    * the routing state keeps the last forward's records (non-leaf tensors, which `deepcopy`
      refuses), so they are dropped first;
    * TRL's SFTTrainer (so `DeepTalkJointTrainer`) replaces `model.forward` by an instance attribute,
      a closure over the ORIGINAL model's bound forward (its fused LM head). A deep copy keeps that
      closure, so the copy's forward would silently run the original's weights. The copy gets its
      class forward back (DeepTalk's trainers never ask for the fused head)."""
    state = deeptalk_base(model).model.routing_state
    state.router_logits, state.aux_losses, state.expert_load, state.token_modality = [], [], [], None
    copied = copy.deepcopy(model)
    for module in copied.modules():
        module.__dict__.pop("forward", None)
    return copied


def deeptalk_base(model):
    """The DeepTalkForCausalLM inside a PeftModel (or the model itself). Not
    `freezing._deeptalk_model`: a PeftModel forwards `moe_blocks` to the base model, so that helper
    returns the PeftModel itself."""
    return model.get_base_model() if hasattr(type(model), "get_base_model") else model


def effective_trainable(model) -> int:
    """Trainable parameters, counting only the audio rows of a row-masked embedding table / head."""
    base = deeptalk_base(model)
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_deeptalk_row_masks", None):
            total += (p.shape[0] - base.config.text_vocab_size) * p.shape[1]
        else:
            total += p.numel()
    return total


def lora_trainables(model):
    """LoRA adapters + the audio rows of the embedding table and head; nothing else."""
    from deeptalk.trainers.freezing import _train_embeddings

    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    _train_embeddings(deeptalk_base(model), "audio_rows")


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan")
    return sum(values) / len(values), (max(values) - min(values)) / 2


# --------------------------------------------------------------------------------------------------
# one seed
# --------------------------------------------------------------------------------------------------
class SeedRun:
    def __init__(self, args, seed: int, workdir: str):
        self.args, self.seed, self.workdir = args, seed, workdir
        self.steps = recipe_steps(args.steps_scale)

    # ---- shared part ---------------------------------------------------------------------------
    def prepare(self):
        import torch
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
        from transformers.trainer_callback import PrinterCallback

        import deeptalk
        from deeptalk.evaluation.metrics import text_qa_accuracy
        from deeptalk.processing.processing_deeptalk import DeepTalkDataCollator
        from deeptalk.quickstart import QuickstartSettings, TextStreamCollator, _tiny_whisper_config
        from deeptalk.recipes.demo_data import build_demo_data, build_demo_processor, build_demo_tokenizer, fit_demo_codec
        from deeptalk.tiny import tiny_text_moe_config
        from deeptalk.trainers import DeepTalkAlignmentConfig, DeepTalkAlignmentTrainer
        from deeptalk.trainers.assignment import measure_modality_load

        args, seed = self.args, self.seed
        self.settings = QuickstartSettings(output_dir=self.workdir, seed=seed, batch_size=args.batch_size,
                                           num_speech_experts=args.num_speech_experts)
        torch.manual_seed(seed)
        tokenizer = build_demo_tokenizer()
        self.codec = fit_demo_codec(seed=seed)
        self.processor = build_demo_processor(tokenizer, self.codec)
        self.data = build_demo_data(self.processor, self.codec)
        self.collator = DeepTalkDataCollator(self.processor)
        splits = args.eval_splits
        self.eval_text = [r for s in splits for r in self.data.records["text_qa"][s]]
        self.eval_spoken = [r for s in splits for r in self.data.records["spoken_qa"][s]]
        self.eval_speech_rows = [row for s in splits for row in self.data.spoken_qa_speech[s]]
        self.eval_text_rows = [row for s in splits for row in self.data.text_qa[s]]
        log(f"seed {seed}: data ready; eval on {'+'.join(splits)}: {len(self.eval_text)} text questions, "
            f"{len(self.eval_spoken)} spoken questions, {len(self.eval_speech_rows)} spoken answers")

        config = tiny_text_moe_config("deepseek_v2", vocab_size=len(tokenizer), hidden_size=192, num_hidden_layers=4,
                                      num_experts=16, top_k=4, pad_token_id=self.processor.layout.pad_t_id,
                                      eos_token_id=self.processor.layout.eot_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(seed)
        source = AutoModelForCausalLM.from_config(config)
        t0 = time.perf_counter()
        targs = TrainingArguments(
            output_dir=os.path.join(self.workdir, "original_llm"), max_steps=args.pretrain_steps,
            per_device_train_batch_size=args.batch_size, learning_rate=3e-3, lr_scheduler_type="cosine",
            warmup_steps=0.03, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
            logging_steps=max(1, args.pretrain_steps // 5), seed=seed, remove_unused_columns=False, disable_tqdm=True,
        )
        trainer = Trainer(model=source, args=targs, train_dataset=self.data.text_qa["train"],
                          data_collator=TextStreamCollator(self.processor))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        source.eval()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        self.original_text = text_qa_accuracy(source, self.processor, self.eval_text)
        self.original_ce = self.text_ce(source)
        log(f"seed {seed}: original LLM taught ({args.pretrain_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"{time.perf_counter() - t0:.0f}s); text QA accuracy {self.original_text:.3f}, answer CE {self.original_ce:.3f}")

        model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, num_speech_experts=args.num_speech_experts, progress=False)
        model.add_speech(audio_config=_tiny_whisper_config(), **self.processor.model_speech_kwargs())
        align = self._stage(DeepTalkAlignmentTrainer, DeepTalkAlignmentConfig(**self._recipe_args("align", self.steps["align"], "phase1")),
                            model, self.data.asr["train"], "phase 1 alignment")
        self.phase1 = model
        self.phase1_metrics = {**self.evaluate(model), "train_steps": f"+{align['steps']} (phase 1)",
                               "trainable": [align["trainable"]], "stage_log": [align]}
        log(f"seed {seed}: phase 1 done; {self._metrics_line(self.phase1_metrics)}")

        def batches(dataset, size=16):
            for start in range(0, len(dataset), size):
                rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
                yield {k: v for k, v in self.collator(rows).items() if k != "labels"}

        self.load = measure_modality_load(model, batches(self.data.text_qa["train"]), batches(self.data.spoken_qa_speech["train"]),
                                          max_batches=8, progress=False)

    # ---- pieces --------------------------------------------------------------------------------
    def _recipe_args(self, recipe: str, steps: int, name: str) -> dict:
        from deeptalk.quickstart import _phase_args

        out = _phase_args(recipe, self.settings, steps, os.path.join(self.workdir, name))
        out.update(disable_tqdm=True, logging_steps=max(1, steps // 5))
        return out

    def _joint_args(self, recipe: str, steps: int, name: str) -> dict:
        """A stage's recipe (lr, steps, schedule, batch) as DeepTalkJointConfig kwargs (joint plan)."""
        import torch

        out = self._recipe_args(recipe, steps, name)
        for key in ("modality", "train_embeddings", "train_router", "train_dense_layers", "train_moe_attention",
                    "train_shared_experts"):
            out.pop(key, None)
        # TRL's config turns bf16 on whenever it is left unset (also on a CPU): fp32 everywhere here
        out.update(gradient_checkpointing=False, train_embeddings="all",
                   bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return out

    def _stage(self, trainer_class, config, model, dataset, name, after_init=None):
        from transformers.trainer_callback import PrinterCallback

        from deeptalk.trainers.joint import DeepTalkJointTrainer

        kwargs = {"train_dataset": dataset, "data_collator": self.collator}
        if trainer_class is DeepTalkJointTrainer:
            kwargs["processing_class"] = self.processor
        trainer = trainer_class(model, config, **kwargs)
        trainer.remove_callback(PrinterCallback)
        if after_init is not None:
            after_init(trainer.model)
        trainable = effective_trainable(trainer.model)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        trainer.model.eval()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        record = {"stage": name, "trainer": type(trainer).__name__, "routing_mode": trainer.plan.routing_mode,
                  "steps": trainer.state.global_step, "learning_rate": config.learning_rate, "trainable": trainable,
                  "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                  "seconds": round(seconds, 1)}
        log(f"  {name}: {record['steps']} steps, {trainable:,} trainable, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"{seconds:.0f}s")
        return record

    def evaluate(self, model) -> dict:
        from deeptalk.evaluation.metrics import audio_token_accuracy, relative_drop, spoken_qa_text_accuracy, text_qa_accuracy

    
        text = text_qa_accuracy(model, self.processor, self.eval_text)
        spoken = spoken_qa_text_accuracy(model, self.processor, self.eval_spoken)
        audio = audio_token_accuracy(model, self.collator(self.eval_speech_rows))
        model.eval()
        ce = self.text_ce(model)
        return {"text_acc": text, "relative_drop": relative_drop(self.original_text, text) if self.original_text else None,
                "spoken_text_acc": spoken, "audio_token_acc": audio, "text_ce": ce, "text_ce_delta": ce - self.original_ce}

    def text_check(self, model) -> dict:
        """Text ability right after the speech-only stage (no text data seen yet in the branch):
        where forgetting shows before the text and joint stages repair it."""
        from deeptalk.evaluation.metrics import relative_drop, text_qa_accuracy

        text = text_qa_accuracy(model, self.processor, self.eval_text)
        ce = self.text_ce(model)
        log(f"  text after the speech stage: accuracy {text:.3f}, answer CE {ce:.3f} ({ce - self.original_ce:+.3f})")
        return {"text_acc_after_speech": text, "relative_drop_after_speech": relative_drop(self.original_text, text),
                "text_ce_delta_after_speech": ce - self.original_ce}

    @torch_no_grad
    def text_ce(self, model) -> float:
        """Teacher-forced cross-entropy (nats per answer token) of the text QA eval answers: a
        continuous companion of the exact-match accuracy (the text stream's own vocabulary slice for
        DeepTalk, the whole vocabulary -- the same ids -- for the original LLM)."""
        from deeptalk.evaluation.metrics import is_deeptalk_model

        batch = self.collator(self.eval_text_rows)
        if is_deeptalk_model(model):
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            return float(model(**inputs).stream_losses[0])
        return float(model(input_ids=batch["input_ids"][:, 0], attention_mask=batch["attention_mask"],
                           labels=batch["labels"][:, 0]).loss)

    @staticmethod
    def _metrics_line(m: dict) -> str:
        drop = m["relative_drop"]
        return (f"text {m['text_acc']:.3f} (drop {'n/a' if drop is None else f'{100 * drop:.1f}%'}), "
                f"spoken->text {m['spoken_text_acc']:.3f}, audio-token {m['audio_token_acc']:.3f}, "
                f"text answer CE {m['text_ce']:.3f} ({m['text_ce_delta']:+.3f})")

    # ---- branches ------------------------------------------------------------------------------
    def run_branch(self, strategy: str) -> dict:
        import torch

        from deeptalk.trainers import DeepTalkExpertsConfig, DeepTalkExpertsTrainer
        from deeptalk.trainers.assignment import assign_speech_experts
        from deeptalk.trainers.joint import DeepTalkJointConfig, DeepTalkJointTrainer

        args, seed, k = self.args, self.seed, self.args.num_speech_experts
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = clone(self.phase1)
        speech_experts = None
        if strategy in ("adaptive", "adaptive_bank_only"):
            speech_experts = assign_speech_experts(model, self.load, k, strategy="adaptive")
        elif strategy == "random":
            speech_experts = assign_speech_experts(model, None, k, strategy="random", seed=seed)
        elif strategy == "moextend":
            model.add_new_speech_experts(k, seed=seed)
            speech_experts = model.config.speech_experts
        log(f"seed {seed} / {strategy}: " + (f"speech experts {speech_experts}" if speech_experts else "no modality split"))

        records, mid = [], {}
        if strategy in ("adaptive", "adaptive_bank_only", "random", "moextend"):
            for modality, recipe, dataset_name in STAGES:
                dataset = self._dataset(dataset_name)
                if modality == "joint":
                    config = DeepTalkJointConfig(**self._joint_args(recipe, self.steps[recipe], f"{strategy}_{modality}"))
                    records.append(self._stage(DeepTalkJointTrainer, config, model, dataset, "3 joint (free)"))
                else:
                    config = DeepTalkExpertsConfig(**self._recipe_args(recipe, self.steps[recipe], f"{strategy}_{modality}"))
                    if strategy == "adaptive_bank_only" and modality == "speech":
                        config.train_dense_layers = False  # 2a trains the speech bank + audio rows only
                    records.append(self._stage(DeepTalkExpertsTrainer, config, model, dataset,
                                               f"2{'a' if modality == 'speech' else 'b'} {modality} experts ({modality}_only)"))
                    if modality == "speech":
                        mid = self.text_check(model)
        else:
            if args.baseline_schedule == "staged":
                plan = [(recipe, self.steps[recipe], dataset_name, f"{modality} data") for modality, recipe, dataset_name in STAGES]
            else:
                total = sum(self.steps[r] for _, r, _ in STAGES)
                plan = [("joint", total, "joint", "joint data")]
            if strategy == "lora":
                from peft import LoraConfig, get_peft_model

                banks = [p for p in LORA_TARGET_PARAMETERS if model.moe_blocks()[0].get_parameter(p).shape[0] > 0]
                lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                  target_modules=LORA_TARGET_MODULES, target_parameters=banks)
                # Wrapped once; the adapters are injected in place, so every stage trains the unwrapped
                # model (a PeftModel passed back into a phase trainer trips _deeptalk_model, see README).
                peft_model = get_peft_model(model, lora)
                model = peft_model.get_base_model()
            for recipe, steps, dataset_name, what in plan:
                config = DeepTalkJointConfig(**self._joint_args(recipe, steps, f"{strategy}_{recipe}"))
                records.append(self._stage(DeepTalkJointTrainer, config, model, self._dataset(dataset_name),
                                           f"{'LoRA' if strategy == 'lora' else 'full'} on {what} (free)",
                                           after_init=lora_trainables if strategy == "lora" else None))
                if dataset_name == "spoken_qa_speech":
                    mid = self.text_check(clone(peft_model).merge_and_unload() if strategy == "lora" else model)
            if strategy == "lora":
                moved = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
                total = [n for n, p in model.named_parameters() if "lora_B" in n]
                log(f"  LoRA: {len(moved)} of {len(total)} lora_B tensors moved off zero "
                    f"({sum('_bank' in n for n in moved)} on expert banks); merged for evaluation")
                # Unmerged LoRA on a bank breaks DeepTalk's no-grad free-mode path (_packed_banks reads
                # bank.gate_up_proj, which a peft ParamWrapper does not expose): evaluate merged weights.
                model = peft_model.merge_and_unload()
        metrics = self.evaluate(model)
        result = {**metrics, **mid, "train_steps": sum(r["steps"] for r in records), "trainable": [r["trainable"] for r in records],
                  "total_params": sum(p.numel() for p in deeptalk_base(model).parameters()),
                  "speech_experts": speech_experts, "stage_log": records, "seconds": round(time.perf_counter() - started, 1)}
        log(f"seed {seed} / {strategy}: {self._metrics_line(metrics)} ({result['seconds']:.0f}s)")
        return result

    def _dataset(self, name: str):
        if name == "joint":
            return self.data.phase_dataset("joint", "train", seed=self.seed)
        return getattr(self.data, name)["train"]


# --------------------------------------------------------------------------------------------------
# MoExtend availability (the method was being added concurrently)
# --------------------------------------------------------------------------------------------------
def moextend_available(wait_s: float) -> bool:
    """Whether `DeepTalkForCausalLM.add_new_speech_experts` exists, polling every 60 s for up to
    `wait_s`. Checked in a fresh interpreter each time (the package is installed editable and may be
    changing), before this process imports deeptalk."""
    import subprocess

    check = "import deeptalk, sys; sys.exit(0 if hasattr(deeptalk.DeepTalkForCausalLM, 'add_new_speech_experts') else 1)"
    deadline = time.monotonic() + wait_s
    while True:
        if subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        log("DeepTalkForCausalLM.add_new_speech_experts is not there yet; checking again in 60 s")
        time.sleep(60)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def aggregate(runs: dict[int, dict], rows: list[str]) -> dict:
    out = {}
    for row in rows:
        per_seed = [runs[s][row] for s in runs if row in runs[s]]
        if not per_seed:
            continue
        agg = {"seeds": len(per_seed)}
        for key in ("text_acc", "relative_drop", "text_ce_delta", "relative_drop_after_speech", "text_ce_delta_after_speech",
                    "spoken_text_acc", "audio_token_acc"):
            agg[key] = spread([r.get(key) for r in per_seed])
        agg["train_steps"] = per_seed[0].get("train_steps")
        agg["trainable"] = per_seed[0].get("trainable")
        agg["total_params"] = per_seed[0].get("total_params")
        out[row] = agg
    return out


def mid_cell(a: dict) -> str:
    drop, ce = a.get("relative_drop_after_speech"), a.get("text_ce_delta_after_speech")
    if not drop or drop[0] != drop[0]:
        return "—"
    return f"{100 * drop[0]:.1f} ± {100 * drop[1]:.1f} % ({ce[0]:+.2f})"


def markdown_table(agg: dict) -> str:
    def cell(pair, pct=False, signed=False):
        mean, half = pair
        if mean != mean:
            return "n/a"
        if pct:
            return f"{100 * mean:.1f} ± {100 * half:.1f} %"
        return f"{mean:+.3f} ± {half:.3f}" if signed else f"{mean:.3f} ± {half:.3f}"

    lines = ["| strategy | text acc | relative drop | Δ text answer CE | drop after the speech stage (Δ CE) | spoken→text acc | "
             "audio-token acc | train steps | trainable params (per stage) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row, a in agg.items():
        trainable = " / ".join(fmt_params(n) for n in a["trainable"]) if a["trainable"] else "—"
        lines.append(f"| {LABELS.get(row, row)} | {cell(a['text_acc'])} | {cell(a['relative_drop'], True)} | "
                     f"{cell(a['text_ce_delta'], signed=True)} | {mid_cell(a)} | "
                     f"{cell(a['spoken_text_acc'])} | {cell(a['audio_token_acc'])} | {a['train_steps']} | {trainable} |")
    return "\n".join(lines)


PAIRED_KEYS = (("text_acc", "text acc", "{:+.3f}"), ("text_ce_delta", "Δ text answer CE", "{:+.3f}"),
               ("text_ce_delta_after_speech", "Δ text CE after the speech stage", "{:+.3f}"),
               ("spoken_text_acc", "spoken→text acc", "{:+.3f}"), ("audio_token_acc", "audio-token acc", "{:+.3f}"))


def paired(runs: dict, rows: list[str], reference: str = "adaptive") -> dict:
    """Per-seed differences `strategy - reference` (same seed = same original LLM, data and phase-1
    model, so most of the seed-to-seed noise cancels): mean, min, max, and how many seeds had the
    sign of the mean."""
    out = {}
    for row in rows:
        if row == reference or row in ("original", "phase1"):
            continue
        seeds = [s for s in runs if row in runs[s] and reference in runs[s]]
        if not seeds:
            continue
        out[row] = {}
        for key, _, _ in PAIRED_KEYS:
            diffs = [runs[s][row].get(key) - runs[s][reference].get(key) for s in seeds
                     if runs[s][row].get(key) is not None and runs[s][reference].get(key) is not None]
            if diffs:
                mean = sum(diffs) / len(diffs)
                out[row][key] = {"mean": mean, "min": min(diffs), "max": max(diffs), "n": len(diffs),
                                 "same_sign": sum((d > 0) == (mean > 0) and d != 0 for d in diffs)}
    return out


def paired_table(diffs: dict, reference: str = "adaptive") -> str:
    lines = [f"| strategy − {LABELS.get(reference, reference)}, per seed | " + " | ".join(name for _, name, _ in PAIRED_KEYS) + " |",
             "|---|" + "---:|" * len(PAIRED_KEYS)]
    for row, values in diffs.items():
        cells = []
        for key, _, fmt in PAIRED_KEYS:
            v = values.get(key)
            cells.append("—" if v is None else f"{fmt.format(v['mean'])} [{fmt.format(v['min'])}, {fmt.format(v['max'])}] "
                                                f"({v['same_sign']}/{v['n']})")
        lines.append(f"| {LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(agg: dict, runs: dict, path: str, title: str):
    """Three panels against the text-ability loss: spoken->text accuracy and audio-token accuracy vs
    the relative text QA drop, and audio-token accuracy vs the text answer CE change. Big markers:
    mean over seeds with half-range error bars; small faint markers: the single seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adaptive": "C0", "random": "C1", "moextend": "C2", "full_ft": "C3", "lora": "C4", "adaptive_bank_only": "C9"}
    markers = {"adaptive": "o", "random": "v", "moextend": "D", "full_ft": "s", "lora": "P", "adaptive_bank_only": "^"}
    panels = (("relative_drop", 100, "relative text QA drop vs the original LLM (%)  (← better)",
               "spoken_text_acc", "spoken question → text answer accuracy"),
              ("relative_drop", 100, "relative text QA drop vs the original LLM (%)  (← better)",
               "audio_token_acc", "audio-token accuracy, held-out spoken answers"),
              ("text_ce_delta", 1, "Δ text answer cross-entropy vs the original LLM (nats/token)  (← better)",
               "audio_token_acc", "audio-token accuracy, held-out spoken answers"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (xkey, xscale, xlabel, ykey, ylabel) in zip(axes, panels):
        for row, a in agg.items():
            if row not in colors:
                continue
            for seed_run in runs.values():
                r = seed_run.get(row, {})
                if r.get(xkey) is not None and r.get(ykey) is not None:
                    ax.plot(xscale * r[xkey], r[ykey], markers[row], color=colors[row], alpha=0.3, markersize=5)
            (x, xerr), (y, yerr) = a[xkey], a[ykey]
            ax.errorbar(xscale * x, y, xerr=xscale * xerr, yerr=yerr, fmt=markers[row], color=colors[row], capsize=4,
                        markersize=9, markeredgecolor="k", label=LABELS.get(row, row))
        ax.axvline(0, color="0.7", lw=0.8, zorder=0)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.margins(x=0.12, y=0.15)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(json_path: str, plot_path: str):
    """Table + plot again from a `--json` file (no training)."""
    with open(json_path) as f:
        payload = json.load(f)
    runs = {int(k): v for k, v in payload["runs"].items()}
    settings = payload["settings"]
    agg = aggregate(runs, ["original", "phase1"] + list(settings["strategies"]))
    print(markdown_table(agg))
    if "adaptive" in settings["strategies"] and len(settings["strategies"]) > 1:
        print("\n" + paired_table(paired(runs, list(settings["strategies"]))))
    plot(agg, runs, plot_path, plot_title(settings, settings["steps"]))
    log(f"plot: {plot_path}")


def plot_title(settings: dict, steps: dict) -> str:
    return (f"DeepTalk retention in miniature: tiny DeepSeek-V2-style MoE (16 experts, top-4, k = {settings['num_speech_experts']}), "
            f"{len(settings['seeds'])} seeds, {steps['experts_speech']}+{steps['experts_text']}+{steps['joint']} steps per strategy "
            f"(baselines: {settings['baseline_schedule']} schedule), eval on {'+'.join(settings['eval_splits'])}\n"
            f"big markers: mean ± half the min–max range over seeds; small markers: single seeds")


# --------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"subset of {','.join(STRATEGIES)}, plus the ablation {','.join(EXTRA_STRATEGIES)} (2a trains "
                             "the speech bank and audio rows only, DeepSeek's dense first layer stays frozen)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="scale the tiny_cpu recipes' steps (align 300, speech 300, text 60, joint 200)")
    parser.add_argument("--pretrain-steps", type=int, default=1500, help="steps teaching the original LLM (quickstart: 1500)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-speech-experts", type=int, default=4, help="k speech experts per MoE layer (of 16)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--baseline-schedule", choices=("staged", "joint"), default="staged",
                        help="PureMoE / LoRA data schedule: the same 3 stages as DeepTalk, or all steps on the joint mix")
    parser.add_argument("--eval-splits", default="validation,test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--moextend-wait", type=float, default=1200,
                        help="seconds to wait for DeepTalkForCausalLM.add_new_speech_experts before skipping MoExtend")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "retention.png"))
    parser.add_argument("--json", default=None, help="write every number (per seed, per stage) here")
    parser.add_argument("--replot", default=None, metavar="JSON", help="only redraw the table and plot from a --json file")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.eval_splits = [s.strip() for s in args.eval_splits.split(",") if s.strip()]
    unknown = set(args.strategies) - set(STRATEGIES) - set(EXTRA_STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {STRATEGIES + EXTRA_STRATEGIES}")

    notes = []
    if "moextend" in args.strategies and not moextend_available(args.moextend_wait):
        notes.append("MoExtend skipped: DeepTalkForCausalLM.add_new_speech_experts did not appear in time.")
        log(notes[-1])
        args.strategies.remove("moextend")

    import torch
    import transformers

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine_info

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    info = machine_info(args.threads, mem_total=True)
    steps = recipe_steps(args.steps_scale)
    log(f"machine: {info['cpu_model']}, {info['logical_cpus']} CPUs, torch {info['torch']}, transformers {info['transformers']}")
    log(f"seeds {args.seeds}; strategies {args.strategies}; steps: pretrain {args.pretrain_steps}, align {steps['align']}, "
        f"per branch speech {steps['experts_speech']} + text {steps['experts_text']} + joint {steps['joint']} (batch {args.batch_size})")

    runs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="deeptalk_retention_") as workdir:
        for seed in args.seeds:
            run = SeedRun(args, seed, os.path.join(workdir, f"seed{seed}"))
            run.prepare()
            runs[seed] = {"original": {"text_acc": run.original_text, "relative_drop": 0.0, "text_ce": run.original_ce,
                                       "text_ce_delta": 0.0, "spoken_text_acc": float("nan"),
                                       "audio_token_acc": float("nan"), "train_steps": f"{args.pretrain_steps} (text pretraining)",
                                       "trainable": []},
                          "phase1": run.phase1_metrics}
            for strategy in args.strategies:
                runs[seed][strategy] = run.run_branch(strategy)
            del run

    rows = ["original", "phase1"] + [s for s in args.strategies]
    agg = aggregate(runs, rows)
    table = markdown_table(agg)
    eval_sizes = f"eval: {'+'.join(args.eval_splits)}"
    print("\n" + table)
    print(f"\n± = half the min–max range over seeds {args.seeds}. Relative drop = (original − new) / original text QA "
          f"accuracy. Δ text answer CE = teacher-forced cross-entropy of the text QA answers (nats/token) minus the original LLM's; "
          f"'after the speech stage' = measured right after the branch's first (speech-only data) stage. "
          f"{eval_sizes}. Branch train steps come on top of the shared start (text pretraining + phase 1). "
          f"Total wall time {time.perf_counter() - _START:.0f}s.")
    diffs = paired(runs, rows) if "adaptive" in args.strategies and len(args.strategies) > 1 else {}
    if diffs:
        print("\n" + paired_table(diffs))
        print("Mean [min, max] over seeds of the per-seed difference to the adaptive branch of the same seed; "
              "(k/n) = seeds whose difference has the sign of the mean.")
    for note in notes:
        print(note)
    plot(agg, runs, args.plot, plot_title(vars(args), steps))
    log(f"plot: {args.plot}")
    if args.json:
        payload = {"settings": {**vars(args), "steps": steps}, "machine": info, "notes": notes, "aggregate": agg,
                   "runs": {str(s): r for s, r in runs.items()}, "markdown": table,
                   "paired_vs_adaptive": diffs,
                   "wall_s": round(time.perf_counter() - _START, 1)}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        log(f"json: {args.json}")
    return agg


if __name__ == "__main__":
    main()
