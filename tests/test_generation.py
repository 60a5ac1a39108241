"""Single-pass text + speech decoding."""

import torch
from test_trainers import speech_model  # noqa: F401  (shared tiny speech model builder)

from deeptalk import DeepTalkProcessor
from deeptalk.data import load_demo_corpus
from deeptalk.generation import generate_speech_answer
from deeptalk.processing.tokenizer import train_demo_tokenizer


def test_cached_decoding_equals_full_recompute_and_respects_the_layout():
    corpus = load_demo_corpus("spoken_qa")
    tokenizer = train_demo_tokenizer([r["question_text"] + " " + r["answer_text"] for r in corpus["train"]])
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, 3, 16)
    torch.manual_seed(0)
    model = speech_model(processor).eval()
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": corpus["test"][0]["question_audio"]}]}]
    cached = generate_speech_answer(model, processor, conversation, max_steps=12)
    full = generate_speech_answer(model, processor, conversation, max_steps=12, use_cache=False)
    assert torch.equal(cached.layout, full.layout)
    layout = processor.layout
    grid = cached.layout
    for i, delay in enumerate(layout.delays):  # each audio stream is PAD_A before its delay
        assert (grid[1 + i, :delay] == layout.audio_special_id("<|pad_a|>", i)).all()
        start, end = layout.stream_range(1 + i)
        assert ((grid[1 + i] >= start) & (grid[1 + i] < end)).all()
    assert ((grid[0] >= 0) & (grid[0] < layout.text_vocab_size)).all()
    assert cached.codes.shape[0] == 3
