"""Phase trainers with the real transformers/TRL Trainer on a tiny speech model and the shipped corpus."""

import json

import pytest
import torch
from conftest import convert
from datasets import Dataset

from deeptalk import DeepTalkDataCollator, DeepTalkProcessor
from deeptalk.data import load_demo_corpus
from deeptalk.processing.tokenizer import train_demo_tokenizer
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config
from deeptalk.trainers import (
    DeepTalkAlignmentConfig,
    DeepTalkAlignmentTrainer,
    DeepTalkExpertsConfig,
    DeepTalkExpertsTrainer,
)
from deeptalk.trainers.joint import DeepTalkJointConfig, DeepTalkJointTrainer

STREAMS, CODEBOOK = 3, 16
COMMON = dict(use_cpu=True, per_device_train_batch_size=4, logging_steps=1, report_to="none", save_strategy="no",
              seed=0, data_seed=0, dataloader_num_workers=0)


@pytest.fixture(scope="module")
def setup():
    corpus = load_demo_corpus("spoken_qa")
    tokenizer = train_demo_tokenizer([r["question_text"] + " " + r["answer_text"] for r in corpus["train"]])
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, STREAMS, CODEBOOK)
    gen = torch.Generator().manual_seed(0)
    conversations = [
        [{"role": "user", "content": [{"type": "audio", "audio": r["question_audio"]}]},
         {"role": "assistant", "content": [
             {"type": "text", "text": r["answer_text"]},
             {"type": "audio", "audio_codes": torch.randint(0, CODEBOOK, (STREAMS, 4), generator=gen)},
         ]}]
        for r in corpus["train"].select(range(16))
    ]
    dataset = Dataset.from_dict(processor.encode_batch(conversations))
    return processor, dataset, DeepTalkDataCollator(processor)


def speech_model(processor, speech_experts=(1, 5)):
    whisper = tiny_whisper_config()
    model = convert(tiny_text_moe("deepseek_v2", vocab_size=len(processor.tokenizer)), experts=speech_experts)
    return model.add_speech(audio_config=whisper, **processor.model_speech_kwargs())


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def optimizer_numel(trainer):
    return sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])


