"""The CTC audio adapter (`config.audio_adapter == "ctc"`): greedy emissions, compression into the clip's span,
the CTC loss on transcripts from the processor, saving/loading, and generation from a spoken prompt."""

import pytest
import torch
from conftest import convert
from test_speech_model import CODEBOOK, STREAMS, layout, spoken_batch, whisper_config
from transformers import AutoModelForCausalLM

from deeptalk.modeling_deeptalk import (
    audio_ctc_loss,
    greedy_ctc_emissions,
    right_aligned_destinations,
)

BLANK = 4


def one_hot_logits(classes: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), BLANK + 1).float() * 10


@pytest.fixture
def ctc_model(tiny_source):
    model = convert(tiny_source("qwen3_moe"))
    return model.add_speech(layout(), audio_config=whisper_config(), audio_adapter="ctc").eval()


def test_greedy_emissions_collapse_repeats_and_drop_blanks_within_each_clip():
    # clip 1: a a _ a b   clip 2: b b _   (the second clip's first b follows clip 1's b: still emitted)
    logits = one_hot_logits([0, 0, BLANK, 0, 1, 1, 1, BLANK])
    emitted = greedy_ctc_emissions(logits, torch.tensor([5, 3]))
    assert emitted.tolist() == [True, False, False, True, True, True, False, False]


def test_emitted_positions_move_to_the_end_of_their_clip_in_order():
    emitted = torch.tensor([True, False, False, True, True, True, False, False])
    destinations = right_aligned_destinations(emitted, torch.tensor([5, 3]))
    assert destinations[emitted].tolist() == [2, 3, 4, 7]


def test_ctc_loss_is_per_transcript_token_and_skips_clips_without_one():
    torch.manual_seed(0)
    logits = torch.randn(8, BLANK + 1, requires_grad=True)
    positions = torch.tensor([5, 3])
    transcripts = torch.tensor([[0, 1, 0], [-100, -100, -100]])
    loss = audio_ctc_loss(logits, positions, transcripts)
    reference = torch.nn.functional.ctc_loss(logits[:5].log_softmax(-1)[:, None], torch.tensor([[0, 1, 0]]),
                                             torch.tensor([5]), torch.tensor([3]), blank=BLANK, reduction="sum") / 3
    assert torch.allclose(loss, reference)
    loss.backward()
    assert logits.grad[5:].abs().sum() == 0 and logits.grad[:5].abs().sum() > 0
    assert audio_ctc_loss(logits, positions, torch.full((2, 2), -100)).item() == 0.0
    with pytest.raises(ValueError, match="one row per audio clip"):
        audio_ctc_loss(logits, positions, transcripts[:1])


def emit_everywhere(ctc_model, token: int):
    """Make the CTC head emit `token` at every position: one emission per clip, at the span's end."""
    head = ctc_model.model.audio_adapter.ctc_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token] = 10.0


def column(text_id: int, audio_ids) -> torch.Tensor:
    """One input position: a text id and one id per audio stream."""
    return torch.tensor([text_id, *audio_ids])


def test_the_span_carries_typed_text_embeddings_where_ctc_emits(ctc_model):
    inputs, _ = spoken_batch(ctc_model)
    emit_everywhere(ctc_model, 7)
    with torch.no_grad():
        embeds = ctc_model.model.embed_inputs(**inputs)
        placeholders = ctc_model.model.embed_inputs(inputs["input_ids"])
    typed = ctc_model.model.embed_tokens.weight[7]  # stream_embedding_mean="non_pad": the text slot alone
    for b, mask in enumerate(inputs["audio_input_mask"]):
        span = mask.nonzero().flatten()
        assert torch.allclose(embeds[b, span[-1]], typed, atol=1e-4)
        assert torch.equal(embeds[b, span[:-1]], placeholders[b, span[:-1]])
        assert torch.equal(embeds[b, ~mask], placeholders[b, ~mask])


def test_transcripts_train_the_ctc_head_through_the_loss(ctc_model):
    inputs, labels = spoken_batch(ctc_model)
    transcripts = torch.tensor([[5, 6, 7], [8, -100, -100]])
    ctc_model.train()
    out = ctc_model(**inputs, labels=labels, audio_transcript_ids=transcripts)
    without = ctc_model(**inputs, labels=labels)
    assert out.audio_ctc_loss is not None and without.audio_ctc_loss is None
    weight = ctc_model.config.audio_ctc_loss_weight
    assert torch.allclose(out.loss, without.loss + weight * out.audio_ctc_loss, rtol=1e-5)
    out.loss.backward()
    assert ctc_model.model.audio_adapter.ctc_head.weight.grad.abs().sum() > 0
    assert ctc_model.model.audio_adapter.proj_in.weight.grad.abs().sum() > 0


