"""`deeptalk quickstart`: the whole DeepTalk recipe, offline, on a CPU, in minutes.

1. build a tiny text MoE LLM (DeepSeek-V2 family, as in the paper) and teach it the text QA of the
   shipped corpus -- this is "the original LLM";
2. convert it to DeepTalk and give it ears (a tiny Whisper encoder + adapter) and a voice (the
   offline MelVQ codec's tokens);
3. phase 1 alignment (ASR) -> modality-load assignment -> phase 2a speech experts -> phase 2b text
   experts -> phase 3 joint;
4. report the paper's metrics in miniature: text QA accuracy of the original LLM vs the final model
   (the relative drop), spoken question -> text answer accuracy, audio-token accuracy on held-out
   spoken answers; write one spoken answer as a WAV and the modality-load heatmap.

Everything is small so it runs on 2 cores in well under 10 minutes; the numbers show the mechanics,
not the paper's scale. On a GPU, point the same pipeline at real checkpoints with `--base-model`,
`--codec` and `--audio-encoder`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

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
    top_k: int = 4
    num_speech_experts: int = 4
    text_pretrain_steps: int = 1500
    text_pretrain_lr: float = 3e-3
    # Phase 1 has to teach a *random* encoder to hear (no Whisper weights offline): 900 steps on
    # ASR + spoken questions with the encoder and all embeddings training; ASR rehearsal in phase 3
    # keeps that skill. With 300 steps and a frozen encoder the model answered "no" to every spoken
    # question (ASR WER 1.0); with these, ASR WER 0.60-0.76 and varied answers (README, Quickstart).
    align_steps: int | None = 900  # None = the tiny_cpu recipe's max_steps
    align_tasks: tuple[str, ...] = ("asr", "spoken_qa_text")
    train_audio_encoder: bool | None = None  # None: train it when it is random (no --audio-encoder)
    speech_steps: int | None = None
    text_steps: int | None = 150
    joint_steps: int | None = 400
    joint_tasks: tuple[str, ...] = ("spoken_qa_speech", "text_qa", "asr")
    batch_size: int = 16
    assignment_batches: int = 8  # batches of each modality for measuring the modality load
    audio_adapter_stride: int = 4  # Whisper frames per LLM position (the authors' code: 1)
    seed: int = 0
    base_model: str | None = None  # a transformers MoE LLM (Hub id or folder) instead of the tiny one
    codec: str | None = None  # a codec folder / Hub id (e.g. hubertsiuzdak/snac_24khz) instead of MelVQ
    audio_encoder: str | None = None  # a Whisper checkpoint (e.g. openai/whisper-medium) for the encoder
    extra: dict = field(default_factory=dict)


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


def _train_original_llm(source, processor, data, settings: QuickstartSettings, log):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=os.path.join(settings.output_dir, "original_llm_training"), max_steps=settings.text_pretrain_steps,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.text_pretrain_lr, lr_scheduler_type="cosine",
        warmup_steps=0.03, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
        logging_steps=50, seed=settings.seed, remove_unused_columns=False, disable_tqdm=False,
    )
    Trainer(model=source, args=args, train_dataset=data.text_qa["train"], data_collator=TextStreamCollator(processor)).train()
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
    from transformers import AutoModelForCausalLM

    import deeptalk
    from .evaluation.metrics import answer_accuracy, audio_token_accuracy, relative_drop, spoken_qa_text_accuracy, text_qa_accuracy
    from .generation import generate_speech_answer
    from .processing.processing_deeptalk import DeepTalkDataCollator
    from .recipes.demo_data import build_demo_data, build_demo_processor, build_demo_tokenizer, fit_demo_codec
    from .tiny import tiny_text_moe_config, tiny_whisper_config
    from .trainers import DeepTalkAlignmentConfig, DeepTalkAlignmentTrainer, DeepTalkExpertsConfig, DeepTalkExpertsTrainer
    from .trainers.assignment import assign_speech_experts, measure_modality_load, save_load_report
    from .trainers.joint import DeepTalkJointConfig, DeepTalkJointTrainer

    settings = settings or QuickstartSettings()
    out = settings.output_dir
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
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
    data = build_demo_data(processor, codec)
    collator = DeepTalkDataCollator(processor)
    log(f"encoded the demo corpus: { {k: v.get('train') for k, v in data.sizes().items()} } training conversations")
    timed("data")

    # ---- the original LLM ------------------------------------------------------------------------
    if settings.base_model:
        source = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype="auto")
        log(f"loaded the original LLM {settings.base_model}")
    else:
        config = tiny_text_moe_config(settings.family, vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
                                      num_hidden_layers=settings.num_hidden_layers, num_experts=settings.num_experts,
                                      top_k=settings.top_k, pad_token_id=processor.layout.pad_t_id,
                                      eos_token_id=processor.layout.eot_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(settings.seed)  # the same original LLM whatever ran before
        source = AutoModelForCausalLM.from_config(config)
        source = _train_original_llm(source, processor, data, settings, log)
    text_test = data.test_records["text_qa"]
    original_text_accuracy = text_qa_accuracy(source, processor, text_test)
    log(f"original LLM text QA accuracy: {original_text_accuracy:.3f}")
    timed("original_llm")

    # ---- conversion ------------------------------------------------------------------------------
    model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, num_speech_experts=settings.num_speech_experts)
    audio_config = tiny_whisper_config(d_model=64, encoder_layers=2)
    if settings.audio_encoder:
        from transformers import WhisperConfig

        audio_config = WhisperConfig.from_pretrained(settings.audio_encoder)
    model.add_speech(audio_config=audio_config, **processor.model_speech_kwargs())
    if settings.audio_encoder:
        from transformers import WhisperModel

        encoder = WhisperModel.from_pretrained(settings.audio_encoder).get_encoder()
        model.model.audio_encoder.load_state_dict(encoder.state_dict())
    else:
        make_random_encoder_audible(model.model.audio_encoder)
    converted_text_accuracy = text_qa_accuracy(model, processor, text_test)
    log(f"converted to DeepTalk (text QA accuracy {converted_text_accuracy:.3f}, same LLM)")
    timed("convert")

    def train(trainer_class, config_class, recipe, steps, dataset, name, **overrides):
        args = config_class(**{**_phase_args(recipe, settings, steps, os.path.join(out, name)), **overrides})
        kwargs = {"processing_class": processor} if trainer_class is DeepTalkJointTrainer else {}
        trainer = trainer_class(model, args, train_dataset=dataset, data_collator=collator, **kwargs)
        result = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [result.training_loss]
        log(f"{name}: {trainer.state.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        model.eval()
        return trainer

    # ---- phase 1 ---------------------------------------------------------------------------------
    # The paper freezes a pre-trained Whisper; the offline run's encoder is random, so it trains here
    # (with all embeddings), on ASR and on spoken questions answered in text.
    train_encoder = settings.audio_encoder is None if settings.train_audio_encoder is None else settings.train_audio_encoder
    align_overrides = {"train_audio_encoder": True, "train_embeddings": "all"} if train_encoder else {}
    phase_records = [train(DeepTalkAlignmentTrainer, DeepTalkAlignmentConfig, "align", settings.align_steps,
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
                               data.spoken_qa_speech["train"], "phase2a_speech_experts"))
    phase_records.append(train(DeepTalkExpertsTrainer, DeepTalkExpertsConfig, "experts_text", settings.text_steps,
                               data.text_qa["train"], "phase2b_text_experts"))
    timed("phase2")
    phase_records.append(train(DeepTalkJointTrainer, DeepTalkJointConfig, "joint", settings.joint_steps,
                               data.tasks_dataset(settings.joint_tasks, "train", seed=settings.seed), "phase3_joint"))
    timed("phase3")

    # ---- evaluation ------------------------------------------------------------------------------
    final_text_accuracy = text_qa_accuracy(model, processor, text_test)
    spoken_accuracy = spoken_qa_text_accuracy(model, processor, data.test_records["spoken_qa"])
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
        "text_relative_drop": relative_drop(original_text_accuracy, final_text_accuracy) if original_text_accuracy else None,
        "spoken_qa_text_accuracy": spoken_accuracy,
        "audio_token_accuracy": audio_accuracy,
        "spoken_answer": {"question": record["question_text"], "reference": record["answer_text"], "text": answer.text,
                          "text_correct": answer_accuracy([answer.text], [record["answer_text"]]) == 1.0, "wav": wav_path},
        "speech_experts": speech_experts,
        "files": {"model": os.path.join(out, "model"), "codec": os.path.join(out, "model", "codec"), **report},
        "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print_summary(summary, settings)
    return summary


def print_summary(summary: dict, settings: QuickstartSettings):
    drop = summary["text_relative_drop"]
    rows = [
        ("text QA accuracy, original LLM", f"{summary['original_text_qa_accuracy']:.3f}"),
        ("text QA accuracy, DeepTalk after all phases", f"{summary['final_text_qa_accuracy']:.3f}"),
        ("relative text drop (paper: 5.45% for DeepOmni)", "n/a" if drop is None else f"{100 * drop:.1f}%"),
        ("spoken question -> text answer accuracy", f"{summary['spoken_qa_text_accuracy']:.3f}"),
        ("audio-token accuracy on held-out spoken answers", f"{summary['audio_token_accuracy']:.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 12))
    print("DeepTalk quickstart (tiny models, shipped espeak-ng corpus, offline MelVQ codec)")
    print("=" * (width + 12))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>8}")
    spoken = summary["spoken_answer"]
    print(f"\nspoken answer to \"{spoken['question']}\": text \"{spoken['text']}\" (reference \"{spoken['reference']}\"), "
          f"audio {spoken['wav'] or '(no audio frames generated)'}")
    files = summary["files"]
    print(f"model + processor: {files['model']}\ncodec: {files['codec']}\nmodality load: {files.get('json')} {files.get('png') or ''}")
    print(f"summary: {os.path.join(settings.output_dir, 'summary.json')}  (total {summary['total_s']} s)")
    print("\nOn a GPU, the same pipeline on real checkpoints:\n"
          "  deeptalk quickstart --base-model deepseek-ai/DeepSeek-V2-Lite-Chat --codec hubertsiuzdak/snac_24khz "
          "--audio-encoder openai/whisper-medium\n"
          "and the paper's recipes: deeptalk train <phase> --recipe deepseek_v2_lite/<phase> ...")
