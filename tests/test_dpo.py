"""Phase 4: per-stream speech DPO as a TRL DPOTrainer subclass, and the WER ranking."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_trainers import COMMON, setup, speech_model  # noqa: F401  (module fixture + builders)
from trl import DPOTrainer

from deeptalk.data import load_demo_corpus
from deeptalk.modeling_deeptalk import stream_token_log_probs
from deeptalk.trainers.dpo import (
    DeepTalkSpeechDPOConfig,
    DeepTalkSpeechDPOTrainer,
    encode_preference_pairs,
    rank_by_wer,
)


def sequence_logps(model, logits, labels):
    return stream_token_log_probs(logits, labels, model.config.layout)[0].sum(-1)


def _pairs(processor, n=8):
    corpus = load_demo_corpus("spoken_qa")["train"].select(range(n))
    gen = torch.Generator().manual_seed(1)
    prompts = [[{"role": "user", "content": [{"type": "audio", "audio": r["question_audio"]}]}] for r in corpus]
    turns = lambda: [{"role": "assistant", "content": [{"type": "text", "text": r["answer_text"]},  # noqa: E731
                      {"type": "audio", "audio_codes": torch.randint(0, 16, (3, 4), generator=gen)}]} for r in corpus]
    return Dataset.from_dict(encode_preference_pairs(processor, prompts, turns(), turns()))


def test_speech_dpo_trains_and_moves_the_chosen_margin(setup, tmp_path):  # noqa: F811
    processor, _, _ = setup
    model = speech_model(processor)
    dataset = _pairs(processor)
    args = DeepTalkSpeechDPOConfig(output_dir=str(tmp_path), max_steps=4, learning_rate=5e-3, **COMMON)
    trainer = DeepTalkSpeechDPOTrainer(model, args, train_dataset=dataset, processing_class=processor)
    assert isinstance(trainer, DPOTrainer)
    collate = trainer.data_collator
    batch = collate([dataset[i] for i in range(4)])
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        before = sequence_logps(model, model(**inputs).logits, batch["labels"])
    trainer.train()
    logs = trainer.state.log_history[0]
    assert {"loss_text", "dpo_audio_1", "dpo_audio_3", "reward_margin"} <= set(logs)
    assert abs(logs["dpo_audio_1"] - np.log(2)) < 1e-3  # policy == reference at the first step
    model.eval()
    with torch.no_grad():
        after = sequence_logps(model, model(**inputs).logits, batch["labels"])
    margin_before = (before[:4, 1:] - before[4:, 1:]).mean()
    margin_after = (after[:4, 1:] - after[4:, 1:]).mean()
    assert margin_after > margin_before  # chosen audio became more likely relative to rejected
    # the reference stayed frozen
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


def test_speech_dpo_needs_audio_streams(setup, tmp_path, tiny_source):  # noqa: F811
    from conftest import convert

    processor, _, _ = setup
    with pytest.raises(ValueError, match="needs a model with audio streams"):
        DeepTalkSpeechDPOTrainer(convert(tiny_source("olmoe")),
                                 DeepTalkSpeechDPOConfig(output_dir=str(tmp_path), **COMMON),
                                 train_dataset=_pairs(processor, 2), processing_class=processor)


def test_rank_by_wer_orders_candidates():
    transcripts = {0.1: "the cat is red", 0.2: "the cat is blue", 0.3: "a dog"}
    candidates = [np.full(10, level, dtype=np.float32) for level in transcripts]
    order = rank_by_wer("the cat is red", candidates, lambda wave, sr: transcripts[round(float(wave[0]), 1)], 16000)
    assert order == [0, 1, 2]


def test_demo_preference_pairs_rank_with_a_transcriber(setup):  # noqa: F811
    from deeptalk.processing.processing_deeptalk import DeepTalkProcessor
    from deeptalk.recipes.demo_data import fit_demo_codec
    from deeptalk.trainers.dpo import demo_preference_pairs, model_asr_transcriber

    processor, _, _ = setup
    codec = fit_demo_codec(iters=2)
    speech_processor = DeepTalkProcessor.from_codec_layout(processor.tokenizer, codec.num_streams, codec.codebook_size)
    records = [dict(r) for r in load_demo_corpus("spoken_qa", decode_audio=False)["train"].select(range(3))]
    truth = {r["answer_audio"]: r["answer_text"] for r in load_demo_corpus("spoken_qa", decode_audio=False)["train"]}
    # a transcriber that knows which file a waveform came from: the right answer always wins
    import soundfile
    by_length = {len(soundfile.read(p)[0]): text for p, text in truth.items()}
    columns = demo_preference_pairs(speech_processor, codec, records, lambda wave, sr: by_length.get(len(wave), ""))
    assert len(columns["chosen_input_ids"]) == 3
    for i, record in enumerate(records):
        expected = codec.encode(torch.from_numpy(soundfile.read(record["answer_audio"], dtype="float32")[0]), 16000)
        grid = torch.tensor(columns["chosen_input_ids"][i])
        _, codes = speech_processor.layout.undelay_layout(grid[:, -(expected.shape[1] + 5):])
        assert torch.equal(codes, expected)
    # the offline transcriber (the model's own ASR path) runs
    model = speech_model(processor)
    text = model_asr_transcriber(model, processor)(np.zeros(8000, dtype=np.float32) + 0.01, 16000)
    assert isinstance(text, str)