def test_a_stack_adapter_ignores_transcripts(tiny_source):
    model = convert(tiny_source("qwen3_moe")).add_speech(layout(), audio_config=whisper_config()).eval()
    inputs, labels = spoken_batch(model)
    out = model(**inputs, labels=labels, audio_transcript_ids=torch.tensor([[5], [6]]))
    assert out.audio_ctc_loss is None and not hasattr(model.model.audio_adapter, "ctc_head")


class FixedClasses(torch.nn.Module):
    """A CTC head that ignores its input and scores `classes` (one per position, clips end to end)."""

    def __init__(self, classes: list[int], num_classes: int):
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float() * 10)

    def forward(self, features):
        assert features.shape[0] == self.logits.shape[0]
        return self.logits


def test_heard_token_ids_are_each_clips_greedy_ctc_transcript(ctc_model):
    inputs, _ = spoken_batch(ctc_model)  # clips of 100 and 60 mel frames
    first, second = (ctc_model.config.num_audio_positions(n) for n in (100, 60))
    blank = ctc_model.config.text_vocab_size
    # clip 1: 7 7 _ 7 9 then blanks; clip 2 starts with the 9 clip 1 ended on (a new clip: emitted again)
    classes = [7, 7, blank, 7, 9] + [blank] * (first - 5) + [9, 9, 12] + [blank] * (second - 3)
    ctc_model.model.audio_adapter.ctc_head = FixedClasses(classes, blank + 1)
    heard = ctc_model.model.heard_token_ids(inputs["input_features"], inputs["audio_feature_lengths"])
    assert heard == [[7, 7, 9], [9, 12]]


def test_heard_token_ids_need_the_ctc_adapter(tiny_source):
    model = convert(tiny_source("qwen3_moe")).add_speech(layout(), audio_config=whisper_config()).eval()
    inputs, _ = spoken_batch(model)
    with pytest.raises(ValueError, match="needs the CTC adapter"):
        model.model.heard_token_ids(inputs["input_features"], inputs["audio_feature_lengths"])


def test_saved_ctc_model_loads_with_the_same_logits_on_a_spoken_prompt(ctc_model, tmp_path):
    ctc_model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.audio_adapter == "ctc"
    inputs, _ = spoken_batch(ctc_model, lengths=(100,))
    prompt = dict(inputs)
    prompt["input_ids"] = inputs["input_ids"][..., : int(inputs["audio_input_mask"].sum()) + 1]
    prompt["audio_input_mask"] = inputs["audio_input_mask"][:, : prompt["input_ids"].shape[-1]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**prompt).logits, ctc_model(**prompt).logits)
    assert loaded.config.num_audio_streams == STREAMS and loaded.config.layout.codebook_size == CODEBOOK


def test_unknown_adapter_and_bad_dropout_are_refused(tiny_source):
    with pytest.raises(ValueError, match="audio_adapter='conv': choose one of"):
        convert(tiny_source("qwen3_moe")).add_speech(layout(), audio_config=whisper_config(), audio_adapter="conv")
    with pytest.raises(ValueError, match=r"audio_adapter_dropout=1.0 must be in \[0, 1\)"):
        convert(tiny_source("qwen3_moe")).add_speech(layout(), audio_config=whisper_config(), audio_adapter_dropout=1.0)


def test_adapter_dropout_acts_only_in_training(tiny_source):
    model = convert(tiny_source("qwen3_moe")).add_speech(layout(), audio_config=whisper_config(), audio_adapter="ctc",
                                                         audio_adapter_dropout=0.5)
    inputs, _ = spoken_batch(model)
    features, lengths = inputs["input_features"], inputs["audio_feature_lengths"]
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.model.encode_audio(features, lengths), model.model.encode_audio(features, lengths))
        model.train()
        assert not torch.equal(model.model.encode_audio(features, lengths), model.model.encode_audio(features, lengths))


def test_processor_turns_audio_transcripts_into_padded_ctc_targets():
    import numpy as np

    from deeptalk import DeepTalkProcessor
    from deeptalk.processing.tokenizer import train_demo_tokenizer

    tokenizer = train_demo_tokenizer(["what does the dog say woof", "hello there"], vocab_size=120)
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, 2, 8)
    clip = {"array": np.sin(np.arange(16000) / 7.0).astype(np.float32) * 0.3, "sampling_rate": 16000}

    def asked(transcript):
        part = {"type": "audio", "audio": clip} | ({"transcript": transcript} if transcript else {})
        return [{"role": "user", "content": [part]}, {"role": "assistant", "content": "woof"}]

    examples = [processor.encode_conversation(asked(t)) for t in ("what does the dog say", None, "hello")]
    assert examples[1]["audio_transcript_ids"] == [[]]
    batch = processor.pad(examples)
    expected = [tokenizer("what does the dog say", add_special_tokens=False)["input_ids"], [],
                tokenizer("hello", add_special_tokens=False)["input_ids"]]
    longest = max(map(len, expected))
    assert batch["audio_transcript_ids"].tolist() == [row + [-100] * (longest - len(row)) for row in expected]
    assert "audio_transcript_ids" not in processor.pad([examples[1]])


