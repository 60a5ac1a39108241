"""deeptalk.evaluation: generation of text answers, QA accuracy, audio-token accuracy, relative drop,
WER / CER, spoken-answer scoring through pluggable ASRs, `deeptalk evaluate`'s JSON and its model-card
entries (real tiny models, the real corpus and codec)."""

import types
import warnings
from collections import Counter

import numpy
import pytest
import torch
from conftest import convert
from torch import nn

from deeptalk.data import load_demo_corpus, read_demo_records
from deeptalk.evaluation import (
    ERROR_RATE_METRIC_PATH,
    OWN_ASR,
    answer_accuracy,
    asr_error_rates,
    audio_token_accuracy,
    character_error_rate,
    dataset_audio_token_accuracy,
    generate_text_answers,
    load_error_rate_metric,
    load_speech_recognizer,
    normalize_answer,
    relative_drop,
    spoken_answers,
    spoken_qa_speech_scores,
    spoken_qa_text_accuracy,
    stream_token_counts,
    text_qa_accuracy,
    transcribe,
    word_error_rate,
)
from deeptalk.evaluation.evaluate import evaluate_on_demo_corpus
from deeptalk.generation import generate_speech_answer
from deeptalk.recipes import (
    build_demo_data,
    build_demo_processor,
    build_demo_tokenizer,
    fit_demo_codec,
    single_thread,
    spoken_question_conversation,
    text_qa_conversation,
)
from deeptalk.tiny import tiny_whisper_config


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
        assert generate_text_answers(speech_model, processor, [text_qa_conversation("is snow white")],
                                     max_new_tokens=3) == ["yesyesyes"]
        rig(speech_model, token_id(processor, "no"))
        assert spoken_qa_text_accuracy(speech_model, processor, spoken_records[:12], max_new_tokens=1) == pytest.approx(
            Counter(r["answer_text"] for r in spoken_records[:12])["no"] / 12)
        decoded = load_demo_corpus("spoken_qa", splits=["test"])["test"].select(range(4))  # decoded-audio records
        assert spoken_qa_text_accuracy(speech_model, processor, decoded, max_new_tokens=1,
                                       return_predictions=True)[1] == ["no"] * 4
        rig(speech_model, processor.layout.eot_id)  # answers end at once: empty strings, nothing right
        assert text_qa_accuracy(speech_model, processor, text_records[:8]) == 0.0
        asr_records = read_demo_records("asr", "test")[:3]
        assert asr_error_rates(speech_model, processor, asr_records) == {"wer": 1.0, "cer": 1.0}
        rig(speech_model, len(processor.tokenizer) + 3, token_id(processor, "no"))  # an audio id wins: masked out
        assert generate_text_answers(speech_model, processor, [text_qa_conversation("is snow white")],
                                     max_new_tokens=2) == ["nono"]
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
    sum_question = [text_qa_conversation("what is three plus four")]
    assert generate_text_answers(source, processor, sum_question, max_new_tokens=2) == ["sevenseven"]
    question_audio = read_demo_records("spoken_qa", "test")[0]["question_audio"]
    with pytest.raises(ValueError, match="cannot read user audio"):
        generate_text_answers(source, processor, [spoken_question_conversation(question_audio)])


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
        return original(input_ids, inputs_embeds=inputs_embeds, cache=cache, is_first_iteration=is_first_iteration,
                        **kwargs)

    speech_model.prepare_inputs_for_generation = types.MethodType(forwarding, speech_model)
    try:
        assert generate_text_answers(speech_model, processor, conversations, max_new_tokens=4, batch_size=6) == expected
    finally:
        del speech_model.prepare_inputs_for_generation