def test_speech_experts_phase_trains_only_the_speech_bank(setup, tmp_path):
    processor, dataset, collator = setup
    model = speech_model(processor)
    frozen_before = {n: p for n, p in snapshot(model).items() if "speech_bank" not in n and "embed" not in n
                     and "lm_head" not in n and "layers.0." not in n}
    args = DeepTalkExpertsConfig(output_dir=str(tmp_path), modality="speech", max_steps=3, **COMMON)
    trainer = DeepTalkExpertsTrainer(model, args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    # the optimizer holds exactly the trainable groups: speech bank, dense layer 0, embeddings
    assert set(trainer.trainable_groups) == {"speech_bank", "dense_layers", "embeddings"}
    assert optimizer_numel(trainer) == sum(trainer.trainable_groups.values())
    bank = sum(b.speech_bank.gate_up_proj.numel() + b.speech_bank.down_proj.numel() for b in model.moe_blocks())
    assert trainer.trainable_groups["speech_bank"] == bank
    after = snapshot(model)
    for name, before in frozen_before.items():  # text bank, router, MoE attention, Whisper, adapter: bit-identical
        assert torch.equal(before, after[name]), name
    assert not torch.equal(
        model.moe_blocks()[0].speech_bank.gate_up_proj, speech_model(processor).moe_blocks()[0].speech_bank.gate_up_proj
    )
    logs = trainer.state.log_history[0]
    assert logs["load/text_tokens_to_speech_experts"] == 1.0  # speech_only routing: every token to speech experts
    assert {"loss_text", "loss_audio_1", "loss_audio_3", "aux_loss"} <= set(logs)


def test_the_card_counts_each_phases_own_trainable_parameters(setup, tmp_path):
    """Phases run one after another on one model object: each card line counts what that phase trained."""
    processor, dataset, collator = setup
    model = speech_model(processor)
    phases = [DeepTalkExpertsTrainer(model, DeepTalkExpertsConfig(output_dir=str(tmp_path / m), modality=m, max_steps=1,
                                                                  **COMMON),
                                     train_dataset=dataset, data_collator=collator) for m in ("speech", "text")]
    counts = [trainer.phase_summary()["trainable_parameters"] for trainer in phases]
    assert counts == [sum(trainer.trainable_groups.values()) for trainer in phases] and counts[0] != counts[1]
    assert f"{counts[0]:,} of" in phases[0].model_card_section()


def test_text_experts_phase_keeps_the_speech_bank(setup, tmp_path):
    processor, dataset, collator = setup
    model = speech_model(processor)
    speech_before = [b.speech_bank.gate_up_proj.detach().clone() for b in model.moe_blocks()]
    args = DeepTalkExpertsConfig(output_dir=str(tmp_path), modality="text", learning_rate=2e-5, max_steps=2,
                                 train_router=True, train_embeddings="none", **COMMON)
    trainer = DeepTalkExpertsTrainer(model, args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    assert set(trainer.trainable_groups) == {"text_bank", "router", "dense_layers"}
    assert all(torch.equal(a, b.speech_bank.gate_up_proj) for a, b in zip(speech_before, model.moe_blocks()))
    assert trainer.state.log_history[0]["load/speech_tokens_to_speech_experts"] == 0.0


def test_alignment_trains_adapter_and_audio_rows_only(setup, tmp_path):
    processor, dataset, collator = setup
    model = speech_model(processor)
    before = snapshot(model)
    args = DeepTalkAlignmentConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-3, **COMMON)
    trainer = DeepTalkAlignmentTrainer(model, args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    after = snapshot(model)
    for name in before:  # the text rows (`weight`) stay; the audio rows (`audio_weight`) and the adapter learn
        if "audio_adapter" in name or name.endswith("audio_weight"):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    with pytest.raises(ValueError, match="weight_decay must be 0"):
        DeepTalkAlignmentTrainer(model, DeepTalkAlignmentConfig(output_dir=str(tmp_path), weight_decay=0.1, **COMMON),
                                 train_dataset=dataset, data_collator=collator)


def test_ctc_loss_type_trains_the_ctc_adapter_alone_without_running_the_llm(setup, tmp_path):
    processor, _, collator = setup
    corpus = load_demo_corpus("spoken_qa")["train"].select(range(8))
    conversations = [[{"role": "user", "content": [{"type": "audio", "audio": r["question_audio"],
                                                     "transcript": r["question_text"]}]},
                      {"role": "assistant", "content": r["answer_text"]}] for r in corpus]
    dataset = Dataset.from_dict(processor.encode_batch(conversations))
    model = convert(tiny_text_moe("deepseek_v2", vocab_size=len(processor.tokenizer)), experts=(1, 5))
    model.add_speech(audio_config=tiny_whisper_config(), audio_adapter="ctc", **processor.model_speech_kwargs())

    # the loss is the CTC adapter's, as the full forward computes it
    batch = collator([dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        full = model(**batch)
        alone = model(**batch, audio_ctc_loss_only=True)
    assert alone.logits is None and torch.equal(alone.loss, full.audio_ctc_loss)
    untranscribed = {k: v for k, v in batch.items() if k != "audio_transcript_ids"}
    with pytest.raises(ValueError, match="needs input_features and audio_transcript_ids"):
        model(**untranscribed, audio_ctc_loss_only=True)
    with pytest.raises(ValueError, match="needs the CTC adapter .* not 'stack'"):
        speech_model(processor)(**untranscribed, audio_ctc_loss_only=True)

    before = snapshot(model)
    layer_calls = []
    model.model.layers[0].register_forward_hook(lambda *_: layer_calls.append(1))
    args = DeepTalkAlignmentConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-3, loss_type="ctc", **COMMON)
    trainer = DeepTalkAlignmentTrainer(model, args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    after = snapshot(model)
    assert layer_calls == []
    for name in before:
        assert torch.equal(before[name], after[name]) != ("audio_adapter" in name), name
    assert any("loss_audio_ctc" in entry for entry in trainer.state.log_history)
    assert trainer.phase_summary()["loss_type"] == "ctc"  # what deeptalk_phases.json records

    with pytest.raises(ValueError, match="get no gradient: set train_embeddings='none'"):
        DeepTalkAlignmentTrainer(model, DeepTalkAlignmentConfig(output_dir=str(tmp_path), loss_type="ctc",
                                                                train_embeddings="audio_rows", **COMMON),
                                 train_dataset=dataset, data_collator=collator)
    with pytest.raises(ValueError, match=r"loss_type='mse': choose one of \('lm', 'ctc'\)"):
        DeepTalkAlignmentTrainer(model, DeepTalkAlignmentConfig(output_dir=str(tmp_path), loss_type="mse", **COMMON),
                                 train_dataset=dataset, data_collator=collator)
    with pytest.raises(ValueError, match="the model's adapter is 'stack'"):
        DeepTalkAlignmentTrainer(speech_model(processor), args, train_dataset=dataset, data_collator=collator)


def test_joint_phase_is_an_sft_trainer_that_keeps_whisper_and_adapter(setup, tmp_path):
    from trl import SFTTrainer

    processor, dataset, collator = setup
    model = speech_model(processor)
    frozen = {n: p.clone() for n, p in snapshot(model).items() if "audio_encoder" in n or "audio_adapter" in n}
    args = DeepTalkJointConfig(output_dir=str(tmp_path), max_steps=2, **COMMON)
    trainer = DeepTalkJointTrainer(
        model, args, train_dataset=dataset, data_collator=collator, processing_class=processor
    )
    assert isinstance(trainer, SFTTrainer)
    trainer.train()
    assert {"text_bank", "speech_bank", "router"} <= set(trainer.trainable_groups)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in frozen.items())
    trainer.save_model(str(tmp_path / "final"))
    phases = json.loads((tmp_path / "final" / "deeptalk_phases.json").read_text())
    assert phases[-1]["phase"] == "joint" and "### Phase: joint" in phases[-1]["card"]


def test_experts_phase_needs_a_speech_map(setup, tmp_path):
    processor, dataset, collator = setup
    with pytest.raises(ValueError, match="needs a speech-expert map"):
        DeepTalkExpertsTrainer(speech_model(processor, speech_experts=None),
                               DeepTalkExpertsConfig(output_dir=str(tmp_path), **COMMON), train_dataset=dataset)
    with pytest.raises(ValueError, match="modality must be one of"):
        DeepTalkExpertsTrainer(speech_model(processor),
                               DeepTalkExpertsConfig(output_dir=str(tmp_path), modality="vision", **COMMON),
                               train_dataset=dataset)


def test_resume_from_checkpoint_gives_the_same_loss_curve(setup, tmp_path):
    processor, dataset, collator = setup

    def run(output_dir, resume=None, steps=4):
        torch.manual_seed(0)
        args = DeepTalkExpertsConfig(output_dir=str(output_dir), modality="speech", max_steps=steps,
                                     **{**COMMON, "save_strategy": "steps"}, save_steps=2)
        trainer = DeepTalkExpertsTrainer(speech_model(processor), args, train_dataset=dataset, data_collator=collator)
        trainer.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert len(straight) == 4 and len(resumed) == 4  # the resumed history holds the checkpoint's 2 steps + 2 new
    assert resumed[2:] == straight[2:]


def test_lora_on_the_speech_bank_only(setup, tmp_path):
    from peft import LoraConfig

    processor, dataset, collator = setup
    model = speech_model(processor)
    before = snapshot(model)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=[],
                      target_parameters=["speech_bank.gate_up_proj", "speech_bank.down_proj"])
    args = DeepTalkExpertsConfig(output_dir=str(tmp_path), modality="speech", max_steps=2, learning_rate=1e-2, **COMMON)
    trainer = DeepTalkExpertsTrainer(model, args, train_dataset=dataset, data_collator=collator, peft_config=lora)
    trainer.train()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "speech_bank" in n for n in trained)
    assert optimizer_numel(trainer) == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    merged = trainer.model.merge_and_unload()
    after = snapshot(merged)
    for name, value in before.items():
        if "speech_bank" in name:
            assert not torch.equal(value, after[name]), name
        else:
            assert torch.equal(value, after[name]), name


def test_lora_model_runs_inference_and_phase_trainers_accept_peft_models(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    processor, dataset, collator = setup
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=[],
                      target_parameters=["speech_bank.gate_up_proj", "speech_bank.down_proj"])
    peft_model = get_peft_model(speech_model(processor), lora)
    batch = collator([dataset[i] for i in range(2)])
    with torch.no_grad():  # free-mode inference with an unmerged adapter on a bank
        assert torch.isfinite(peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits).all()
    args = DeepTalkExpertsConfig(output_dir=str(tmp_path), modality="speech", max_steps=1, **COMMON)
    DeepTalkExpertsTrainer(peft_model, args, train_dataset=dataset, data_collator=collator).train()


def test_model_can_be_deep_copied_after_a_training_forward(setup):
    import copy

    processor, dataset, collator = setup
    model = speech_model(processor)
    batch = collator([dataset[0], dataset[1]])
    model(**batch, output_router_logits=True).loss.backward()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.allclose(twin(**batch).loss, model(**batch).loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_joint_and_dpo_configs_default_to_fp32_on_a_cpu_machine(tmp_path):
    from deeptalk.trainers.dpo import DeepTalkSpeechDPOConfig
    from deeptalk.trainers.joint import DeepTalkJointConfig

    assert DeepTalkJointConfig(output_dir=str(tmp_path)).bf16 is False  # TRL would default it on and fail
    assert DeepTalkSpeechDPOConfig(output_dir=str(tmp_path)).bf16 is False
