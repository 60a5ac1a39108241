"""The model's speech side: extended vocabulary, multi-stream embeddings and loss, Whisper input."""

import pytest
import torch
from conftest import convert, random_ids
from transformers import AutoModelForCausalLM

from deeptalk.tiny import tiny_whisper_config
from deeptalk.hub import logits_via_remote_code
from deeptalk.processing.layout import SpeechTokenLayout

STREAMS, CODEBOOK = 3, 16


def whisper_config():
    return tiny_whisper_config(d_model=32, encoder_layers=2)


@pytest.fixture
def speech_model(tiny_source):
    model = convert(tiny_source("qwen3_moe"))
    return model.add_speech(layout(), audio_config=whisper_config()).eval()


def layout():
    return SpeechTokenLayout(text_vocab_size=128, num_audio_streams=STREAMS, codebook_size=CODEBOOK, eot_id=2, pad_t_id=0)


def spoken_batch(model, lengths=(100, 60), seed=0):
    """User audio at the start (AUDIO_IN placeholders), then an assistant turn in the delayed layout."""
    gen = torch.Generator().manual_seed(seed)
    lay = layout()
    turn = lay.build_delayed_layout(torch.randint(3, 128, (4,), generator=gen), torch.randint(0, CODEBOOK, (STREAMS, 5), generator=gen))
    positions = [model.config.num_audio_positions(n) for n in lengths]
    prefix = max(positions)
    ids = torch.zeros(len(lengths), 1 + STREAMS, prefix + turn.shape[1], dtype=torch.long)
    ids[:, 1:, :prefix] = lay.audio_special_ids("<|audio_in|>")[None, :, None]
    ids[:, :, prefix:] = turn
    mask = torch.zeros(len(lengths), ids.shape[-1], dtype=torch.bool)
    for b, n in enumerate(positions):
        mask[b, :n] = True
    labels = ids.clone()
    labels[:, :, :prefix] = -100
    features = torch.randn(len(lengths), 80, max(lengths), generator=gen)
    return dict(input_ids=ids, input_features=features, audio_feature_lengths=torch.tensor(lengths),
                audio_input_mask=mask), labels


def test_add_speech_extends_vocabulary_without_touching_text_logits(tiny_source):
    model = convert(tiny_source("deepseek_v2"))
    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
        model.add_speech(layout())
        after = model(ids).logits
    assert model.config.text_vocab_size == 128 and model.vocab_size == 128 + STREAMS * (CODEBOOK + 4)
    assert after.shape[-1] == model.vocab_size
    assert torch.equal(model.stream_logits(after, 0), before)
    assert model.config.stream_range(2) == (128 + 20, 128 + 40)
    with pytest.raises(ValueError, match="already has a speech vocabulary"):
        model.add_speech(layout())


def test_multi_stream_embedding_is_the_mean_of_the_streams(speech_model):
    ids = torch.stack([random_ids(shape=(1, 6))[0], torch.full((6,), 130), torch.full((6,), 151), torch.full((6,), 170)])[None]
    embedding = speech_model.get_input_embeddings()
    table = torch.cat([embedding.weight, embedding.audio_weight])
    expected = table[ids[0]].mean(dim=0, keepdim=True)
    assert torch.allclose(speech_model.model.embed_inputs(ids), expected)


def test_pad_a_slots_are_left_out_so_text_positions_embed_like_plain_text(speech_model):
    text = random_ids(shape=(1, 6))
    pads = [speech_model.config.layout.audio_special_id("<|pad_a|>", i) for i in range(STREAMS)]
    ids = torch.stack([text[0]] + [torch.full((6,), p) for p in pads])[None]
    ids[0, 1, 3:] = 131  # stream 1 speaks from step 3 on
    embedded = speech_model.model.embed_inputs(ids)
    embedding = speech_model.get_input_embeddings()
    table = torch.cat([embedding.weight, embedding.audio_weight])  # text rows, then audio rows
    assert torch.equal(embedded[0, :3], table[text[0, :3]])
    assert torch.allclose(embedded[0, 3:], (table[text[0, 3:]] + table[131]) / 2)
    with torch.no_grad():
        assert torch.allclose(speech_model(ids).logits[:, :3], speech_model(text[:, :3]).logits, atol=1e-5)
    speech_model.config.stream_embedding_mean = "all"  # the authors' plain mean
    assert torch.allclose(speech_model.model.embed_inputs(ids)[0, :3], table[ids[0, :, :3]].mean(dim=0))


def test_audio_features_are_spliced_and_the_loss_is_the_mean_over_streams(speech_model):
    inputs, labels = spoken_batch(speech_model)
    out = speech_model(**inputs, labels=labels, output_expert_load=True)
    assert out.stream_losses.shape == (1 + STREAMS,) and torch.isfinite(out.stream_losses).all()
    assert out.loss.item() == pytest.approx(out.stream_losses.mean().item(), rel=1e-5)
    assert out.logits.shape == (2, inputs["input_ids"].shape[-1], speech_model.vocab_size)
    # speech positions (audio input + codec codes) were routed as speech
    assert out.expert_load[:, 1].sum() > 0 and out.expert_load[:, 0].sum() > 0
    out.loss.backward()
    assert speech_model.model.audio_adapter.proj_in.weight.grad.abs().sum() > 0