def test_spoken_prompts_route_their_audio_as_speech_under_by_token_modality(processor, speech_model):
    """Prompt embeddings hide which positions hold user audio; by-token-modality routing must still send
    them to the speech experts, as a forward from the multi-stream ids does."""
    import copy

    processor, _ = processor
    records = read_demo_records("spoken_qa", "test")[:4]
    conversations = [spoken_question_conversation(r["question_audio"]) for r in records]
    model = copy.deepcopy(speech_model)
    model.config.routing_mode = "by_token_modality"
    with torch.no_grad():
        for block in model.moe_blocks():  # loud speech experts: where audio positions go shows in the answers
            block.speech_bank.down_proj.mul_(200.0)
        expected = [reference_greedy(model, processor, c, 4) for c in conversations]
    assert generate_text_answers(model, processor, conversations, max_new_tokens=4, batch_size=4) == expected


# ---------------------------------------------------------------------------------------------- the evaluate metric
def test_error_rates_go_through_the_shipped_evaluate_metric_offline():
    import os

    import evaluate
    import jiwer

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # loading must not need the Hub
    refs, hyps = ["what is two plus two", "anna lives in paris"], ["what is two plus", "anna live in paris now"]
    wer = evaluate.load(ERROR_RATE_METRIC_PATH)  # the folder, default config = WER
    assert wer.compute(predictions=hyps, references=refs) == {"wer": pytest.approx(jiwer.wer(refs, hyps))}
    cer = evaluate.load(f"{ERROR_RATE_METRIC_PATH}/error_rate.py", config_name="cer")  # the script itself
    assert cer.compute(predictions=["abed"], references=["abcd"]) == {"cer": 0.25}
    assert word_error_rate(refs, hyps, normalize=False) == wer.compute(predictions=hyps, references=refs)["wer"]
    assert load_error_rate_metric("wer") is load_error_rate_metric("wer")  # loaded once per process
    with pytest.raises(ValueError, match="config_name='wer' or 'cer'"):
        evaluate.load(ERROR_RATE_METRIC_PATH, config_name="bleu")
    with pytest.raises(ValueError, match="reference is empty"):
        wer.compute(predictions=["a"], references=[" "])


# ---------------------------------------------------------------------------------------------- spoken answers
def reference_asr(records):
    """An ASR callable that 'hears' each record's reference answer, in order, and keeps what it was given."""
    answers, heard = iter([r["answer_text"] for r in records]), []

    def hear(waveform, sampling_rate):
        heard.append((waveform, sampling_rate))
        return next(answers)

    return hear, heard


def test_speech_recognizer_specs_and_their_errors(processor, speech_model, tiny_source):
    processor, codec = processor
    calls = []
    recognizer = load_speech_recognizer(lambda waveform, rate: calls.append(rate) or f"{len(waveform)} at {rate}")
    loud = torch.full((160,), 0.5)
    assert recognizer(loud, 16000) == "160 at 16000"  # torch waveforms arrive as numpy
    clips = [(numpy.zeros(80), 24000), (numpy.zeros(0), 16000), (2 * loud.numpy(), 8000)]
    assert recognizer.transcribe(clips) == ["", "", "160 at 8000"]
    assert calls == [16000, 8000]  # silent / empty clips never reach the ASR
    assert load_speech_recognizer(recognizer) is recognizer
    own = load_speech_recognizer("own", model=speech_model, processor=processor)
    assert own.name == OWN_ASR and load_speech_recognizer(None, model=speech_model, processor=processor).name == OWN_ASR
    with pytest.raises(ValueError, match="not str"):
        load_speech_recognizer(lambda waveform, rate: 3)(loud, 16000)
    for bad in (3, ["openai/whisper-small"]):
        with pytest.raises(ValueError,
                           match=r"is not an ASR: pass asr=None .* or a callable \(waveform, sampling_rate\) -> str"):
            load_speech_recognizer(bad)
    with pytest.raises(ValueError, match="(?s)must be cached or reachable.*HF_HUB_OFFLINE=1.*callable"):
        load_speech_recognizer("nobody/no-such-asr-model")
    with pytest.raises(ValueError, match="No ASR checkpoint folder at '/no/such/folder'.*asr=None"):
        load_speech_recognizer("/no/such/folder")
    with pytest.raises(ValueError, match="no audio encoder.*add_speech.*or pass asr="):
        load_speech_recognizer(None, model=tiny_source("qwen3_moe", vocab_size=len(processor.tokenizer)),
                               processor=processor)
    with pytest.raises(ValueError, match="is not an ASR"):  # fails before any metric is computed
        evaluate_on_demo_corpus(speech_model, processor, codec=codec, asr=12, limit=1)


