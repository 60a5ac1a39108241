#!/usr/bin/env python
# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Text retention while learning speech (arXiv 2506.21864's claim), measured on a tiny MoE.

The text skill. A tiny Qwen3-MoE-style LLM (dense first layer, 16 routed experts, top-4) is taught the
demo world's text QA and a text-only task family: things and their kinds (``deeptalk.data.demo_world.
kind_questions``: "which one is a tool in [car,saw,drum]", "which one is not a drink in [...]", "how
many vehicles are in [...]"). None of its 48 things or six kinds is ever spoken in the demo corpus,
the corpus's text QA never names them, and the test questions (held out: never trained on) are
checked against every speech training text, so no later phase re-teaches the skill. Its accuracy on
the held-out test questions is "the original LLM's text ability"; the relative drop
``(original - new) / original`` of that accuracy is the paper's headline metric.

The shared start, once per seed: convert the LLM (``DeepTalkForCausalLM.from_text_moe``), give it
ears and a voice (``add_speech``: a tiny random Whisper encoder + adapter, the demo MelVQ codec's
tokens), phase 1 alignment (``DeepTalkAlignmentTrainer``: encoder, adapter and the audio rows train,
the LLM stays frozen, so text answers are unchanged), and the modality load
(``deeptalk.trainers.assignment.measure_modality_load``).

Then one branch per strategy from a copy of that model. Every branch gets the same optimizer steps
on the same data: a speech stage (spoken questions with spoken answers), a text stage (the world's
text QA) and a joint stage (both, plus ASR), at the tiny_cpu recipes' learning rates:

* ``adaptive``           DeepTalk: speech experts = top-k of rhoA * (1 - rhoT) per layer; 2a
                         ``DeepTalkExpertsTrainer`` (speech bank, ``speech_only``), 2b (text bank,
                         ``text_only``), 3 ``DeepTalkJointTrainer`` (everything, free routing);
* ``random``             the same with a seeded random choice of speech experts;
* ``moextend``           the same with k NEW experts per layer (``add_new_speech_experts``);
* ``full_finetune``      the dense-training comparison: every stage trains all LLM parameters with
                         free routing (``DeepTalkJointTrainer``);
* ``lora``               LoRA (peft, r 8) on attention, the dense MLP and the expert bank, plus the
                         audio rows of the embedding and head, free routing, every stage;
* ``by_token_modality``  MoST-style: the adaptive experts and DeepTalk's stages, but every token is
                         routed among its own modality's experts, in training and at inference.

Metrics per branch: held-out text-skill accuracy and relative drop (and the same right after the
speech stage), the world's text QA accuracy, spoken question -> text answer accuracy, audio-token
accuracy on held-out spoken answers, and, with ``--judge-asr``, the spoken answers' accuracy judged by
an ASR (``deeptalk.evaluation.spoken_qa_speech_scores``). Mean and 95 % t-interval over seeds, and
per-seed differences to ``adaptive`` (same phase-1 model, so shared noise cancels).

