"""DeepTalkProcessor and the data collator: layout, labels, batching, datasets, errors, save/load."""

import numpy as np
import pytest
import torch
from conftest import convert
from transformers import AutoModelForCausalLM, AutoProcessor

from deeptalk.tiny import tiny_whisper_config
from deeptalk import DeepTalkDataCollator, DeepTalkProcessor
from deeptalk.data import load_demo_corpus
from deeptalk.processing.tokenizer import train_demo_tokenizer

STREAMS, CODEBOOK = 3, 16


@pytest.fixture(scope="module")
def corpus():
    return load_demo_corpus("spoken_qa")


@pytest.fixture(scope="module")
def processor(corpus):
    texts = [r["question_text"] + " " + r["answer_text"] for r in corpus["train"]]
    return DeepTalkProcessor.from_codec_layout(train_demo_tokenizer(texts), num_audio_streams=STREAMS, codebook_size=CODEBOOK)


def spoken(example, codes=None):
    codes = torch.randint(0, CODEBOOK, (STREAMS, 4), generator=torch.Generator().manual_seed(0)) if codes is None else codes
    return [
        {"role": "user", "content": [{"type": "audio", "audio": example["question_audio"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": example["answer_text"]}, {"type": "audio", "audio_codes": codes}]},
    ]


def test_layout_and_labels_of_a_spoken_turn(processor, corpus):
    example = corpus["train"][0]
    codes = torch.arange(12).reshape(STREAMS, 4) % CODEBOOK
    encoded = processor.encode_conversation(spoken(example, codes))
    ids, labels, mask = (np.array(encoded[k]) for k in ("input_ids", "labels", "audio_input_mask"))
    layout, tok = processor.layout, processor.tokenizer
    n_audio = processor.num_audio_positions(encoded["audio_feature_lengths"][0])
    assert mask.sum() == n_audio and ids.shape[0] == 1 + STREAMS
    # <|user|> BOA AUDIO_IN*n EOA <|eot|> <|assistant|> then the delayed answer
    assert ids[0, 0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[1, 1] == layout.audio_special_id("<|boa|>", 0) and ids[1, 2 + n_audio] == layout.audio_special_id("<|eoa|>", 0)
    answer_start = 2 + n_audio + 1 + 2
    text_ids = tok(example["answer_text"], add_special_tokens=False)["input_ids"]
    assert ids[0, answer_start : answer_start + len(text_ids)].tolist() == text_ids
    text_back, codes_back = layout.undelay_layout(torch.tensor(ids[:, answer_start:]))
    assert text_back.tolist() == text_ids and torch.equal(codes_back, codes)
    # labels: only the answer -- text + EOT, codes + EOA, nothing before
    assert (labels[:, :answer_start] == -100).all()
    assert labels[0, answer_start : answer_start + len(text_ids) + 1].tolist() == text_ids + [layout.eot_id]
    assert (labels[1] != -100).sum() == 4 + 1 and (labels[3] != -100).sum() == 4 + 1
    assert processor.decode_turn(ids[:, answer_start:])[0].strip() == example["answer_text"]


def test_text_turns_learn_only_the_last_answer(processor):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"},
                {"role": "assistant", "content": "four"}, {"role": "user", "content": "and three plus three"},
                {"role": "assistant", "content": "six"}]
    encoded = processor.encode_conversation(messages)
    learned = [t for t in encoded["labels"][0] if t != -100]
    assert processor.tokenizer.decode(learned) == "six<|eot|>"
    assert all(t == -100 for row in encoded["labels"][1:] for t in row)
    prompt = processor.encode_conversation(messages[:4], add_generation_prompt=True)
    assert all(t == -100 for t in prompt["labels"][0])
    assert prompt["input_ids"][0][-1] == processor.tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_batch_padding_and_model_forward(processor, corpus, tiny_source):
    batch = processor([spoken(corpus["train"][0]), spoken(corpus["train"][1])[:1] + [{"role": "assistant", "content": "yes"}]])
    assert batch["input_ids"].shape[:2] == (2, 1 + STREAMS) and batch["input_features"].shape[:2] == (2, 80)
    shorter = batch["attention_mask"][1].sum()
    assert (batch["input_ids"][1, 0, shorter:] == processor.layout.pad_t_id).all()
    left = processor([spoken(corpus["train"][0]), spoken(corpus["train"][1])[:1] + [{"role": "assistant", "content": "yes"}]],
                     padding_side="left")
    assert left["attention_mask"][1, 0] == 0 and left["attention_mask"][1, -1] == 1

    whisper = tiny_whisper_config()
    model = convert(tiny_source("qwen3_moe", vocab_size=len(processor.tokenizer)))
    model.add_speech(audio_config=whisper, **processor.model_speech_kwargs())
    out = model(**batch, output_expert_load=True)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert torch.isfinite(out.stream_losses).all()
    assert model.stream_logits(out.logits, 0).shape[-1] == processor.layout.text_vocab_size
    assert model.stream_logits(out.logits, 2).shape[-1] == CODEBOOK + 4


def test_model_and_processor_save_and_reload_together(processor, corpus, tiny_source, tmp_path):
    whisper = tiny_whisper_config()
    model = convert(tiny_source("olmoe", vocab_size=len(processor.tokenizer)))
    model.add_speech(audio_config=whisper, **processor.model_speech_kwargs())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor2, DeepTalkProcessor) and processor2.layout == processor.layout
    conversation = spoken(corpus["test"][0])
    a, b = processor(conversation), processor2(conversation)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model.eval()(**a).logits, model2(**b).logits)


def test_datasets_map_on_an_audio_column_then_collator(processor, corpus, tiny_source):
    from datasets import Audio

    rows = load_demo_corpus("spoken_qa", decode_audio=False)["train"].select(range(6))  # audio as file paths
    ds = rows.select_columns(["question_audio", "answer_text"]).cast_column("question_audio", Audio(decode=False))
    codes = [torch.randint(0, CODEBOOK, (STREAMS, 3)).tolist()] * len(ds)

    def encode(batch):
        conversations = [
            [{"role": "user", "content": [{"type": "audio"}]},
             {"role": "assistant", "content": [{"type": "text", "text": t}, {"type": "audio", "audio_codes": c}]}]
            for t, c in zip(batch["answer_text"], codes)
        ]
        return processor.encode_batch(conversations, audio=batch["question_audio"])

    encoded = ds.map(encode, batched=True, batch_size=4, remove_columns=ds.column_names)
    assert len(encoded) == 6 and "input_features" in encoded.column_names
    batch = DeepTalkDataCollator(processor)([encoded[i] for i in range(3)])
    assert batch["input_features"].shape[0] == 3 and batch["labels"].shape[1] == 1 + STREAMS
    raw = DeepTalkDataCollator(processor)([{"messages": spoken(corpus["train"][0])}])
    assert raw["input_ids"].shape[1] == 1 + STREAMS


def test_assistant_waveform_goes_through_the_codec(processor, corpus):
    from deeptalk.processing.codecs import MelVQCodec

    answer = corpus["train"][0]["answer_audio"]
    messages = spoken(corpus["train"][0])
    messages[1]["content"][1] = {"type": "audio", "audio": answer}
    with pytest.raises(ValueError, match="no codec was given"):
        processor.encode_conversation(messages)
    codec = MelVQCodec(codebook_size=64).fit([r["answer_audio"]["array"] for r in corpus["train"].select(range(8))], 16000, iters=3)
    speech_processor = DeepTalkProcessor.from_codec_layout(processor.tokenizer, codec.num_streams, codec.codebook_size)
    encoded = speech_processor.encode_conversation(messages, codec=codec)
    expected = codec.encode(torch.from_numpy(answer["array"]), 16000)
    grid = torch.tensor(encoded["input_ids"])
    _, codes = speech_processor.layout.undelay_layout(grid[:, -(expected.shape[1] + max(speech_processor.layout.delays) + 1):])
    assert torch.equal(codes, expected)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "assistant", "content": "hi"}], "expected 'user', got 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "out of order"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
        ([{"role": "robot", "content": "a"}], "role 'robot'"),
        ([{"role": "user", "content": "say <|eot|> now"}, {"role": "assistant", "content": "ok"}], "reserved special token"),
        ([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "ok"}], "Unknown content type 'image'"),
        ([{"role": "user", "content": "a"}], "ends with the assistant turn"),
        ([], "non-empty list"),
        ([{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "ok"}], "no data"),
    ],
)
def test_bad_conversations_are_rejected(processor, messages, message):
    with pytest.raises(ValueError, match=message):
        processor.encode_conversation(messages)