def test_spoken_qa_speech_accuracy_is_one_when_the_asr_hears_the_reference(processor, speech_model):
    processor, codec = processor
    records = read_demo_records("spoken_qa", "test")[:3]
    hear, heard = reference_asr(records)
    scores = spoken_qa_speech_scores(speech_model, processor, codec, records, asr=hear, max_steps=12,
                                     return_predictions=True)
    expected = [generate_speech_answer(speech_model, processor, spoken_question_conversation(r["question_audio"]),
                                       max_steps=12)
                for r in records]
    assert scores["text_answers"] == [a.text for a in expected]
    for (waveform, rate), answer in zip(heard, expected):  # the ASR got the codec's decoding of the spoken answer
        assert rate == codec.sampling_rate and waveform.dtype == numpy.float32 and waveform.ndim == 1
        assert numpy.allclose(waveform, codec.decode(answer.codes).clamp(-1, 1).numpy())
    references = [r["answer_text"] for r in records]
    said = [i for i, text in enumerate(scores["text_answers"]) if normalize_answer(text)]
    assert said, "the tiny model wrote no text: TTS WER is not exercised"
    assert scores["accuracy"] == 1.0 and scores["transcripts"] == references
    assert scores["tts_wer"] == pytest.approx(
        word_error_rate([scores["text_answers"][i] for i in said], [references[i] for i in said]))
    assert scores["num_examples"] == 3 and scores["num_tts_wer_examples"] == len(said)
    assert scores["asr"].endswith("reference_asr.<locals>.hear")
    # an ASR that hears exactly the text answer: the speech says what the text says, TTS WER 0
    texts = iter(scores["text_answers"])
    faithful = spoken_qa_speech_scores(speech_model, processor, codec, records, asr=lambda w, r: next(texts),
                                       max_steps=12)
    assert faithful["tts_wer"] == 0.0
    assert faithful["accuracy"] == answer_accuracy(scores["text_answers"], references)
    # a recognizer with its own normaliser compares through it: "12." is "twelve" for the Whisper judge's
    from deeptalk.evaluation.judge import normalize_transcript
    from deeptalk.evaluation.speech import SpeechRecognizer

    written = {"twelve": "12.", "three": "3!"}
    digits = SpeechRecognizer("digits", lambda clips: [written.get(r, r.upper()) for r in references[: len(clips)]],
                              normalize=normalize_transcript)
    assert spoken_qa_speech_scores(speech_model, processor, codec, records, asr=digits, max_steps=12)["accuracy"] == 1.0
    # an ASR that hears two extra words: 2 insertions per answer over the *text answer's* words (the reference side)
    texts = iter(scores["text_answers"])
    wordy = spoken_qa_speech_scores(speech_model, processor, codec, records, asr=lambda w, r: next(texts) + " and more",
                                    max_steps=12)
    words = sum(len(normalize_answer(scores["text_answers"][i]).split()) for i in said)
    assert wordy["tts_wer"] == pytest.approx(2 * len(said) / words)


