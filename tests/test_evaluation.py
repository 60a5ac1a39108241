"""deeptalk.evaluation: generation of text answers, QA accuracy, audio-token accuracy, relative drop,
WER / CER (real tiny models, the real corpus and codec)."""

import types
from collections import Counter

import pytest
import torch
from conftest import convert
from torch import nn

from deeptalk.tiny import tiny_whisper_config
from deeptalk.data import load_demo_corpus, read_demo_records
from deeptalk.evaluation import (
    answer_accuracy,
    asr_error_rates,
    audio_token_accuracy,
    character_error_rate,
    dataset_audio_token_accuracy,
    generate_text_answers,
    normalize_answer,
    relative_drop,
    spoken_qa_text_accuracy,
    stream_token_counts,
    text_qa_accuracy,
    word_error_rate,
)
from deeptalk.recipes import (
    build_demo_data,
    build_demo_processor,
    build_demo_tokenizer,
    fit_demo_codec,
    single_thread,
    spoken_question_conversation,
    text_qa_conversation,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a small shared CPU: a second intra-op thread only adds OpenMP stalls (5-20x slower)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def processor():
    codec = fit_demo_codec(iters=3)
    return build_demo_processor(build_demo_tokenizer(), codec), codec


@pytest.fixture(scope="module")
def speech_model(processor):
    from deeptalk.tiny import tiny_text_moe

    processor, _ = processor
    model = convert(tiny_text_moe("qwen3_moe", vocab_size=len(processor.tokenizer)))
    model.add_speech(audio_config=tiny_whisper_config(), **processor.model_speech_kwargs())
    return model.eval()


def rig(model, token_id, runner_up=None):
    """Replace the head by a bias-only one: `token_id` wins at every position (`runner_up` comes next)."""
    head = model.get_output_embeddings()
    rigged = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        rigged.weight.zero_()
        rigged.bias.zero_()
        rigged.bias[token_id] = 10.0
        if runner_up is not None:
            rigged.bias[runner_up] = 5.0
    model.set_output_embeddings(rigged)
    return head


def token_id(processor, token):
    ids = processor.tokenizer(token, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{token!r} is not one token"
    return ids[0]


# ---------------------------------------------------------------------------------------------- pure metrics
def test_answer_accuracy_normalises_and_matches_exactly():
    assert normalize_answer("  Seven.\n") == "seven" and normalize_answer("It's  RED!") == "it s red"
    assert answer_accuracy(["Seven.", "yes", " No "], ["seven", "yes", "no"]) == 1.0
    assert answer_accuracy(["six", "no", "yes please"], ["seven", "yes", "yes"]) == 0.0
    assert answer_accuracy(["seven", "no"], ["seven", "yes"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1"):
        answer_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        answer_accuracy([], [])


def test_relative_drop_is_the_papers_headline_number():
    assert relative_drop(53.06, 53.06 * (1 - 0.0545)) == pytest.approx(0.0545)  # DeepTalk vs DeepSeek-V2-Lite
    assert relative_drop(0.8, 0.6) == pytest.approx(0.25)
    assert relative_drop(0.5, 0.6) == pytest.approx(-0.2)  # improvement -> negative drop
    assert relative_drop(0.4, 0.0) == 1.0
    with pytest.raises(ValueError, match="base == 0"):
        relative_drop(0.0, 0.3)


def test_word_and_character_error_rates_use_jiwer():
    import jiwer

    assert word_error_rate(["one two three"], ["one two three"]) == 0.0
    assert word_error_rate(["a b c"], ["a x c"]) == pytest.approx(1 / 3)
    refs, hyps = ["what is two plus two", "anna lives in paris"], ["what is two plus", "anna live in paris now"]
    assert word_error_rate(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps)) == pytest.approx(3 / 9)
    assert word_error_rate(["Hello, World!"], ["hello world"]) == 0.0  # normalised
    assert word_error_rate(["Hello, World!"], ["hello world"], normalize=False) == 1.0
    assert character_error_rate(["abcd"], ["abed"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="empty"):
        word_error_rate(["!"], ["x"])


def test_stream_token_counts_shift_logits_by_one_position():
    ranges = [(0, 10), (10, 16), (16, 22)]  # text + 2 audio streams of 6 ids
    labels = torch.full((2, 3, 6), -100)
    labels[:, 1, 2:5] = torch.tensor([[10, 12, 15], [11, 11, 14]])
    labels[:, 2, 3:6] = torch.tensor([[16, 21, 17], [20, 18, 19]])
    logits = torch.randn(2, 6, 22)
    for s in (1, 2):  # logits at t predict the label at t + 1
        b, t = (labels[:, s] != -100).nonzero(as_tuple=True)
        logits[b, t - 1, labels[b, s, t]] = 100.0
    counts = stream_token_counts(logits, labels, ranges, (1, 2))
    assert counts == {1: (6, 6), 2: (6, 6)}
    unshifted = torch.randn(2, 6, 22)
    for s in (1, 2):
        b, t = (labels[:, s] != -100).nonzero(as_tuple=True)
        unshifted[b, t, labels[b, s, t]] = 100.0
        unshifted[b, t - 1, ranges[s][0] + (labels[b, s, t] - ranges[s][0] + 1) % 6] = 200.0  # wrong at t - 1
    assert stream_token_counts(unshifted, labels, ranges, (1, 2)) == {1: (0, 6), 2: (0, 6)}
    with pytest.raises(ValueError, match="outside its block"):
        stream_token_counts(logits, labels.where(labels != 12, 3), ranges, (1,))


# ---------------------------------------------------------------------------------------------- with models
def test_audio_token_accuracy_on_a_real_model(processor, speech_model):
    processor, codec = processor
    data = build_demo_data(processor, codec, splits=("test",), tasks=("spoken_qa_speech", "text_qa"), limit=6)
    rows = [data.spoken_qa_speech["test"][i] for i in range(3)]
    batch = processor.pad(rows)
    accuracy = audio_token_accuracy(speech_model, batch)
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    per_stream = audio_token_accuracy(speech_model, batch, per_stream=True)
    assert set(per_stream) == {"all", 1, 2, 3, 4} and per_stream["all"] == pytest.approx(accuracy)
    assert dataset_audio_token_accuracy(speech_model, processor, data.spoken_qa_speech["test"], batch_size=4) >= 0.0
    text_only = processor.pad([data.text_qa["test"][0]])
    assert torch.isnan(torch.tensor(audio_token_accuracy(speech_model, text_only)))  # no audio labels

    class Oracle(nn.Module):  # logits built from the labels: every audio label predicted
        config = speech_model.config

        def forward(self, input_ids, **kwargs):
            logits = torch.zeros(*input_ids.shape[::2], self.config.stream_range(self.config.num_streams - 1)[1])
            labels = batch["labels"]
            b, s, t = (labels != -100).nonzero(as_tuple=True)
            logits[b, t - 1, labels[b, s, t]] = 1.0
            return types.SimpleNamespace(logits=logits)

    oracle = Oracle()
    oracle.anchor = nn.Parameter(torch.zeros(1))
    assert audio_token_accuracy(oracle, batch) == 1.0


def test_rigged_heads_give_predictable_answers(processor, speech_model):
    processor, _ = processor
    text_records = read_demo_records("text_qa", "test")
    spoken_records = read_demo_records("spoken_qa", "test")
    yes_share = Counter(r["answer_text"] for r in text_records)["yes"] / len(text_records)
    no_share = Counter(r["answer_text"] for r in spoken_records)["no"] / len(spoken_records)
    head = rig(speech_model, token_id(processor, "yes"))
    try:
        accuracy, predictions = text_qa_accuracy(speech_model, processor, text_records, max_new_tokens=1,
                                                 batch_size=64, return_predictions=True)
        assert predictions == ["yes"] * len(text_records) and accuracy == pytest.approx(yes_share)
        assert generate_text_answers(speech_model, processor, [text_qa_conversation("is snow white")], max_new_tokens=3) == ["yesyesyes"]
        rig(speech_model, token_id(processor, "no"))
        assert spoken_qa_text_accuracy(speech_model, processor, spoken_records[:12], max_new_tokens=1) == pytest.approx(
            Counter(r["answer_text"] for r in spoken_records[:12])["no"] / 12)
        decoded = load_demo_corpus("spoken_qa", splits=["test"])["test"].select(range(4))  # decoded-audio records
        assert spoken_qa_text_accuracy(speech_model, processor, decoded, max_new_tokens=1, return_predictions=True)[1] == ["no"] * 4
        rig(speech_model, processor.layout.eot_id)  # answers end at once: empty strings, nothing right
        assert text_qa_accuracy(speech_model, processor, text_records[:8]) == 0.0
        assert asr_error_rates(speech_model, processor, read_demo_records("asr", "test")[:3]) == {"wer": 1.0, "cer": 1.0}
        rig(speech_model, len(processor.tokenizer) + 3, token_id(processor, "no"))  # an audio id wins: masked out
        assert generate_text_answers(speech_model, processor, [text_qa_conversation("is snow white")], max_new_tokens=2) == ["nono"]
    finally:
        speech_model.set_output_embeddings(head)
    assert no_share > 0


def test_plain_source_model_generates_from_the_text_stream(processor, tiny_source):
    processor, _ = processor
    source = tiny_source("olmoe", vocab_size=len(processor.tokenizer))
    records = read_demo_records("text_qa", "test")[:10]
    rig(source, token_id(processor, "seven"))
    expected = sum(r["answer_text"] == "seven" for r in records) / 10
    assert text_qa_accuracy(source, processor, records, max_new_tokens=1) == pytest.approx(expected)
    assert generate_text_answers(source, processor, [text_qa_conversation("what is three plus four")], max_new_tokens=2) == ["sevenseven"]
    with pytest.raises(ValueError, match="cannot read user audio"):
        generate_text_answers(source, processor, [spoken_question_conversation(read_demo_records("spoken_qa", "test")[0]["question_audio"])])


def reference_greedy(model, processor, conversation, steps):
    """No padding, no cache: re-run the whole multi-stream layout for every new token."""
    layout = processor.layout
    batch = processor(conversation, add_generation_prompt=True)
    ids, mask = batch["input_ids"], batch["audio_input_mask"]
    pad_a = [layout.audio_special_id("<|pad_a|>", i) for i in range(layout.num_audio_streams)]
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, input_features=batch.get("input_features"),
                       audio_feature_lengths=batch.get("audio_feature_lengths"), audio_input_mask=mask).logits
        token = int(logits[0, -1, : len(processor.tokenizer)].argmax())
        if token == layout.eot_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([token, *pad_a])[None, :, None]], dim=-1)
        mask = torch.nn.functional.pad(mask, (0, 1))
    return processor.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_batched_left_padded_generation_equals_unpadded_greedy_decoding(processor, speech_model):
    processor, _ = processor
    records = read_demo_records("spoken_qa", "test")[:3]
    conversations = [spoken_question_conversation(r["question_audio"]) for r in records]
    conversations += [text_qa_conversation(r["question_text"]) for r in records]
    with torch.no_grad():
        expected = [reference_greedy(speech_model, processor, c, 4) for c in conversations]
    assert generate_text_answers(speech_model, processor, conversations, max_new_tokens=4, batch_size=6) == expected
    assert generate_text_answers(speech_model, processor, conversations, max_new_tokens=4, batch_size=4) == expected

    # the transformers generate() path, as taken once prepare_inputs_for_generation names inputs_embeds
    original = speech_model.prepare_inputs_for_generation

    def forwarding(self, input_ids, inputs_embeds=None, cache=None, is_first_iteration=False, **kwargs):
        return original(input_ids, inputs_embeds=inputs_embeds, cache=cache, is_first_iteration=is_first_iteration, **kwargs)

    speech_model.prepare_inputs_for_generation = types.MethodType(forwarding, speech_model)
    try:
        assert generate_text_answers(speech_model, processor, conversations, max_new_tokens=4, batch_size=6) == expected
    finally:
        del speech_model.prepare_inputs_for_generation
