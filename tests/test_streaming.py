"""Streaming speech: incremental codec decoding of the delayed layout, for every codec.

The joined chunks must equal one offline decode of the same codes (no clicks at the joins), chunks come
out as soon as their frames (plus the lookahead) exist, and the first chunk can be smaller."""

import numpy as np
import pytest
import torch
from test_codecs import CODEC_NAMES, _build, synth_utterance

from deeptalk.generation import IncrementalSpeechDecoder
from deeptalk.processing.layout import SpeechTokenLayout


@pytest.fixture(scope="module", params=CODEC_NAMES)
def codec_and_codes(request):
    torch.set_num_threads(1)
    codec = _build(request.param)
    codes = codec.encode(synth_utterance(3, sr=codec.sampling_rate, seconds=1.2), codec.sampling_rate)
    return request.param, codec, codes


def layout_for(codec):
    return SpeechTokenLayout(text_vocab_size=10, num_audio_streams=codec.num_streams, codebook_size=codec.codebook_size,
                             eot_id=1, pad_t_id=2)


def stream(codec, grid, layout, **options):
    decoder = IncrementalSpeechDecoder(codec, layout, **options)
    chunks, ready_at = [], []
    for step, column in enumerate(grid.T):
        new = decoder.push(column)
        chunks += new
        ready_at += [step] * len(new)
    chunks += decoder.flush()
    return decoder, chunks, ready_at


def snr_db(reference, estimate):
    error = ((reference - estimate) ** 2).sum()
    return float("inf") if error == 0 else 10 * np.log10(float((reference**2).sum() / error))


def test_joined_stream_equals_offline_decode(codec_and_codes):
    name, codec, codes = codec_and_codes
    layout = layout_for(codec)
    grid = layout.build_delayed_layout([3, 4, 5], codes)
    decoder, chunks, _ = stream(codec, grid, layout, chunk_frames=3, first_chunk_frames=2)
    joined, offline = torch.cat(chunks), codec.decode(codes)
    assert torch.equal(decoder.codes, codes)
    assert joined.shape == offline.shape
    assert snr_db(offline, joined) > 40, f"{name}: chunked decode is {snr_db(offline, joined):.1f} dB from offline"
    # no click: the biggest sample jump across any join is no bigger than the offline signal's there
    edges = np.cumsum([c.numel() for c in chunks])[:-1]
    for edge in edges:
        jump = float(joined[edge] - joined[edge - 1]) - float(offline[edge] - offline[edge - 1])
        assert abs(jump) < 0.05 * float(offline.abs().max())


def test_chunks_come_out_as_soon_as_their_frames_exist(codec_and_codes):
    _, codec, codes = codec_and_codes
    layout = layout_for(codec)
    grid = layout.build_delayed_layout([3], codes)
    look = 1
    _, chunks, ready_at = stream(codec, grid, layout, chunk_frames=4, first_chunk_frames=1, lookahead_frames=look)
    spf, last_delay = codec.samples_per_frame, max(layout.delays)
    sizes = [c.numel() // spf for c in chunks]
    assert sizes[0] == 1 and all(s == 4 for s in sizes[1:-1]) and sum(sizes) == codes.shape[1]
    # frame f is complete at step f + max(delay); a chunk ending at frame e also waits for `look` more frames
    ends = np.cumsum(sizes)[: len(ready_at)]
    assert ready_at == [int(e) - 1 + look + last_delay for e in ends]


def test_lookahead_is_what_keeps_the_joins_exact():
    codec = _build("snac")
    codes = codec.encode(synth_utterance(3, sr=codec.sampling_rate, seconds=1.2), codec.sampling_rate)
    layout = layout_for(codec)
    grid = layout.build_delayed_layout([3], codes)
    offline = codec.decode(codes)
    with_context = torch.cat(stream(codec, grid, layout, chunk_frames=2)[1])
    without = torch.cat(stream(codec, grid, layout, chunk_frames=2, lookahead_frames=0, context_frames=0)[1])
    assert snr_db(offline, with_context) > 60 > snr_db(offline, without)


def test_snac_with_wide_attention_windows_streams_exactly():
    """Windows of 4 frames (window 32, stride 8, as the 32/44 kHz SNACs): chunks are decoded from
    whole windows of real codes, so any chunking joins into the offline decode."""
    from test_codecs import TINY_SNAC_WINDOW32

    from deeptalk.processing.codecs import SNACCodec

    torch.manual_seed(0)
    codec = SNACCodec.from_config(**TINY_SNAC_WINDOW32)
    assert codec.default_decode_context == 8
    codes = codec.encode(synth_utterance(3, sr=codec.sampling_rate, seconds=1.2), codec.sampling_rate)
    layout = layout_for(codec)
    grid = layout.build_delayed_layout([3], codes)
    offline = codec.decode(codes)
    for first, size in ((1, 3), (2, 5)):
        joined = torch.cat(stream(codec, grid, layout, chunk_frames=size, first_chunk_frames=first)[1])
        assert snr_db(offline, joined) > 60


def test_the_tail_is_not_held_back_once_speech_has_ended():
    """Speech that ends before the text: at the step of the last EOA no more right context can come,
    so the held-back frames go out then, not at flush() when the text ends."""
    codec = _build("melvq")
    codes = codec.encode(synth_utterance(3, sr=codec.sampling_rate, seconds=0.3), codec.sampling_rate)
    layout = layout_for(codec)
    grid = layout.build_delayed_layout([3] * 40, codes)  # 40 text tokens outlast the speech
    decoder = IncrementalSpeechDecoder(codec, layout, chunk_frames=2, first_chunk_frames=1, lookahead_frames=4)
    last_eoa_step = max(layout.delays) + codes.shape[1]
    assert last_eoa_step + 1 < grid.shape[1]
    for column in grid.T[: last_eoa_step + 1]:
        decoder.push(column)
    assert decoder.emitted_frames == codes.shape[1]
    assert decoder.flush() == []


def test_snac_noise_follows_the_absolute_position():
    """SNAC's decoder adds seeded noise; a chunk decoded alone must get the noise of its position."""
    codec = _build("snac")
    codes = torch.randint(0, 256, (7, 12), generator=torch.Generator().manual_seed(0))
    full = codec.decode(codes)
    part = codec.decode_frames(codes, 5, 8, context=4)
    spf = codec.samples_per_frame
    assert torch.allclose(part, full[5 * spf : 8 * spf], atol=1e-4)


def test_codec_must_match_the_layout():
    codec = _build("melvq")
    wrong = SpeechTokenLayout(text_vocab_size=10, num_audio_streams=codec.num_streams + 1,
                              codebook_size=codec.codebook_size, eot_id=1, pad_t_id=2)
    with pytest.raises(ValueError, match="does not match the model's speech layout"):
        IncrementalSpeechDecoder(codec, wrong)
    with pytest.raises(ValueError, match="chunk_frames"):
        IncrementalSpeechDecoder(codec, layout_for(codec), chunk_frames=0)
    with pytest.raises(ValueError, match="lookahead_frames must be >= 0"):
        IncrementalSpeechDecoder(codec, layout_for(codec), lookahead_frames=-1)