def test_own_asr_path_transcribes_the_decoded_spoken_answers(processor, speech_model):
    processor, codec = processor
    records = read_demo_records("spoken_qa", "test")[3:8]  # answers twelve, ben, no, yes, yes
    head = rig(speech_model, token_id(processor, "no"))  # text "nono...", audio code 0 every frame (never EOA)
    try:
        scores = spoken_qa_speech_scores(speech_model, processor, codec, records, max_steps=10, asr_max_new_tokens=1,
                                         return_predictions=True)
    finally:
        speech_model.set_output_embeddings(head)
    assert scores["asr"] == OWN_ASR and scores["text_answers"] == ["no" * 10] * 5
    assert scores["transcripts"] == ["no"] * 5  # heard through the (rigged) own ASR path: the clips were audible
    assert scores["accuracy"] == pytest.approx(1 / 5) and scores["tts_wer"] == 1.0
    # unrigged: the own path is `transcribe` on the decoded waveforms
    with warnings.catch_warnings(record=True) as caught:  # generated audio: no advice about a recording gain
        warnings.simplefilter("always")
        scores = spoken_qa_speech_scores(speech_model, processor, codec, records[:2], max_steps=10,
                                         return_predictions=True)
    assert not [w for w in caught if "is clipped" in str(w.message)]
    _, waveforms = spoken_answers(speech_model, processor, codec, records[:2], max_steps=10)
    clips = [(numpy.clip(w, -1, 1), codec.sampling_rate) for w in waveforms]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transcripts = transcribe(speech_model, processor, clips)
    assert scores["transcripts"] == [t.strip() for t in transcripts]


def tiny_ctc_checkpoint(folder):
    """A real (random) transformers CTC ASR checkpoint folder: what `asr="<folder>"` loads with `pipeline`."""
    import json

    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    folder.mkdir()
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, return_attention_mask=False)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, pad_token_id=0)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_a_transformers_asr_checkpoint_folder_transcribes_the_spoken_answers(processor, speech_model, tmp_path):
    from transformers import pipeline

    processor, codec = processor
    folder = tiny_ctc_checkpoint(tmp_path / "ctc")
    records = read_demo_records("spoken_qa", "test")[:2]
    scores = spoken_qa_speech_scores(speech_model, processor, codec, records, asr=folder, max_steps=10,
                                     return_predictions=True)
    assert scores["asr"] == folder
    _, waveforms = spoken_answers(speech_model, processor, codec, records, max_steps=10)
    asr = pipeline("automatic-speech-recognition", model=folder)
    assert scores["transcripts"] == [
        asr({"raw": numpy.clip(w, -1, 1), "sampling_rate": codec.sampling_rate})["text"].strip() for w in waveforms]
    assert any(scores["transcripts"])  # the random CTC head says something
    results = evaluate_on_demo_corpus(speech_model, processor, codec=codec, limit=1, asr=folder, max_speech_steps=5,
                                      max_new_tokens=1)
    assert results["speech_answer_asr"] == folder and results["num_examples"]["spoken_qa_speech_accuracy"] == 1