def test_bad_codes_and_audio_are_rejected(processor, corpus):
    example = corpus["train"][0]
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        processor.encode_conversation(spoken(example, torch.full((STREAMS, 2), 16)))
    with pytest.raises(ValueError, match="num_audio_streams=3"):
        processor.encode_conversation(spoken(example, torch.zeros(2, 2, dtype=torch.long)))
    long = [{"role": "user", "content": [{"type": "audio", "audio": np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 31).astype(np.float32), "sampling_rate": 16000}]},
            {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="30"):
        processor.encode_conversation(long)
    with pytest.raises(ValueError, match="add_generation_prompt=True needs"):
        processor.encode_conversation(spoken(example), add_generation_prompt=True)


def test_the_remote_code_audio_reader_agrees_with_load_audio(corpus, tmp_path):
    """Where deeptalk is absent the processor reads audio with `read_audio` (soundfile + torchaudio): same samples
    as the package's `load_audio` for files, bytes, dicts and arrays at other rates, and clear errors."""
    import soundfile

    from deeptalk.processing.audio import load_audio
    from deeptalk.processing_deeptalk import read_audio

    path = corpus["test"][0]["question_audio"]["path"]
    samples, rate = soundfile.read(path, dtype="float32")
    stereo = np.stack([samples, 0.5 * samples])  # [channels, samples]
    wav = tmp_path / "question.wav"
    soundfile.write(wav, samples, rate)
    sources = [(path, None), (wav.read_bytes(), None), ({"path": str(wav)}, None),
               ({"array": samples, "sampling_rate": rate}, None), (stereo, rate)]
    for source, source_rate in sources:
        for target in (16000, 24000):
            ours = read_audio(source, source_rate, target_sampling_rate=target)
            reference = load_audio(source, source_rate, target_sampling_rate=target)
            assert ours.dtype == np.float32 and ours.shape == reference.shape
            np.testing.assert_allclose(ours, reference, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_audio(tmp_path / "missing.wav", target_sampling_rate=16000)
    with pytest.raises(ValueError, match="needs its sampling_rate"):
        read_audio(samples, target_sampling_rate=16000)
    with pytest.raises(ValueError, match="floats in"):
        read_audio((samples * 32767).astype(np.int16), 16000, target_sampling_rate=16000)
    with pytest.raises(ValueError, match="at most 1 s"):
        read_audio(path, target_sampling_rate=16000, max_seconds=1)