Flags: ``--control-sweep`` (full fine-tuning's drop against speech steps, on the validation split
with seeds kept apart: how the default schedule was chosen), ``--ablations`` (speech experts per
layer, router trained in phase 2, dense first layer frozen, no phase 2b), ``--quick`` (a tiny run
for the test suite), ``--replot JSON``, ``--original-llm-dir`` / ``--phase1-dir`` (keep and reuse the
original LLM and each seed's phase-1 model across runs with the same settings). Results and
reading: docs/retention.md.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/retention.py                 # the default run
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/retention.py --control-sweep --strategies none
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/retention.py --ablations --strategies adaptive
    python benchmarks/retention.py --quick --json /tmp/retention.json                  # about a minute

A script, not a test: nothing is asserted about which strategy wins.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
STRATEGIES = ("adaptive", "random", "moextend", "full_finetune", "lora", "by_token_modality")
LABELS = {
    "original": "original LLM (text only)",
    "phase1": "after phase 1 (shared start)",
    "adaptive": "adaptive experts (DeepTalk)",
    "random": "random experts",
    "moextend": "MoExtend (new experts)",
    "full_finetune": "full fine-tuning (dense training)",
    "lora": "LoRA",
    "by_token_modality": "by-token-modality routing (MoST-style)",
}
KIND_SPLIT_SEEDS = {"test": 1, "validation": 2, "train": 3}  # fixed: every run asks the same questions
METRICS = ("text_relative_drop", "kinds_accuracy", "text_relative_drop_after_speech_stage", "world_text_accuracy",
           "spoken_qa_accuracy", "audio_token_accuracy", "judge_s2s_accuracy")
_START = time.perf_counter()


def log(message: str):
    print(f"[retention {time.perf_counter() - _START:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything a run depends on (stored in the JSON)."""

    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    strategies: list = field(default_factory=lambda: list(STRATEGIES))
    base_seed: int = 0
    # the original LLM
    family: str = "qwen3_moe"
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_experts: int = 16
    top_k: int = 4
    head_dim: int = 32
    tokenizer_vocab_size: int = 1000  # saturates the demo texts' merges: every word is one token
    base_steps: int = 2000
    base_lr: float = 3e-3
    kinds_templates: list = field(default_factory=lambda: ["which_is", "which_is_not"])
    kinds_train: int = 8000
    kinds_validation: int = 600
    kinds_test: int = 1200
    kind_fact_repeats: int = 20  # "what kind of thing is a saw" facts in the original LLM's training mix
    world_repeats: int = 3  # copies of the world's text QA in that mix
    # speech
    num_speech_experts: int = 4
    align_steps: int = 100
    speech_steps: int = 80  # the speech stage (2a); the text and joint stages follow the ratios below
    text_ratio: float = 0.2  # the tiny_cpu recipes' proportions (300 / 60 / 200)
    joint_ratio: float = 2 / 3
    batch_size: int = 16
    lora_rank: int = 8
    load_text: str = "world+kinds"  # text data for the modality load (rhoT)
    # evaluation
    eval_split: str = "test"
    spoken_eval_splits: list = field(default_factory=lambda: ["validation", "test"])
    judge_asr: str | None = None
    corpus_limit: int | None = None  # records per corpus task/split (quick mode)
    # execution
    workers: int = 2
    threads: int = 1

    def stage_steps(self, speech_steps: int | None = None) -> dict:
        s = self.speech_steps if speech_steps is None else speech_steps
        return {"speech": s, "text": round(s * self.text_ratio), "joint": round(s * self.joint_ratio)}


QUICK = dict(seeds=[0, 1], hidden_size=64, num_hidden_layers=2, num_experts=8, top_k=2, head_dim=16,
             base_steps=80, base_lr=1e-2, kinds_train=400, kinds_templates=["which_is", "which_is_not", "how_many"],
             kinds_validation=24, kinds_test=48, kind_fact_repeats=2, world_repeats=1, num_speech_experts=2,
             align_steps=4, speech_steps=6, corpus_limit=12, workers=1, lora_rank=2)
QUICK_SWEEP = [3, 6]
DEFAULT_SWEEP = [20, 40, 80, 160, 320]
SWEEP_SEEDS = [100, 101, 102, 103, 104]


@dataclass(frozen=True)
class Branch:
    """One way of adding speech, trained from the shared phase-1 model."""

    name: str
    assignment: str | None  # adaptive | random | moextend | None (no modality split)
    training: str  # deeptalk (experts trainers, then joint) | full | lora
    routing: str | None = None  # overrides every stage's routing and the inference routing
    num_speech_experts: int | None = None  # None: Settings.num_speech_experts
    train_router: bool = False
    train_dense_layers: bool = True
    text_stage: bool = True
    speech_steps: int | None = None  # None: Settings.speech_steps


def strategy_branch(name: str) -> Branch:
    return {
        "adaptive": Branch("adaptive", "adaptive", "deeptalk"),
        "random": Branch("random", "random", "deeptalk"),
        "moextend": Branch("moextend", "moextend", "deeptalk"),
        "full_finetune": Branch("full_finetune", None, "full"),
        "lora": Branch("lora", None, "lora"),
        "by_token_modality": Branch("by_token_modality", "adaptive", "deeptalk", routing="by_token_modality"),
    }[name]


def ablation_branches(settings: Settings) -> list[Branch]:
    """Adaptive with one thing changed: speech experts per layer, router trained in phase 2, dense first
    layer frozen in phase 2, no phase 2b."""
    adaptive = strategy_branch("adaptive")
    out = []
    k = 1
    while k < settings.num_experts:
        if k != settings.num_speech_experts:
            out.append(replace(adaptive, name=f"speech_experts_{k}", num_speech_experts=k))
        k *= 2
    out += [replace(adaptive, name="router_trained", train_router=True),
            replace(adaptive, name="dense_layer_frozen", train_dense_layers=False),
            replace(adaptive, name="no_phase_2b", text_stage=False)]
    return out


ABLATION_LABELS = {"router_trained": "router trained in phase 2",
                   "dense_layer_frozen": "dense first layer frozen in phase 2", "no_phase_2b": "without phase 2b"}


def label(name: str) -> str:
    if name.startswith("speech_experts_"):
        return f"{name.rsplit('_', 1)[1]} speech experts per layer"
    if name.startswith("sweep_"):
        return f"full fine-tuning, {name.rsplit('_', 1)[1]} speech steps"
    return LABELS.get(name) or ABLATION_LABELS.get(name, name)


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------
def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t critical value for integer `df`, from the exact finite-sum CDF (Abramowitz &
    Stegun 26.7.3-4) by bisection. (scipy is not a dependency of this project.)"""
    if df < 1:
        raise ValueError(f"df={df}: a t-interval needs at least two values")

    def within(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        c, s = math.cos(theta), math.sin(theta)
        if df % 2:
            total, term = 0.0, c
            for j in range((df - 1) // 2):
                total += term
                term *= c * c * (2 * j + 2) / (2 * j + 3)
            return 2 / math.pi * (theta + s * total) if df > 1 else 2 * theta / math.pi
        total, term = 0.0, 1.0
        for j in range(df // 2):
            total += term
            term *= c * c * (2 * j + 1) / (2 * j + 2)
        return s * total

    low, high = 0.0, 1e4
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if within(mid) < confidence else (low, mid)
    return (low + high) / 2


def summarize(values) -> dict | None:
    """`{mean, ci_low, ci_high, n, values}` with a 95 % t-interval over the values (None without values;
    no interval from one value)."""
    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": 1, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n, "values": values}


def excludes_zero(summary: dict | None) -> bool:
    return bool(summary and summary["ci_low"] is not None and (summary["ci_low"] > 0 or summary["ci_high"] < 0))


# --------------------------------------------------------------------------------------------------
# the world: tokenizer, codec, processor, speech data, the text skill's splits
# --------------------------------------------------------------------------------------------------
@dataclass
class World:
    processor: object
    codec: object
    data: object  # deeptalk.recipes.demo_data.DemoData
    kinds: dict  # split -> list of {"question_text", "answer_text", "template"}
    overlap: dict  # what the speech training data shares with the text skill's test questions


def kind_records(settings: Settings) -> dict:
    from deeptalk.data.demo_world import kind_questions

    sizes = {"test": settings.kinds_test, "validation": settings.kinds_validation, "train": settings.kinds_train}
    taken: set[str] = set()
    out = {}
    for split in ("test", "validation", "train"):  # later splits exclude earlier ones: disjoint
        items = kind_questions(sizes[split], seed=KIND_SPLIT_SEEDS[split], templates=settings.kinds_templates,
                               exclude=taken)
        taken.update(item.question for item in items)
        out[split] = [{"question_text": i.question, "answer_text": i.answer, "template": i.template} for i in items]
    return out


def speech_overlap(data, kinds: dict) -> dict:
    """What the speech training texts (spoken questions and answers, ASR transcripts, train split) share
    with the text skill: held-out test questions, and any thing or kind word (an answer fact)."""
    from deeptalk.data.demo_world import KIND_OF_THING, THING_KINDS

    texts = [r["question_text"] for r in data.records["spoken_qa"]["train"]]
    texts += [r["answer_text"] for r in data.records["spoken_qa"]["train"]]
    texts += [r["text"] for r in data.records["asr"]["train"]]
    world_text = [r["question_text"] + " " + r["answer_text"] for r in data.records["text_qa"]["train"]]
    words = set(KIND_OF_THING) | set(THING_KINDS) | {k + "s" for k in THING_KINDS}
    test = {r["question_text"] for r in kinds["test"]}
    return {
        "speech_texts_checked": len(texts),
        "test_questions_in_speech_data": sum(t in test for t in texts),
        "speech_texts_naming_a_thing_or_kind": sum(bool(words & set(t.split())) for t in texts),
        "world_text_qa_naming_a_thing_or_kind": sum(bool(words & set(t.split())) for t in world_text),
    }


def build_world(settings: Settings) -> World:
    from deeptalk.data.demo_world import kind_facts
    from deeptalk.recipes.demo_data import (
        build_demo_data,
        build_demo_processor,
        build_demo_tokenizer,
        demo_corpus_texts,
        fit_demo_codec,
    )

    kinds = kind_records(settings)
    skill_texts = [r["question_text"] + " " + r["answer_text"] for split in kinds.values() for r in split]
    skill_texts += [q + " " + a for q, a in kind_facts()]
    tokenizer = build_demo_tokenizer(demo_corpus_texts() + skill_texts, vocab_size=settings.tokenizer_vocab_size)
    # data infrastructure, the same for every seed: the demo codec of the recorded results (80 mels, fitted on
    # the one-word answers), so that they reproduce; the demo default has since moved to 128 mels + sentences
    codec = fit_demo_codec(seed=0, n_mels=80, columns=("answer_audio",))
    processor = build_demo_processor(tokenizer, codec)
    data = build_demo_data(processor, codec, limit=settings.corpus_limit)
    overlap = speech_overlap(data, kinds)
    if overlap["test_questions_in_speech_data"] or overlap["speech_texts_naming_a_thing_or_kind"]:
        raise RuntimeError(f"The speech training data would re-teach the text skill: {overlap}")
    return World(processor=processor, codec=codec, data=data, kinds=kinds, overlap=overlap)


# --------------------------------------------------------------------------------------------------
# the original LLM
# --------------------------------------------------------------------------------------------------
class OriginalLLMCollator:
    """Text-stream batches for teaching the original LLM. The loss covers the whole dialogue (so the LLM
    can later learn to write transcripts, as in the quickstart), except for rows marked `answer_only`:
    a random list of things has nothing to learn but its answer."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        import torch

        batch = self.processor.pad(rows)
        input_ids = batch["input_ids"][:, 0]
        dialogue = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
        answer_only = torch.tensor([bool(r["answer_only"]) for r in rows])[:, None]
        labels = torch.where(answer_only, batch["labels"][:, 0], dialogue)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": batch["attention_mask"]}


def original_llm_dataset(world: World, settings: Settings):
    import datasets

    from deeptalk.data.demo_world import kind_facts
    from deeptalk.recipes.demo_data import text_qa_conversation

    rows = [(r["question_text"], r["answer_text"], True) for r in world.kinds["train"]]
    rows += [(q, a, False) for q, a in kind_facts()] * settings.kind_fact_repeats
    world_rows = [(r["question_text"], r["answer_text"], False) for r in world.data.records["text_qa"]["train"]]
    rows += world_rows * settings.world_repeats
    encoded = world.processor.encode_batch([text_qa_conversation(q, a) for q, a, _ in rows])
    columns = {k: encoded[k] for k in ("input_ids", "labels", "audio_input_mask")}
    return datasets.Dataset.from_dict({**columns, "answer_only": [only for _, _, only in rows]})


def model_config(world: World, settings: Settings):
    from deeptalk.tiny import tiny_text_moe_config

    tokenizer, layout = world.processor.tokenizer, world.processor.layout
    extra = {}
    if settings.family == "qwen3_moe":  # a dense first layer, as DeepSeek-V2 (the paper's family) has
        extra = dict(head_dim=settings.head_dim, num_key_value_heads=4, mlp_only_layers=[0])
    return tiny_text_moe_config(settings.family, vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
                                num_hidden_layers=settings.num_hidden_layers, num_experts=settings.num_experts,
                                top_k=settings.top_k, pad_token_id=layout.pad_t_id, eos_token_id=layout.eot_id,
                                bos_token_id=tokenizer.bos_token_id, **extra)


def train_original_llm(world: World, settings: Settings, workdir: str):
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(settings.base_seed)
    source = AutoModelForCausalLM.from_config(model_config(world, settings))
    args = TrainingArguments(
        output_dir=os.path.join(workdir, "original_llm_training"), max_steps=settings.base_steps,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.base_lr, lr_scheduler_type="cosine",
        warmup_steps=0.03, weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=max(1, settings.base_steps // 10), seed=settings.base_seed, remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=source, args=args, train_dataset=original_llm_dataset(world, settings),
                      data_collator=OriginalLLMCollator(world.processor))
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    source.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return source, {"steps": trainer.state.global_step, "loss_first": losses[0] if losses else None,
                    "loss_last": losses[-1] if losses else None, "seconds": round(time.perf_counter() - started, 1),
                    "parameters": sum(p.numel() for p in source.parameters())}


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def kinds_accuracy(model, world: World, split: str) -> tuple[float, dict]:
    """Held-out text-skill accuracy, overall and per template."""
    from deeptalk.evaluation import normalize_answer, text_qa_accuracy

    records = world.kinds[split]
    accuracy, predictions = text_qa_accuracy(model, world.processor, records, max_new_tokens=4, batch_size=64,
                                             return_predictions=True)
    per_template: dict[str, list[bool]] = {}
    for record, prediction in zip(records, predictions):
        per_template.setdefault(record["template"], []).append(normalize_answer(prediction) == record["answer_text"])
    return accuracy, {t: sum(hits) / len(hits) for t, hits in sorted(per_template.items())}


def judge_spoken_answers(model, world: World, records: list, asr: str) -> float:
    """JUDGE HOOK: accuracy of the model's *spoken* answers to spoken questions, transcribed by `asr` (a
    transformers ASR checkpoint folder or Hub id such as a pretrained Whisper, or "own" for the model's own
    ASR path) and matched against the reference answers (`deeptalk.evaluation.spoken_qa_speech_scores`).
    Enabled by `--judge-asr`; without it the JSON reports `judge_s2s_accuracy: null`."""
    from deeptalk.evaluation import spoken_qa_speech_scores

    return spoken_qa_speech_scores(model, world.processor, world.codec, records, asr=asr, max_steps=60)["accuracy"]


def evaluate(model, world: World, settings: Settings, text_only: bool = False) -> dict:
    from deeptalk.evaluation import dataset_audio_token_accuracy, spoken_qa_text_accuracy, text_qa_accuracy

    accuracy, per_template = kinds_accuracy(model, world, settings.eval_split)
    data = world.data
    world_text = [r for s in ("validation", "test") for r in data.records["text_qa"][s]]
    out = {"kinds_accuracy": accuracy, "kinds_accuracy_per_template": per_template,
           "world_text_accuracy": text_qa_accuracy(model, world.processor, world_text, max_new_tokens=4, batch_size=64)}
    if text_only:
        return out
    spoken = [r for s in settings.spoken_eval_splits for r in data.records["spoken_qa"][s]]
    speech_rows = [row for s in settings.spoken_eval_splits for row in data.spoken_qa_speech[s]]
    out["spoken_qa_accuracy"] = spoken_qa_text_accuracy(model, world.processor, spoken, max_new_tokens=4, batch_size=36)
    out["audio_token_accuracy"] = dataset_audio_token_accuracy(model, world.processor, speech_rows, batch_size=36)
    out["judge_s2s_accuracy"] = (judge_spoken_answers(model, world, spoken, settings.judge_asr) if settings.judge_asr
                                 else None)
    return out


def relative_drop(original: float, new: float) -> float | None:
    from deeptalk.evaluation import relative_drop as paper_relative_drop

    return paper_relative_drop(original, new) if original else None


# --------------------------------------------------------------------------------------------------
# training stages
# --------------------------------------------------------------------------------------------------
RECIPES = {"align": "align", "speech": "experts_speech", "text": "experts_text", "joint": "joint"}
ONLY_EXPERTS_OPTIONS = ("modality", "train_embeddings", "train_router", "train_dense_layers", "train_moe_attention",
                        "train_shared_experts")


def stage_args(stage: str, steps: int, seed: int, settings: Settings, output_dir: str) -> dict:
    """The tiny_cpu recipe of `stage` (learning rate, schedule) with this run's steps, batch and seed."""
    from deeptalk.trainers.recipes import load_recipe

    args = dict(load_recipe(f"tiny_cpu/{RECIPES[stage]}")["args"])
    args.update(max_steps=steps, per_device_train_batch_size=settings.batch_size, seed=seed, output_dir=output_dir,
                report_to="none", save_strategy="no", logging_steps=max(1, steps // 5), disable_tqdm=True, use_cpu=True)
    return args


def train_stage(trainer) -> dict:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    started = time.perf_counter()
    trainer.train()
    trainer.model.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trainer": type(trainer).__name__, "routing_mode": trainer.plan.routing_mode,
            "steps": trainer.state.global_step,
            "learning_rate": trainer.args.learning_rate, "trainable_parameters": trainable,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - started, 1)}


def collator(world: World):
    from deeptalk.processing.processing_deeptalk import DeepTalkDataCollator

    return DeepTalkDataCollator(world.processor)


class SeedRun:
    """The shared start of one seed (convert, add speech, phase 1, modality load) and its branches."""

    def __init__(self, world: World, settings: Settings, seed: int, workdir: str):
        self.world, self.settings, self.seed, self.workdir = world, settings, seed, workdir
        self.phase1 = self.load = None

    def save(self, directory: str):
        """The phase-1 model (safetensors) and its modality load, for the branch workers."""
        self.phase1.save_pretrained(directory)
        load = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in asdict(self.load).items()}
        with open(os.path.join(directory, "modality_load.json"), "w") as f:
            json.dump(load, f)

    def restore(self, directory: str):
        import deeptalk
        from deeptalk.trainers.assignment import ModalityLoad

        self.phase1 = deeptalk.DeepTalkForCausalLM.from_pretrained(directory).eval()
        with open(os.path.join(directory, "modality_load.json")) as f:
            self.load = ModalityLoad(**json.load(f))

    def shared_start(self, source) -> dict:
        import torch

        import deeptalk
        from deeptalk.quickstart import make_random_encoder_audible
        from deeptalk.tiny import tiny_whisper_config
        from deeptalk.trainers import DeepTalkAlignmentConfig, DeepTalkAlignmentTrainer
        from deeptalk.trainers.assignment import measure_modality_load

        world, settings, seed = self.world, self.settings, self.seed
        torch.manual_seed(seed)
        model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, progress=False)
        model.add_speech(audio_config=tiny_whisper_config(d_model=64, encoder_layers=2),
                         **world.processor.model_speech_kwargs())
        make_random_encoder_audible(model.model.audio_encoder)  # a random encoder passes almost no sound otherwise
        # the paper's phase 1 keeps the LLM frozen; the random encoder has to learn to hear (no Whisper offline)
        args = DeepTalkAlignmentConfig(**{**stage_args("align", settings.align_steps, seed, settings,
                                                       os.path.join(self.workdir, "phase1")),
                                          "train_audio_encoder": True, "train_embeddings": "audio_rows"})
        dataset = world.data.tasks_dataset(("asr", "spoken_qa_text"), "train", seed=seed)
        trainer = DeepTalkAlignmentTrainer(model, args, train_dataset=dataset, data_collator=collator(world))
        record = train_stage(trainer)
        self.phase1 = model

        def batches(rows, size=16):
            for start in range(0, len(rows), size):
                chunk = [rows[i] for i in range(start, min(start + size, len(rows)))]
                yield {k: v for k, v in collator(world)(chunk).items() if k != "labels"}

        text_rows = list(world.data.text_qa["train"])
        if settings.load_text == "world+kinds":
            text_rows = [r for pair in zip(text_rows, self._kinds_train_rows(len(text_rows))) for r in pair]
        self.load = measure_modality_load(model, batches(text_rows), batches(world.data.spoken_qa_speech["train"]),
                                          max_batches=8, progress=False)
        return {**evaluate(model, world, settings), "stages": [record]}

    def _kinds_train_rows(self, count: int) -> list:
        from deeptalk.recipes.demo_data import text_qa_conversation

        records = self.world.kinds["train"][:count]
        encoded = self.world.processor.encode_batch(
            [text_qa_conversation(r["question_text"], r["answer_text"]) for r in records])
        return [dict(zip(encoded, values)) for values in zip(*encoded.values())]

    # ---- one branch ----------------------------------------------------------------------------
    def run_branch(self, branch: Branch, original_kinds_accuracy: float) -> dict:
        import torch

        from deeptalk.trainers import DeepTalkExpertsConfig, DeepTalkExpertsTrainer
        from deeptalk.trainers.assignment import assign_speech_experts
        from deeptalk.trainers.joint import DeepTalkJointConfig, DeepTalkJointTrainer

        world, settings, seed = self.world, self.settings, self.seed
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = copy.deepcopy(self.phase1)
        k = branch.num_speech_experts or settings.num_speech_experts
        speech_experts = None
        if branch.assignment:
            speech_experts = assign_speech_experts(model, self.load, k, strategy=branch.assignment, seed=seed)
        if branch.routing:
            model.config.routing_mode = branch.routing  # inference routes the same way as training
        train_model = lora_model(model, settings) if branch.training == "lora" else model

        steps = settings.stage_steps(branch.speech_steps)
        data = world.data
        stages = [("speech", data.spoken_qa_speech["train"])]
        if branch.text_stage:
            stages.append(("text", data.text_qa["train"]))
        stages.append(("joint", data.tasks_dataset(("spoken_qa_speech", "text_qa", "asr"), "train", seed=seed)))
        records, after_speech = [], {}
        for stage, dataset in stages:
            output_dir = os.path.join(self.workdir, f"{branch.name}_{stage}")
            args = stage_args(stage, steps[stage], seed, settings, output_dir)
            if branch.training == "deeptalk" and stage != "joint":
                config = DeepTalkExpertsConfig(**{**args, "modality": "speech" if stage == "speech" else "text",
                                                  "train_router": branch.train_router,
                                                  "train_dense_layers": branch.train_dense_layers})
                trainer = DeepTalkExpertsTrainer(train_model, config, train_dataset=dataset,
                                                 data_collator=collator(world))
            else:  # phase 3, and every stage of the baselines without a modality split: all LLM parameters
                args = {k: v for k, v in args.items() if k not in ONLY_EXPERTS_OPTIONS}
                config = DeepTalkJointConfig(**args, train_embeddings="all")
                trainer = DeepTalkJointTrainer(train_model, config, train_dataset=dataset,
                                               data_collator=collator(world), processing_class=world.processor)
            if branch.routing:
                trainer.plan.routing_mode = branch.routing
            if branch.training == "lora":
                lora_trainables(train_model)
            record = train_stage(trainer)
            record["stage"] = stage
            records.append(record)
            if stage == "speech":  # forgetting before the text and joint stages can repair it
                accuracy, _ = kinds_accuracy(merged_copy(train_model) if branch.training == "lora" else model, world,
                                             settings.eval_split)
                after_speech = {
                    "kinds_accuracy_after_speech_stage": accuracy,
                    "text_relative_drop_after_speech_stage": relative_drop(original_kinds_accuracy, accuracy)}
        if branch.training == "lora":
            model = train_model.merge_and_unload()
        metrics = evaluate(model, world, settings)
        return {**metrics, **after_speech,
                "text_relative_drop": relative_drop(original_kinds_accuracy, metrics["kinds_accuracy"]),
                "speech_experts": speech_experts, "stages": records,
                "train_steps": sum(r["steps"] for r in records), "seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------
# the language model's projections (the Whisper encoder's q_proj/... are left alone), both families
LORA_TARGET_MODULES = (r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj"
                       r"|kv_a_proj_with_mqa|kv_b_proj)|mlp\.(gate_proj|up_proj|down_proj)|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))")


def lora_model(model, settings: Settings):
    """LoRA adapters (peft) on attention, the dense MLP, shared experts and the routed-expert bank (fused
    parameters, peft's `target_parameters`), wrapped once for every stage."""
    from peft import LoraConfig, get_peft_model

    banks = [name for name in ("text_bank.gate_up_proj", "text_bank.down_proj", "speech_bank.gate_up_proj",
                               "speech_bank.down_proj") if model.moe_blocks()[0].get_parameter(name).numel()]
    config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                        target_modules=LORA_TARGET_MODULES, target_parameters=banks)
    return get_peft_model(model, config)


def lora_trainables(peft_model):
    """After a phase trainer set its plan: the adapters and the audio rows of the embedding and head (the
    new vocabulary has to be learned by every strategy) train, nothing else."""
    from deeptalk.trainers.freezing import unwrap_deeptalk

    for name, parameter in peft_model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    base = unwrap_deeptalk(peft_model)
    base.get_input_embeddings().audio_weight.requires_grad_(True)
    base.get_output_embeddings().audio_weight.requires_grad_(True)


def merged_copy(peft_model):
    return copy.deepcopy(peft_model).merge_and_unload()


# --------------------------------------------------------------------------------------------------
# work in worker processes: the shared start of each seed, then one job per (seed, branch)
# --------------------------------------------------------------------------------------------------
_WORLDS: dict = {}
_PHASE1: dict = {}


def cached_world(settings: Settings) -> World:
    key = (settings.tokenizer_vocab_size, tuple(settings.kinds_templates), settings.kinds_train,
           settings.kinds_validation, settings.kinds_test, settings.corpus_limit)
    if key not in _WORLDS:
        _WORLDS[key] = build_world(settings)
    return _WORLDS[key]


def quiet():
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _worker_setup(job: dict) -> tuple[Settings, World]:
    import torch

    quiet()
    settings = Settings(**job["settings"])
    torch.set_num_threads(settings.threads)
    return settings, cached_world(settings)


PHASE1_RECORD = "retention_phase1.json"
NOT_PHASE1_SETTINGS = ("seeds", "strategies", "speech_steps", "text_ratio", "joint_ratio", "lora_rank", "eval_split",
                       "spoken_eval_splits", "judge_asr", "workers", "threads")


def phase1_settings(settings: Settings, seed: int) -> dict:
    """What a phase-1 model depends on: a saved one is reused only where these agree."""
    return {"seed": seed, **{k: v for k, v in asdict(settings).items() if k not in NOT_PHASE1_SETTINGS}}


def phase1_job(job: dict) -> dict:
    """Convert the original LLM, add speech, phase 1 and the modality load for `job["seed"]`; saved to
    `job["phase1_dir"]` for the branch jobs. A model saved there by a run with the same settings is
    reused (and evaluated again)."""
    from transformers import AutoModelForCausalLM

    wall, cpu = time.perf_counter(), time.process_time()
    settings, world = _worker_setup(job)
    wanted = phase1_settings(settings, job["seed"])
    record_path = os.path.join(job["phase1_dir"], PHASE1_RECORD)
    saved = None
    if os.path.isfile(record_path):
        with open(record_path) as f:
            saved = json.load(f)
    with tempfile.TemporaryDirectory(prefix="retention_phase1_") as workdir:
        run = SeedRun(world, settings, job["seed"], workdir)
        if saved and saved["settings"] == wanted:
            run.restore(job["phase1_dir"])
            metrics = {**evaluate(run.phase1, world, settings), "stages": saved["stages"], "reused": job["phase1_dir"]}
        else:
            source = AutoModelForCausalLM.from_pretrained(job["original_llm"]).eval()
            metrics = run.shared_start(source)
            run.save(job["phase1_dir"])
            from deeptalk.saving import atomic_write_json

            atomic_write_json(record_path, {"settings": wanted, "stages": metrics["stages"]})
    metrics["text_relative_drop"] = relative_drop(job["original_kinds_accuracy"], metrics["kinds_accuracy"])
    metrics.update(seconds=round(time.perf_counter() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    log(f"[{job['name']} seed {job['seed']}] phase 1: {line(metrics)} "
        f"({metrics['seconds']:.0f}s wall, {metrics['cpu_seconds']:.0f}s CPU)")
    return {**job, "branch": "phase1", "result": metrics}


def branch_job(job: dict) -> dict:
    """One branch of one seed, from that seed's saved phase-1 model."""
    wall, cpu = time.perf_counter(), time.process_time()
    settings, world = _worker_setup(job)
    with tempfile.TemporaryDirectory(prefix="retention_branch_") as workdir:
        run = SeedRun(world, settings, job["seed"], workdir)
        if job["phase1_dir"] not in _PHASE1:
            _PHASE1.clear()  # one seed's model at a time
            run.restore(job["phase1_dir"])
            _PHASE1[job["phase1_dir"]] = (run.phase1, run.load)
        run.phase1, run.load = _PHASE1[job["phase1_dir"]]
        branch = Branch(**job["branch"])
        metrics = run.run_branch(branch, job["original_kinds_accuracy"])
    metrics.update(seconds=round(time.perf_counter() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    log(f"[{job['name']} seed {job['seed']}] {branch.name}: {line(metrics)} "
        f"({metrics['seconds']:.0f}s wall, {metrics['cpu_seconds']:.0f}s CPU)")
    return {**job, "branch": branch.name, "result": metrics}


def line(m: dict) -> str:
    drop = m.get("text_relative_drop")
    parts = [f"skill {m['kinds_accuracy']:.3f}" + ("" if drop is None else f" (drop {100 * drop:+.1f}%)")]
    if m.get("kinds_accuracy_after_speech_stage") is not None:
        parts.append(f"after speech stage {m['kinds_accuracy_after_speech_stage']:.3f}")
    parts.append(f"world text {m['world_text_accuracy']:.3f}")
    if "spoken_qa_accuracy" in m:
        parts.append(f"spoken QA {m['spoken_qa_accuracy']:.3f}, audio-token {m['audio_token_accuracy']:.3f}")
    return "; ".join(parts)


def run_jobs(function, jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(function, jobs))


FIRST = ("full_finetune", "adaptive", "lora", "random", "moextend", "by_token_modality")


def run_all(groups: list[dict], original_dir: str, original: dict, workdir: str, workers: int,
            phase1_dir: str | None = None) -> dict:
    """Every group (`name`, `settings`, `seeds`, `branches`, `split`): the shared start of each seed,
    then each branch. Returns `{name: {seed: {"phase1" | branch: metrics}}}`."""
    phase1_jobs = []
    for group in groups:
        for seed in group["seeds"]:
            phase1_jobs.append({"name": group["name"], "seed": seed, "settings": group["settings"],
                                "original_llm": original_dir,
                                "original_kinds_accuracy": original["kinds_accuracy"][group["split"]],
                                "phase1_dir": os.path.join(phase1_dir or workdir, f"phase1_{group['name']}_{seed}")})
    done = run_jobs(phase1_job, phase1_jobs, workers)
    branch_jobs = [{**job, "branch": asdict(branch)} for group in groups for branch in group["branches"]
                   for job in phase1_jobs if job["name"] == group["name"]]
    # strategy by strategy over the seeds, the control and DeepTalk first: a run stopped early (its log holds
    # every finished job) has intervals for them
    branch_jobs.sort(key=lambda j: (FIRST.index(j["branch"]["name"]) if j["branch"]["name"] in FIRST else len(FIRST),
                                    j["branch"]["speech_steps"] or 0, j["seed"]))
    done += run_jobs(branch_job, branch_jobs, workers)
    runs: dict = {}
    for item in done:
        runs.setdefault(item["name"], {}).setdefault(item["seed"], {})[item["branch"]] = item["result"]
    return runs


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
def aggregate(runs: dict[int, dict], name: str) -> dict:
    per_seed = [runs[s][name] for s in sorted(runs) if name in runs[s]]
    out = {key: summarize(r.get(key) for r in per_seed) for key in METRICS}
    first = per_seed[0]
    out.update(seeds=sorted(s for s in runs if name in runs[s]), train_steps=first.get("train_steps"),
               trainable_parameters=[st["trainable_parameters"] for st in first.get("stages", [])])
    return out


def paired(runs: dict[int, dict], name: str, reference: str) -> dict:
    """Per-seed `name - reference` (same phase-1 model per seed), summarized."""
    seeds = [s for s in sorted(runs) if name in runs[s] and reference in runs[s]]
    out = {}
    for key in METRICS:
        diffs = [runs[s][name][key] - runs[s][reference][key] for s in seeds
                 if runs[s][name].get(key) is not None and runs[s][reference].get(key) is not None]
        out[key] = summarize(diffs)
    return out


def fmt(summary: dict | None, percent: bool = False) -> str:
    if summary is None:
        return "—"
    scale, unit = (100, " %") if percent else (1, "")
    digits = 1 if percent else 3
    mean = f"{scale * summary['mean']:.{digits}f}"
    if summary["ci_low"] is None:
        return mean + unit
    return f"{mean} [{scale * summary['ci_low']:.{digits}f}, {scale * summary['ci_high']:.{digits}f}]{unit}"


def markdown_table(rows: dict, original: dict) -> str:
    lines = ["| strategy | text-skill accuracy | **relative text drop** (95 % CI) | drop after the speech stage | "
             "world text QA | spoken QA → text | audio-token acc | judge S2S | train steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {label('original')} | {original['kinds_accuracy']:.3f} | 0 | — | "
             f"{original['world_text_accuracy']:.3f} "
             "| — | — | — | — |"]
    for name, a in rows.items():
        lines.append(f"| {label(name)} | {fmt(a['kinds_accuracy'])} | **{fmt(a['text_relative_drop'], True)}** | "
                     f"{fmt(a['text_relative_drop_after_speech_stage'], True)} | {fmt(a['world_text_accuracy'])} | "
                     f"{fmt(a['spoken_qa_accuracy'])} | {fmt(a['audio_token_accuracy'])} | "
                     f"{fmt(a['judge_s2s_accuracy'])} | "
                     f"{a['train_steps'] if a['train_steps'] is not None else '—'} |")
    return "\n".join(lines)


def paired_table(diffs: dict, reference: str) -> str:
    keys = ("text_relative_drop", "spoken_qa_accuracy", "audio_token_accuracy")
    lines = [f"| per seed, minus {label(reference)} | relative text drop | spoken QA → text | audio-token acc |",
             "|---|---:|---:|---:|"]
    for name, d in diffs.items():
        lines.append(f"| {label(name)} | {fmt(d['text_relative_drop'], True)} | {fmt(d['spoken_qa_accuracy'])} | "
                     f"{fmt(d['audio_token_accuracy'])} |")
    del keys
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
COLORS = {"adaptive": "C0", "random": "C1", "moextend": "C2", "full_finetune": "C3", "lora": "C4",
          "by_token_modality": "C5", "phase1": "0.5"}
MARKERS = {"adaptive": "o", "random": "v", "moextend": "D", "full_finetune": "s", "lora": "P",
           "by_token_modality": "X", "phase1": "*"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(summary, scale=1.0, flip=False):
    if summary is None or summary["ci_low"] is None:
        return None
    low, high = summary["ci_low"], summary["ci_high"]
    if flip:
        low, high = -high, -low
    mean = -summary["mean"] if flip else summary["mean"]
    return [[scale * (mean - low)], [scale * (high - mean)]]


def pareto_front(points: dict) -> list[str]:
    """Names of the points no other point beats on both axes (higher is better on both)."""
    return [n for n, (x, y) in points.items()
            if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for m, (x2, y2) in points.items() if m != n)]


def pareto_plot(rows: dict, path: str, title: str, reference: dict | None = None):
    """Text kept (100 % - relative drop) against speech learned, one point per strategy: mean over seeds
    with 95 % CI bars; the Pareto-optimal ones joined."""
    plt = _pyplot()
    panels = (("spoken_qa_accuracy", "spoken question → text answer accuracy"),
              ("audio_token_accuracy", "audio-token accuracy, held-out spoken answers"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    everything = {**({"phase1": reference} if reference else {}), **rows}
    for ax, (key, ylabel) in zip(axes, panels):
        points = {}
        for i, (name, a) in enumerate(everything.items()):
            if a.get("text_relative_drop") is None or a.get(key) is None:
                continue
            x, y = 100 * (1 - a["text_relative_drop"]["mean"]), a[key]["mean"]
            points[name] = (x, y)
            ax.errorbar(x, y, xerr=_err(a["text_relative_drop"], 100, flip=True), yerr=_err(a[key]),
                        fmt=MARKERS.get(name, "o"), color=COLORS.get(name, f"C{(i + 6) % 10}"), capsize=4, markersize=9,
                        markeredgecolor="k", label=label(name))
        front = sorted(pareto_front({n: p for n, p in points.items() if n != "phase1"}).__iter__(),
                       key=lambda n: points[n][0])
        if len(front) > 1:
            ax.plot([points[n][0] for n in front], [points[n][1] for n in front], "--", color="0.6", zorder=0,
                    label="Pareto front")
        ax.axvline(100, color="0.8", lw=0.8, zorder=0)
        ax.set_xlabel("text skill kept: 100 % − relative drop of held-out accuracy (→ better)")
        ax.set_ylabel(f"{ylabel} (↑ better)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.1, y=0.12)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_plot(sweep: dict, path: str, title: str):
    """Relative text drop (mean, 95 % CI) against the speech stage's steps, per swept strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (strategy, points) in enumerate(sweep["curves"].items()):
        xs = [p["speech_steps"] for p in points]
        for key, style, what in (("text_relative_drop", "-o", "after all stages"),
                                 ("text_relative_drop_after_speech_stage", ":^", "right after the speech stage")):
            ys = [100 * p[key]["mean"] if p[key] else float("nan") for p in points]
            lows = [100 * p[key]["ci_low"] if p[key] and p[key]["ci_low"] is not None else y
                    for p, y in zip(points, ys)]
            highs = [100 * p[key]["ci_high"] if p[key] and p[key]["ci_high"] is not None else y
                     for p, y in zip(points, ys)]
            color = COLORS.get(strategy, f"C{i}")
            ax.plot(xs, ys, style, color=color, label=f"{label(strategy)}, {what}")
            ax.fill_between(xs, lows, highs, color=color, alpha=0.15 if key == "text_relative_drop" else 0.07)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("speech stage steps (text and joint stages scale with it)")
    ax.set_ylabel("relative drop of held-out text-skill accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default=None, help="comma-separated reported seeds (default 0,1,2,3,4)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help=f"subset of {','.join(STRATEGIES)}, or 'none'")
    parser.add_argument("--ablations", action="store_true", help="also run the ablations of the adaptive strategy")
    parser.add_argument("--control-sweep", action="store_true",
                        help="full fine-tuning's text drop against speech steps (validation split, sweep seeds)")
    parser.add_argument("--sweep-steps", default=None, help=f"speech-stage steps to sweep (default {DEFAULT_SWEEP})")
    parser.add_argument("--sweep-seeds", default=None, help=f"seeds of the sweep, kept apart (default {SWEEP_SEEDS})")
    parser.add_argument("--sweep-strategies", default="full_finetune", help="strategies swept (default full_finetune)")
    parser.add_argument("--speech-steps", type=int, default=None, help="speech stage steps (text/joint stages scale)")
    parser.add_argument("--base-steps", type=int, default=None, help="steps teaching the original LLM")
    parser.add_argument("--judge-asr", default=None,
                        help="score spoken answers through this ASR (a Whisper checkpoint folder, or 'own')")
    parser.add_argument("--original-llm-dir", default=None,
                        help="reuse the original LLM saved here by an earlier run with the same settings (or save it)")
    parser.add_argument("--phase1-dir", default=None,
                        help="reuse the phase-1 models saved here by an earlier run with the same settings "
                             "(or save them)")
    parser.add_argument("--workers", type=int, default=None, help="seed worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and steps: checks that the script runs (about a minute)")
    parser.add_argument("--json", default=None,
                        help="write every figure here (default: benchmarks/results/retention*.json)")
    parser.add_argument("--plot", default=None,
                        help="the Pareto plot (other plots get suffixes; default next to the JSON)")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="only redraw tables and plots from a --json file")
    args = parser.parse_args(argv)

    def ints(text, what):
        try:
            values = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            parser.error(f"{what} must be comma-separated integers, got {text!r}")
        if not values:
            parser.error(f"{what} is empty")
        return values

    settings = Settings(**(QUICK if args.quick else {}))
    if args.seeds is not None:
        settings.seeds = ints(args.seeds, "--seeds")
    strategies = ([] if args.strategies.strip() == "none" else
                  [s.strip() for s in args.strategies.split(",") if s.strip()])
    sweep_strategies = [s.strip() for s in args.sweep_strategies.split(",") if s.strip()]
    for given, what in ((strategies, "--strategies"), (sweep_strategies, "--sweep-strategies")):
        unknown = sorted(set(given) - set(STRATEGIES))
        if unknown:
            parser.error(f"{what}: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    settings.strategies = strategies
    for name, value in (("speech_steps", args.speech_steps), ("base_steps", args.base_steps), ("workers", args.workers),
                        ("threads", args.threads)):
        if value is not None:
            if value < (0 if name == "speech_steps" else 1):
                parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(settings, name, value)
    settings.judge_asr = args.judge_asr
    if len(settings.seeds) < 2 and (strategies or args.ablations):
        parser.error("a 95 % interval needs at least two --seeds")
    if not (strategies or args.ablations or args.control_sweep or args.replot):
        parser.error("nothing to run: give --strategies, --ablations or --control-sweep")
    args.sweep_steps = (ints(args.sweep_steps, "--sweep-steps") if args.sweep_steps else
                        QUICK_SWEEP if args.quick else DEFAULT_SWEEP)
    args.sweep_seeds = ints(args.sweep_seeds, "--sweep-seeds") if args.sweep_seeds else (
        settings.seeds if args.quick else SWEEP_SEEDS)
    args.sweep_strategies = sweep_strategies
    if set(args.sweep_seeds) & set(settings.seeds) and not args.quick and args.control_sweep and strategies:
        parser.error(f"--sweep-seeds {args.sweep_seeds} must be kept apart from the reported --seeds {settings.seeds}")
    if args.json is None and not args.quick:
        stem = "retention" if strategies else "retention_" + "_".join(
            n for n, on in (("control_sweep", args.control_sweep), ("ablations", args.ablations)) if on)
        args.json = os.path.join(RESULTS, stem + ".json")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a folder; give a file path")
    for path in (args.json, args.plot, args.phase1_dir, args.original_llm_dir):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"the folder of {path} does not exist")
    return args, settings


def plot_paths(args) -> dict:
    if args.plot:
        base = os.path.splitext(args.plot)[0]
    elif args.json:
        base = os.path.splitext(args.json)[0]
    else:
        base = os.path.join(tempfile.mkdtemp(prefix="retention_plots_"), "retention")
    return {"strategies": base + ".png", "control_sweep": base + "_control_sweep.png",
            "ablations": base + "_ablations.png"}


def title(payload: dict, what: str) -> str:
    s = payload["settings"]
    steps = Settings(**s).stage_steps()
    return (f"{what}: tiny {s['family']} MoE ({s['num_experts']} experts, top-{s['top_k']}, "
            f"k = {s['num_speech_experts']}), {len(s['seeds'])} seeds, speech {steps['speech']} + text {steps['text']} "
            f"+ joint {steps['joint']} steps per "
            f"strategy;\n{s['kinds_test']} held-out text questions (original accuracy "
            f"{payload['original_llm']['kinds_accuracy']['test']:.3f}); bars: 95 % t-intervals over seeds")


def report(payload: dict, paths: dict):
    """Print the tables and draw the plots of whatever sections `payload` holds."""
    original = {"kinds_accuracy": payload["original_llm"]["kinds_accuracy"][payload["settings"]["eval_split"]],
                "world_text_accuracy": payload["original_llm"]["world_text_accuracy"]}
    if payload.get("strategies"):
        print("\n" + markdown_table(payload["strategies"], original))
        if payload.get("paired_vs_adaptive"):
            print("\n" + paired_table(payload["paired_vs_adaptive"], "adaptive"))
        pareto_plot(payload["strategies"], paths["strategies"], title(payload, "Text kept vs speech learned"),
                    reference=payload.get("phase1"))
        log(f"plot: {paths['strategies']}")
    if payload.get("ablations"):
        adaptive = payload.get("strategies", {}).get("adaptive")
        rows = {**({"adaptive": adaptive} if adaptive else {}),
                **payload["ablations"]}
        print("\n" + markdown_table(rows, original))
        pareto_plot(rows, paths["ablations"], title(payload, "Ablations of adaptive assignment"),
                    reference=payload.get("phase1"))
        log(f"plot: {paths['ablations']}")
    sweep = payload.get("control_sweep")
    if sweep:
        print(f"\nControl sweep ({sweep['split']} split, seeds {sweep['seeds']}):")
        print("| strategy | speech steps | relative text drop (95 % CI) | drop after the speech stage "
              "| spoken QA → text |")
        print("|---|---:|---:|---:|---:|")
        for strategy, points in sweep["curves"].items():
            for p in points:
                print(f"| {label(strategy)} | {p['speech_steps']} | {fmt(p['text_relative_drop'], True)} | "
                      f"{fmt(p['text_relative_drop_after_speech_stage'], True)} | {fmt(p['spoken_qa_accuracy'])} |")
        print("smallest speech steps whose full fine-tuning drop excludes 0: "
              f"{sweep['smallest_steps_with_ci_excluding_zero']}")
        sweep_plot(sweep, paths["control_sweep"], f"Control sweep: {sweep['split']} split, seeds {sweep['seeds']}")
        log(f"plot: {paths['control_sweep']}")


def main(argv=None):
    args, settings = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            payload = json.load(f)
        args.json = args.json or args.replot
        return report(payload, plot_paths(args))

    import torch

    sys.path.insert(0, HERE)
    from _common import machine_info

    quiet()
    torch.set_num_threads(settings.threads)  # tiny ops: more intra-op threads only add OpenMP stalls
    info = machine_info(settings.threads, mem_total=True)
    log(f"machine: {info['cpu_model']}, {info['logical_cpus']} CPUs, load {info['loadavg_start']}; "
        f"{settings.workers} worker(s) x {settings.threads} thread(s)")
    world = build_world(settings)
    log(f"data: {len(world.kinds['train'])} / {len(world.kinds['validation'])} / {len(world.kinds['test'])} text-skill "
        f"questions (train / validation / test); speech data overlap {world.overlap}")

    with tempfile.TemporaryDirectory(prefix="deeptalk_retention_") as workdir:
        original_dir = args.original_llm_dir or os.path.join(workdir, "original_llm")
        source, base_record = load_or_train_original(world, settings, original_dir, workdir)
        original = {"kinds_accuracy": {split: kinds_accuracy(source, world, split)[0]
                                       for split in ("test", "validation")},
                    "kinds_accuracy_per_template": kinds_accuracy(source, world, "test")[1],
                    "world_text_accuracy": evaluate(source, world, settings, text_only=True)["world_text_accuracy"],
                    **base_record}
        log(f"original LLM: text skill {original['kinds_accuracy']['test']:.3f} (test), "
            f"{original['kinds_accuracy']['validation']:.3f} (validation), per template "
            f"{original['kinds_accuracy_per_template']}; world text QA {original['world_text_accuracy']:.3f}")
        del source

        groups = []
        branches = [strategy_branch(s) for s in settings.strategies]
        branches += ablation_branches(settings) if args.ablations else []
        if branches:
            groups.append({"name": "main", "settings": asdict(settings), "seeds": settings.seeds, "branches": branches,
                           "split": settings.eval_split})
        if args.control_sweep:
            sweep_settings = replace(settings, eval_split="validation", spoken_eval_splits=["validation"])
            groups.append({"name": "sweep", "settings": asdict(sweep_settings), "seeds": args.sweep_seeds,
                           "split": "validation",
                           "branches": [replace(strategy_branch(s), name=f"sweep_{s}_{steps}", speech_steps=steps)
                                        for s in args.sweep_strategies for steps in args.sweep_steps]})
        log(f"strategies {settings.strategies}, ablations {args.ablations}, "
            f"sweep {args.sweep_steps if args.control_sweep else 'off'}; stage steps {settings.stage_steps()}")
        runs = run_all(groups, original_dir, original, workdir, settings.workers, args.phase1_dir)

    main_runs, sweep_runs = runs.get("main", {}), runs.get("sweep", {})
    payload = {"settings": asdict(settings), "machine": info, "data": world.overlap | {
        "kinds_questions": {split: len(rows) for split, rows in world.kinds.items()},
        "spoken_eval_questions": sum(len(world.data.records["spoken_qa"][s]) for s in settings.spoken_eval_splits)},
        "original_llm": original}
    if main_runs:
        payload["phase1"] = aggregate(main_runs, "phase1")
        payload["strategies"] = {s: aggregate(main_runs, s) for s in settings.strategies}
        if "adaptive" in settings.strategies:
            payload["paired_vs_adaptive"] = {s: paired(main_runs, s, "adaptive")
                                             for s in settings.strategies if s != "adaptive"}
        if args.ablations:
            payload["ablations"] = {b.name: aggregate(main_runs, b.name) for b in ablation_branches(settings)}
            payload["paired_ablations_vs_adaptive"] = {
                b.name: paired(main_runs, b.name, "adaptive")
                for b in ablation_branches(settings) if "adaptive" in settings.strategies}
    if args.control_sweep:
        curves = {s: [{"speech_steps": steps, "stage_steps": settings.stage_steps(steps),
                       **{k: v for k, v in aggregate(sweep_runs, f"sweep_{s}_{steps}").items() if k in METRICS}}
                      for steps in args.sweep_steps] for s in args.sweep_strategies}
        visible = [p["speech_steps"] for p in curves.get("full_finetune", [])
                   if p["text_relative_drop"] and excludes_zero(p["text_relative_drop"])
                   and p["text_relative_drop"]["ci_low"] > 0]
        payload["control_sweep"] = {"split": "validation", "seeds": args.sweep_seeds, "curves": curves,
                                    "phase1": aggregate(sweep_runs, "phase1"),
                                    "smallest_steps_with_ci_excluding_zero": min(visible) if visible else None}
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    payload["cpu_seconds"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)  # this process and its workers
    payload["runs"] = {"main": {str(s): r for s, r in main_runs.items()},
                       "sweep": {str(s): r for s, r in sweep_runs.items()}}
    payload["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload["wall_s"] = round(time.perf_counter() - _START, 1)
    report(payload, plot_paths(args))
    if args.json:
        from deeptalk.saving import atomic_write_json

        atomic_write_json(args.json, payload)
        log(f"json: {args.json}")
    log(f"total wall time {payload['wall_s']:.0f}s, CPU time {payload['cpu_seconds']:.0f}s")
    return payload


def load_or_train_original(world: World, settings: Settings, directory: str, workdir: str):
    """The original LLM saved in `directory` by a run with the same settings, or a newly trained one
    saved there (safetensors) for the seed workers."""
    from transformers import AutoModelForCausalLM

    keys = ("family", "hidden_size", "num_hidden_layers", "num_experts", "top_k", "head_dim", "tokenizer_vocab_size",
            "base_steps", "base_lr", "base_seed", "kinds_templates", "kinds_train", "kinds_validation", "kinds_test",
            "kind_fact_repeats",
            "world_repeats", "batch_size", "corpus_limit")
    wanted = {k: getattr(settings, k) for k in keys}
    record_path = os.path.join(directory, "retention_original_llm.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            saved = json.load(f)
        if saved["settings"] == wanted:
            log(f"original LLM: reusing {directory}")
            return AutoModelForCausalLM.from_pretrained(directory).eval(), saved["record"]
        log(f"original LLM in {directory} was trained with other settings; training a new one")
    log(f"teaching the original LLM ({settings.base_steps} steps)")
    source, record = train_original_llm(world, settings, workdir)
    log(f"original LLM taught: loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}, {record['seconds']:.0f}s, "
        f"{record['parameters'] / 1e6:.2f}M parameters")
    from deeptalk.saving import atomic_write_json

    source.save_pretrained(directory)
    atomic_write_json(record_path, {"settings": wanted, "record": record})
    return source, record


if __name__ == "__main__":
    main()