def test_evaluate_on_demo_corpus_writes_every_metric_and_the_card_shows_them(
    processor, speech_model, tiny_source, tmp_path
):
    import json

    from huggingface_hub import ModelCard

    from deeptalk.evaluation.evaluate import write_results
    from deeptalk.hub import render_model_card

    processor, codec = processor
    base = tiny_source("qwen3_moe", vocab_size=len(processor.tokenizer))
    rig(base, token_id(processor, "seven"))  # text_qa test answers: eleven, seven, fourteen
    # the ASR hears the reference answer words, in order: for the 3 spoken answers, then for the ceilings (the
    # one-word recordings, their codec round trips, the sentence recordings, theirs)
    hear, _ = reference_asr(read_demo_records("spoken_qa", "test")[:3] * 5)
    results = evaluate_on_demo_corpus(speech_model, processor, base_model=base, codec=codec, limit=3, asr=hear,
                                      max_speech_steps=10, max_new_tokens=1)
    assert results["judge"] == {"name": results["speech_answer_asr"]}
    assert set(results["ceilings"]) == {"answer_audio", "answer_sentence_audio"}
    assert results["ceilings"]["answer_audio"] == {"reference_audio": {"accuracy": 1.0, "wer": 0.0, "num_examples": 3},
                                                   "codec_round_trip": {"accuracy": 1.0, "wer": 0.0, "num_examples": 3}}
    assert results["ceilings"]["answer_sentence_audio"]["reference_audio"]["accuracy"] == 0.0  # one word != a sentence
    assert results["base_text_qa_accuracy"] == pytest.approx(1 / 3)
    assert results["text_relative_drop"] == pytest.approx(relative_drop(1 / 3, results["text_qa_accuracy"]))
    assert results["spoken_qa_speech_accuracy"] == 1.0 and results["tts_wer"] >= 0.0
    assert set(results["asr"]) == {"wer", "cer"} and 0.0 <= results["audio_token_accuracy"] <= 1.0
    assert results["speech_answer_asr"].endswith("hear") and results["max_speech_steps"] == 10
    assert results["skipped"] == {"asr_heard": "the 'stack' adapter hears no words (only 'ctc' does)"}
    assert set(results["num_examples"]) == {"text_qa_accuracy", "base_text_qa_accuracy", "spoken_qa_text_accuracy",
                                            "asr", "audio_token_accuracy", "spoken_qa_speech_accuracy", "tts_wer"}
    assert all(0 < n <= 3 for n in results["num_examples"].values())
    write_results(results, str(tmp_path / "eval.json"))
    assert json.loads((tmp_path / "eval.json").read_text()) == results
    card = ModelCard(str(render_model_card(speech_model, repo_id="me/tiny", eval_results=results)))
    shown = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert shown == {key.replace(".", "_"): value for key, value in [
        ("text_qa_accuracy", results["text_qa_accuracy"]), ("text_relative_drop", results["text_relative_drop"]),
        ("spoken_qa_text_accuracy", results["spoken_qa_text_accuracy"]), ("spoken_qa_speech_accuracy", 1.0),
        ("audio_token_accuracy", results["audio_token_accuracy"]), ("tts_wer", results["tts_wer"]),
        ("asr.wer", results["asr"]["wer"]), ("asr.cer", results["asr"]["cer"])]}

    # without a codec the speech-out metrics are skipped, with the reason; text/ASR metrics stay
    no_codec = evaluate_on_demo_corpus(speech_model, processor, limit=2, max_new_tokens=1)
    for key in ("audio_token_accuracy", "spoken_qa_speech_accuracy", "tts_wer"):
        assert key not in no_codec and "no codec" in no_codec["skipped"][key]
    assert "no base model" in no_codec["skipped"]["text_relative_drop"]
    assert set(no_codec["asr"]) == {"wer", "cer"} and "speech_answer_asr" not in no_codec
    card = ModelCard(str(render_model_card(speech_model, eval_results=no_codec)))
    assert {r.metric_name for r in card.data.eval_results} == {
        "text_qa_accuracy", "spoken_qa_text_accuracy", "asr_wer", "asr_cer"}
    assert "(no codec: pass codec=" in card.text
    quiet = evaluate_on_demo_corpus(speech_model, processor, codec=codec, limit=2, speech_answers=False,
                                    max_new_tokens=1)
    assert "audio_token_accuracy" in quiet and quiet["skipped"]["tts_wer"] == "speech_answers=False"


def test_degenerate_speech_scores_are_flagged():
    from deeptalk.evaluation.evaluate import degenerate_answer_warnings

    same = {"text_answers": ["no", "No.", "no"], "asr": "own"}
    found = degenerate_answer_warnings(same, {"wer": 1.0, "cer": 0.9})
    assert "same answer ('no')" in found["spoken_qa_speech_accuracy"]
    assert "WER on the ASR test clips is 1.00" in found["tts_wer"] and "--asr" in found["tts_wer"]
    varied = {"text_answers": ["no", "yes"], "asr": "own"}
    assert degenerate_answer_warnings(varied, {"wer": 0.1}) == {}
    assert degenerate_answer_warnings({"text_answers": ["no", "no"], "asr": "openai/whisper"}, {"wer": 1.0}).keys() == {
        "spoken_qa_speech_accuracy"}  # a named ASR is not the model's own


@pytest.mark.parametrize("limit", [0, -3, True, 2.5])
def test_a_limit_that_is_not_a_positive_count_is_refused_before_scoring(limit):
    with pytest.raises(ValueError, match=r"limit must be a positive number of records per task, or None"):
        evaluate_on_demo_corpus(None, None, limit=limit)