def test_stream_without_labels_is_left_out_of_the_mean(speech_model):
    inputs, labels = spoken_batch(speech_model)
    labels[:, 2] = -100
    out = speech_model(**inputs, labels=labels)
    assert torch.isnan(out.stream_losses[2])
    kept = out.stream_losses[~out.stream_losses.isnan()]
    assert out.loss.item() == pytest.approx(kept.mean().item(), rel=1e-5)


def test_padding_frames_do_not_change_a_clip_features(speech_model):
    gen = torch.Generator().manual_seed(3)
    short = torch.randn(1, 80, 60, generator=gen)
    batch = torch.cat([torch.nn.functional.pad(short, (0, 40)), torch.randn(1, 80, 100, generator=gen)])
    with torch.no_grad():
        alone = speech_model.model.encode_audio(short, torch.tensor([60]))
        together = speech_model.model.encode_audio(batch, torch.tensor([60, 100]))
    assert alone.shape[0] == speech_model.config.num_audio_positions(60) == 8
    assert torch.allclose(together[: alone.shape[0]], alone, atol=1e-5)


def test_input_errors_name_the_problem(speech_model, tiny_source):
    inputs, labels = spoken_batch(speech_model)
    wrong = dict(inputs, audio_input_mask=inputs["audio_input_mask"].roll(1, dims=1) | inputs["audio_input_mask"])
    with pytest.raises(ValueError, match="adapter frames but audio_input_mask marks"):
        speech_model(**wrong)
    with pytest.raises(ValueError, match="need audio_input_mask"):
        speech_model(**{k: v for k, v in inputs.items() if k != "audio_input_mask"})
    bad_labels = labels.clone()
    bad_labels[0, 1, -1] = 5  # a text id in an audio stream
    with pytest.raises(ValueError, match=r"labels of stream\(s\) \[1\] hold ids outside their vocabulary blocks"):
        speech_model(**inputs, labels=bad_labels)
    with pytest.raises(ValueError, match="longer than the encoder's window"):
        speech_model.model.encode_audio(torch.randn(1, 80, 3100))
    with pytest.raises(ValueError, match="has no audio encoder"):
        convert(tiny_source("olmoe")).model.encode_audio(torch.randn(1, 80, 10))


def test_generate_with_audio_prompt_matches_a_manual_greedy_loop(tiny_source):
    model = convert(tiny_source("qwen3_moe")).add_speech(layout(), audio_config=whisper_config()).eval()
    features = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(0))
    positions = model.config.num_audio_positions(40)
    ids = torch.cat([torch.full((1, positions), 3), random_ids(shape=(1, 3))], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :positions] = True
    generated = model.generate(ids, input_features=features, audio_input_mask=mask, max_new_tokens=4,
                               do_sample=False, pad_token_id=0)
    manual = ids
    with torch.no_grad():
        for _ in range(4):
            step_mask = torch.nn.functional.pad(mask, (0, manual.shape[1] - mask.shape[1]))
            logits = model(manual, input_features=features, audio_input_mask=step_mask).logits
            manual = torch.cat([manual, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)


def test_speech_model_round_trips_and_loads_as_remote_code(speech_model, tmp_path):
    inputs, _ = spoken_batch(speech_model)
    speech_model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_audio_streams == STREAMS and reloaded.config.audio_config.d_model == 32
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, speech_model(**inputs).logits)
    text_ids = random_ids()
    remote, module = logits_via_remote_code(tmp_path, text_ids)
    with torch.no_grad():
        assert (remote - speech_model(text_ids).logits).abs().max() <= 1e-4


def test_text_stream_alone_embeds_like_the_full_layout(speech_model):
    inputs, _ = spoken_batch(speech_model)
    ids = inputs["input_ids"].clone()
    for i in range(STREAMS):  # a prompt: audio streams idle (PAD_A) except the AUDIO_IN slots
        pad = speech_model.config.layout.audio_special_id("<|pad_a|>", i)
        ids[:, 1 + i] = torch.where(inputs["audio_input_mask"], ids[:, 1 + i], pad)
    full = speech_model.model.embed_inputs(ids, inputs["input_features"], inputs["audio_feature_lengths"], inputs["audio_input_mask"])
    text_only = speech_model.model.embed_inputs(ids[:, 0], inputs["input_features"], inputs["audio_feature_lengths"], inputs["audio_input_mask"])
    assert torch.allclose(full, text_only, atol=1e-6)


def test_text_generation_on_a_speech_model_picks_text_ids_only(tiny_source):
    model = convert(tiny_source("qwen3_moe")).add_speech(layout()).eval()
    with torch.no_grad():
        model.lm_head.audio_weight.mul_(100)  # audio ids would win every step
        scores = model(random_ids(shape=(1, 5))).logits[0, -1]
        assert scores.argmax() >= 128
        out = model.generate(random_ids(shape=(1, 5)), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert (out < 128).all()