def test_hidden_placeholders_make_the_spoken_prompt_read_as_the_typed_one(ctc_model):
    """A clip whose CTC head emits token 7 once reads, for the LLM, exactly as a prompt with token 7 typed in
    its place: same logits at every visible position, and the same next step from the cache (the hidden
    positions are kept on it, and the positions after them do not count them)."""
    lay = layout()
    emit_everywhere(ctc_model, 7)
    frames = 100
    span = ctc_model.config.num_audio_positions(frames)
    pad_a = [lay.audio_special_id("<|pad_a|>", i) for i in range(STREAMS)]
    audio_in = lay.audio_special_ids("<|audio_in|>").tolist()
    before, after = [column(t, pad_a) for t in (11, 12)], [column(t, pad_a) for t in (13, 14)]
    spoken = torch.stack(before + [column(lay.pad_t_id, audio_in)] * span + after, dim=1)[None]
    typed = torch.stack(before + [column(7, pad_a)] + after, dim=1)[None]
    audio_mask = torch.zeros(1, spoken.shape[-1], dtype=torch.bool)
    audio_mask[0, 2:2 + span] = True
    features = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(0))
    step = column(15, pad_a).view(1, -1, 1)
    with torch.no_grad():
        heard = ctc_model(input_ids=spoken, input_features=features, audio_feature_lengths=torch.tensor([frames]),
                          audio_input_mask=audio_mask, use_cache=True)
        reference = ctc_model(input_ids=typed, use_cache=True)
        visible = torch.cat([torch.arange(2), torch.tensor([1 + span]), torch.arange(2 + span, spoken.shape[-1])])
        torch.testing.assert_close(heard.logits[0, visible], reference.logits[0], atol=1e-4, rtol=1e-4)
        assert torch.isfinite(heard.logits).all()
        next_heard = ctc_model(input_ids=step, cache=heard.cache,
                               attention_mask=torch.ones(1, spoken.shape[-1] + 1, dtype=torch.long))
        next_reference = ctc_model(input_ids=step, cache=reference.cache)
    torch.testing.assert_close(next_heard.logits, next_reference.logits, atol=1e-4, rtol=1e-4)
    embeds, mask = ctc_model.model.embed_prompt(spoken, None, features, torch.tensor([frames]), audio_mask)
    assert mask[0].tolist() == [1, 1] + [0] * (span - 1) + [1] * 3


@pytest.mark.parametrize("hide_markers", [True, False])
def test_a_heard_question_in_its_span_markers_reads_as_the_typed_question(ctc_model, hide_markers):
    """With the processor's `<|boa|>` / `<|eoa|>` around the clip, the LLM reads a clip whose head emits
    token 7 exactly as the prompt with 7 typed and no markers: the markers are hidden with the placeholders.
    Switched off (`audio_ctc_hide_span_markers=False`), the markers stay and the logits differ."""
    ctc_model.config.audio_ctc_hide_span_markers = hide_markers
    lay = layout()
    emit_everywhere(ctc_model, 7)
    frames = 100
    span = ctc_model.config.num_audio_positions(frames)
    pad_a = [lay.audio_special_id("<|pad_a|>", i) for i in range(STREAMS)]
    boa, audio_in, eoa = (lay.audio_special_ids(name).tolist() for name in ("<|boa|>", "<|audio_in|>", "<|eoa|>"))
    spoken = torch.stack([column(11, pad_a), column(lay.pad_t_id, boa)] + [column(lay.pad_t_id, audio_in)] * span
                         + [column(lay.pad_t_id, eoa), column(13, pad_a)], dim=1)[None]
    typed = torch.stack([column(11, pad_a), column(7, pad_a), column(13, pad_a)], dim=1)[None]
    audio_mask = torch.zeros(1, spoken.shape[-1], dtype=torch.bool)
    audio_mask[0, 2:2 + span] = True
    features = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        heard = ctc_model(input_ids=spoken, input_features=features, audio_feature_lengths=torch.tensor([frames]),
                          audio_input_mask=audio_mask).logits
        reference = ctc_model(input_ids=typed).logits
    _, mask = ctc_model.model.embed_prompt(spoken, None, features, torch.tensor([frames]), audio_mask)
    marker = int(not hide_markers)
    assert mask[0].tolist() == [1, marker] + [0] * (span - 1) + [1, marker, 1]
    same = torch.allclose(heard[0, [0, 1 + span, 3 + span]], reference[0], atol=1e-4, rtol=1e-4)
    assert same == hide_markers
