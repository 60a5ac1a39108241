"""Speech decoding: single-pass and batch-parallel strategies, static cache, the stream rules, and the
`SpeechChat` API (streamed text and audio, timings, expert load, history, loading from a folder)."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_trainers import speech_model

from deeptalk.data import load_demo_corpus
from deeptalk.evaluation import generate_text_answers
from deeptalk.generation import (
    AudioChunk,
    ChatReply,
    SpeechChat,
    SpeechDecodingConfig,
    TextDelta,
    generate_speech_answer,
)
from deeptalk.recipes import build_demo_processor, build_demo_tokenizer, fit_demo_codec, single_thread


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def setup():
    codec = fit_demo_codec(iters=3)
    processor = build_demo_processor(build_demo_tokenizer(), codec)
    torch.manual_seed(0)
    model = speech_model(processor).eval()
    question = load_demo_corpus("spoken_qa", decode_audio=False)["test"][0]["question_audio"]
    return model, processor, codec, question


def spoken(question):
    return [{"role": "user", "content": [{"type": "audio", "audio": question}]}]


def check_layout_rules(grid, layout):
    """Every stream keeps to the delayed layout: PAD_A before its delay, codes, then at most one EOA at
    the same frame for all streams, PAD_A after it; text ids in the text vocabulary."""
    assert ((grid[0] >= 0) & (grid[0] < layout.text_vocab_size)).all()
    ends = set()
    for i, delay in enumerate(layout.delays):
        pad_a, eoa = layout.audio_special_id("<|pad_a|>", i), layout.audio_special_id("<|eoa|>", i)
        assert (grid[1 + i, :delay] == pad_a).all()
        codes = grid[1 + i, delay:] - layout.stream_offset(1 + i)
        is_code = (codes >= 0) & (codes < layout.codebook_size)
        first_special = int((~is_code).nonzero()[0]) if (~is_code).any() else len(codes)
        if first_special < len(codes):
            assert int(grid[1 + i, delay + first_special]) == eoa
            assert (grid[1 + i, delay + first_special + 1 :] == pad_a).all()
        ends.add(first_special if first_special < len(codes) else None)
    assert len(ends - {None}) <= 1, f"streams ended at different frames: {ends}"


def test_cached_decoding_equals_full_recompute_and_respects_the_layout(setup):
    model, processor, _, question = setup
    # greedy: sampling among near-tied logits would amplify float noise between the two paths
    cached = generate_speech_answer(model, processor, spoken(question), max_steps=12, audio_top_k=1)
    full = generate_speech_answer(model, processor, spoken(question), max_steps=12, audio_top_k=1, use_cache=False)
    assert torch.equal(cached.layout, full.layout)
    check_layout_rules(cached.layout, processor.layout)
    assert cached.codes.shape[0] == processor.layout.num_audio_streams
    assert cached.steps == 12 and set(cached.timings) >= {"features", "prefill", "decode", "total"}


@pytest.mark.parametrize("strategy", ["single_pass", "batch_parallel"])
def test_static_cache_gives_the_same_answer_as_the_dynamic_cache(setup, strategy):
    model, processor, _, question = setup
    dynamic = generate_speech_answer(model, processor, spoken(question), max_steps=10, strategy=strategy, audio_top_k=1)
    static = generate_speech_answer(model, processor, spoken(question), max_steps=10, strategy=strategy, audio_top_k=1,
                                    cache_implementation="static")
    assert torch.equal(dynamic.layout, static.layout)


def test_batch_parallel_text_is_the_text_only_answer(setup):
    """The authors' decoding: the text stream comes from a text-only copy, so it equals the plain
    greedy text answer, while the audio streams still speak (and differ from single-pass audio)."""
    model, processor, _, question = setup
    steps = 10
    parallel = generate_speech_answer(model, processor, spoken(question), max_steps=steps, strategy="batch_parallel",
                                      text_repetition_penalty=1.0, audio_top_k=1)
    text_only = generate_text_answers(model, processor, [spoken(question)], max_new_tokens=steps)[0]
    assert parallel.text == text_only
    single = generate_speech_answer(model, processor, spoken(question), max_steps=steps, text_repetition_penalty=1.0,
                                    audio_top_k=1)
    assert not torch.equal(single.layout[0], parallel.layout[0])  # one sequence's text is conditioned on its audio
    check_layout_rules(parallel.layout, processor.layout)


def test_expert_load_counts_every_routed_token(setup):
    model, processor, _, question = setup
    top_k = model.config.text_config.num_experts_per_tok
    for strategy in ("single_pass", "batch_parallel"):
        config = SpeechDecodingConfig(strategy=strategy, max_steps=8)
        from deeptalk.generation import DecodeResult, decode_steps

        result = DecodeResult()
        list(decode_steps(model, processor, spoken(question), config, result, output_expert_load=True))
        per_layer = result.expert_load.sum(dim=(1, 2))
        expected = (result.prompt_length + result.forward_rows) * top_k
        assert torch.equal(per_layer, torch.full_like(per_layer, expected)), strategy
        assert result.expert_load[:, 1].sum() > 0  # the spoken question's positions are speech tokens
    assert result.forward_rows > 7  # batch-parallel ran the text-only copy too


def test_sampling_is_seeded(setup):
    model, processor, _, question = setup
    a = generate_speech_answer(model, processor, spoken(question), max_steps=8, seed=3)
    b = generate_speech_answer(model, processor, spoken(question), max_steps=8, seed=3)
    c = generate_speech_answer(model, processor, spoken(question), max_steps=8, seed=4)
    assert torch.equal(a.layout, b.layout) and not torch.equal(a.layout[1:], c.layout[1:])


def test_the_layout_rules_apply_to_every_stream_at_once():
    """One step of the sampler on hand-made logits: before its delay a stream holds PAD_A (the voice at step 0),
    then samples codes (never a special, even a likelier one); the first stream's EOA ends every stream at that
    frame (the same step for equal delays); PAD_A after. The result is exactly the training layout."""
    from deeptalk.configuration_deeptalk import AUDIO_SPECIAL_TOKENS, SpeechTokenLayout, voice_token
    from deeptalk.generation_deeptalk import _StepSampler

    layout = SpeechTokenLayout(text_vocab_size=10, num_audio_streams=4, codebook_size=8, eot_id=1, pad_t_id=2,
                               delays=[1, 1, 2, 4], audio_special_tokens=[*AUDIO_SPECIAL_TOKENS, voice_token("a")])
    sampler = _StepSampler(layout, SpeechDecodingConfig(audio_top_k=3, voice="a"), torch.device("cpu"),
                           torch.Generator().manual_seed(0))
    frames = 2
    columns = []
    for step in range(max(layout.delays) + frames + 2):
        logits = torch.zeros(layout.vocab_size)
        for i in range(layout.num_audio_streams):
            start = layout.stream_offset(i + 1)
            logits[start + (step + i) % 8] = 100.0  # the one likely code
            logits[start + layout.codebook_size : start + layout.audio_block_size] = 200.0  # specials: never sampled
        if step - layout.delays[0] != frames:
            logits[layout.audio_special_id("<|eoa|>", 0)] = -100.0  # the first stream ends at `frames`, not before
        columns.append(sampler.audio_tokens(logits, step).tolist())
    codes = torch.tensor([[(f + d + i) % 8 for f in range(frames)] for i, d in enumerate(layout.delays)])
    expected = layout.build_delayed_layout([5], codes, voice="a")[1:]
    grid = torch.tensor(columns).T
    assert torch.equal(grid[:, : expected.shape[1]], expected)
    assert (grid[:, expected.shape[1]:] == layout.audio_special_ids("<|pad_a|>")[:, None]).all()


def test_audio_sampling_draws_among_the_top_k_codes_of_every_stream():
    from deeptalk.configuration_deeptalk import SpeechTokenLayout
    from deeptalk.generation_deeptalk import _StepSampler

    layout = SpeechTokenLayout(text_vocab_size=10, num_audio_streams=3, codebook_size=16, eot_id=1, pad_t_id=2,
                               delays=[0, 0, 0])
    logits = torch.zeros(layout.vocab_size)
    for i in range(3):  # codes 4, 5, 6 tie at the top; 7 is next
        logits[layout.stream_offset(i + 1) + torch.tensor([4, 5, 6, 7])] = torch.tensor([5.0, 5.0, 5.0, 4.0])
    logits[layout.audio_special_id("<|eoa|>", 0)] = -1e4
    config = SpeechDecodingConfig(audio_top_k=3)
    sampler = _StepSampler(layout, config, torch.device("cpu"), torch.Generator().manual_seed(0))
    drawn = torch.stack([sampler.audio_tokens(logits, 0) for _ in range(300)]) - torch.tensor(
        [layout.stream_offset(i + 1) for i in range(3)])
    for i in range(3):
        assert set(drawn[:, i].tolist()) == {4, 5, 6}, i
    again = _StepSampler(layout, config, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(again.audio_tokens(logits, 0), drawn[0] + torch.tensor([layout.stream_offset(i + 1) for i in range(3)]))


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(strategy="beam"), ["strategy", "single_pass"]),
        (dict(cache_implementation="paged"), ["cache_implementation", "static"]),
        (dict(audio_top_k=0), ["audio_top_k"]),
        (dict(max_steps=0), ["max_steps"]),
        (dict(audio_temperature=0), ["temperature"]),
    ],
)
def test_bad_decoding_options_are_named(options, words):
    with pytest.raises(ValueError) as err:
        SpeechDecodingConfig(**options)
    assert all(w in str(err.value) for w in words)


def test_unknown_voice_is_refused_with_the_known_voices(setup):
    model, processor, _, question = setup
    with pytest.raises(ValueError, match="Unknown voice 'alice'"):
        generate_speech_answer(model, processor, spoken(question), max_steps=4, voice="alice")


# ---------------------------------------------------------------------------------------------- SpeechChat
@contextmanager
def speaking_to_the_end(model, layout):
    """The first audio stream's EOA made impossible: the untrained model speaks until max_steps, whatever the
    sampling draws, so a streaming test always has several chunks to check."""
    eoa = layout.audio_special_id("<|eoa|>", 0)

    def no_end(module, args, output):
        output[..., eoa] = float("-inf")

    handle = model.lm_head.register_forward_hook(no_end)
    try:
        yield
    finally:
        handle.remove()


def test_chat_stream_events_add_up_to_the_reply(setup):
    model, processor, codec, question = setup
    chat = SpeechChat(model, processor, codec, chunk_frames=4, first_chunk_frames=2, output_expert_load=True)
    with speaking_to_the_end(model, processor.layout):
        events = list(chat.stream(audio=question, max_steps=30))
    reply = events[-1]
    assert isinstance(reply, ChatReply)
    texts = [e for e in events if isinstance(e, TextDelta)]
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert "".join(t.text for t in texts) == reply.text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    spf = codec.samples_per_frame
    assert chunks[0].waveform.size == 2 * spf and all(c.waveform.size == 4 * spf for c in chunks[1:-1])
    assert np.array_equal(np.concatenate([c.waveform for c in chunks]), reply.waveform)
    offline = codec.decode(reply.codes).numpy()
    assert reply.waveform.shape == offline.shape == (reply.codes.shape[1] * spf,)
    snr = 10 * np.log10((offline**2).sum() / ((reply.waveform - offline) ** 2).sum())
    # MelVQ's Griffin-Lim joins chunks closely, not exactly, on the random codes of an untrained model
    assert snr > 30, f"streamed audio differs from the offline decode ({snr:.1f} dB)"
    t = reply.timings
    assert 0 < t["first_audio_chunk"] <= t["total"] and t["steps_to_first_audio_chunk"] == max(processor.layout.delays) + 2 + codec.default_decode_context
    assert chunks[0].elapsed_s == pytest.approx(t["first_audio_chunk"], abs=1e-3)
    assert reply.expert_load.shape == (len(model.config.moe_layer_indices), 2, model.config.num_routed_experts)
    assert reply.history[-1] == {"role": "assistant", "content": reply.text}


def test_chat_takes_arrays_text_and_history(setup):
    import soundfile

    model, processor, codec, question = setup
    chat = SpeechChat(model, processor, codec)
    array, rate = soundfile.read(question, dtype="float32")
    from_file = chat(audio=question, max_steps=6)
    from_array = chat(audio=(array, rate), max_steps=6)
    from_gradio = chat(audio=(rate, array), max_steps=6)  # gradio's (rate, array) order
    assert from_file.text == from_array.text == from_gradio.text
    assert torch.equal(from_file.layout, from_array.layout)
    follow_up = chat(text="why", history=from_file.history, max_steps=6)
    assert len(follow_up.history) == 4 and follow_up.history[:2] == from_file.history
    with pytest.raises(ValueError, match="Ask something"):
        chat(max_steps=4)
    with pytest.raises(ValueError, match="audio must be"):
        chat(audio=123, max_steps=4)
    with pytest.raises(ValueError, match="Unknown decoding option"):
        chat(audio=question, temperature=0.5)


def test_chat_from_pretrained_folder_gives_the_same_reply(setup, tmp_path):
    model, processor, codec, question = setup
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    codec.save_pretrained(tmp_path / "codec")
    loaded = SpeechChat.from_pretrained(str(tmp_path))
    in_memory = SpeechChat(model, processor, codec)(audio=question, max_steps=8)
    reply = loaded(audio=question, max_steps=8)
    assert torch.equal(reply.layout, in_memory.layout)
    assert np.allclose(reply.waveform, in_memory.waveform, atol=1e-5)


# ---------------------------------------------------------------------------------------------- voices
def test_voice_tokens_condition_training_and_generation(setup):
    _, _, codec, question = setup
    processor = build_demo_processor(build_demo_tokenizer(), codec, voices=["assistant", "f10"])
    layout = processor.layout
    assert layout.voices == ["assistant", "f10"]
    codes = torch.randint(0, codec.codebook_size, (codec.num_streams, 5))
    conversation = spoken(question) + [{"role": "assistant", "voice": "f10",
                                        "content": [{"type": "text", "text": "yes"}, {"type": "audio", "audio_codes": codes}]}]
    encoded = processor(conversation)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    answer_start = int((labels[0] != -100).nonzero()[0])  # the first answer step
    assert ids[1:, answer_start].tolist() == layout.voice_ids("f10")
    assert (labels[1:, answer_start] == -100).all()  # the voice is a condition, not a target
    assert torch.equal(layout.undelay_layout(layout.build_delayed_layout([5], codes, voice="f10"))[1], codes)

    torch.manual_seed(0)
    model = speech_model(processor).eval()
    with torch.no_grad():  # as after training: the voices' embeddings differ (fresh rows start near the mean)
        audio_rows = model.get_input_embeddings().audio_weight
        rows = torch.tensor(layout.voice_ids("f10")) - layout.text_vocab_size
        audio_rows[rows] += torch.randn(codec.num_streams, audio_rows.shape[1]) * 0.5
    by_voice = {v: generate_speech_answer(model, processor, spoken(question), max_steps=6, voice=v, audio_top_k=1)
                for v in ("assistant", "f10")}
    assert by_voice["f10"].layout[1:, 0].tolist() == layout.voice_ids("f10")
    assert not torch.equal(by_voice["f10"].layout[1:, 1:], by_voice["assistant"].layout[1:, 1:])
    reply = SpeechChat(model, processor, codec, SpeechDecodingConfig(audio_top_k=1))(audio=question, max_steps=6)
    assert torch.equal(reply.layout, by_voice["assistant"].layout)  # the model's first voice by default
    with pytest.raises(ValueError, match=r"voices are \['assistant', 'f10'\]"):
        generate_speech_answer(model, processor, spoken(question), max_steps=2, voice="m29")


def test_one_chat_serves_concurrent_requests_one_at_a_time(setup):
    """Blocks share one RoutingState per model: two threads on one chat must not interleave."""
    from concurrent.futures import ThreadPoolExecutor

    model, processor, codec, question = setup
    chat = SpeechChat(model, processor, codec, output_expert_load=True)
    expected = [chat(audio=question, max_steps=8, seed=s) for s in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda s: chat(audio=question, max_steps=8, seed=s), (0, 1)))
    for reply, reference in zip(replies, expected):
        assert torch.equal(reply.layout, reference.layout)
        assert torch.equal(reply.expert_load, reference.expert_load)


def test_prompts_past_the_context_and_audio_without_a_rate_are_refused_clearly(setup):
    import numpy as np

    from deeptalk.generation.chat import user_message

    model, processor, codec, _ = setup
    with pytest.raises(ValueError, match="needs the sampling rate in Hz as a number, got None"):
        user_message(audio=(np.zeros(1600, dtype=np.float32), None))
    long = [{"role": "user", "content": "is seven bigger than three " * 300}]
    with pytest.raises(ValueError, match=r"past the model's context of \d+\. Shorten the conversation"):
        generate_speech_answer(model, processor, long, max_steps=4)
