"""The multi-stream delayed layout: exact build/invert and clear errors."""

import pytest
import torch

from deeptalk.processing.layout import SpeechTokenLayout


def snac_like(**overrides):
    # the paper's shape: 7 audio streams, delays 1..7, codebooks of 4096
    kwargs = dict(text_vocab_size=1000, num_audio_streams=7, codebook_size=4096, eot_id=5, pad_t_id=6)
    kwargs.update(overrides)
    return SpeechTokenLayout(**kwargs)


def test_vocabulary_blocks():
    layout = snac_like()
    assert layout.audio_block_size == 4096 + 4
    assert layout.vocab_size == 1000 + 7 * 4100
    assert layout.stream_range(0) == (0, 1000)
    assert layout.stream_range(3) == (1000 + 2 * 4100, 1000 + 3 * 4100)
    assert layout.audio_special_id("<|eoa|>", 0) == 1000 + 4096


def test_build_places_delays_eot_pads_and_eoa():
    layout = snac_like(num_audio_streams=2, codebook_size=10)
    grid = layout.build_delayed_layout([11, 12, 13, 14, 15, 16], torch.tensor([[1, 2, 3], [4, 5, 6]]))
    pad_a0, pad_a1 = layout.audio_special_id("<|pad_a|>", 0), layout.audio_special_id("<|pad_a|>", 1)
    eoa0, eoa1 = layout.audio_special_id("<|eoa|>", 0), layout.audio_special_id("<|eoa|>", 1)
    o1, o2 = layout.stream_offset(1), layout.stream_offset(2)
    assert grid.tolist() == [
        [11, 12, 13, 14, 15, 16, 5],  # text runs ahead of speech, then EOT
        [pad_a0, o1 + 1, o1 + 2, o1 + 3, eoa0, pad_a0, pad_a0],  # stream 0 delayed by 1
        [pad_a1, pad_a1, o2 + 4, o2 + 5, o2 + 6, eoa1, pad_a1],  # stream 1 delayed by 2
    ]


@pytest.mark.parametrize("text_len, frames", [(0, 5), (3, 0), (40, 6), (2, 30)])
def test_build_and_undelay_are_exact_inverses(text_len, frames):
    layout = snac_like()
    gen = torch.Generator().manual_seed(text_len + frames)
    text = torch.randint(7, 1000, (text_len,), generator=gen)
    codes = torch.randint(0, 4096, (7, frames), generator=gen)
    grid = layout.build_delayed_layout(text, codes)
    assert grid.shape == (8, max(text_len + 1, 7 + frames + 1))
    for stream in range(8):  # every id sits in its own stream's block
        start, end = layout.stream_range(stream)
        assert ((grid[stream] >= start) & (grid[stream] < end)).all()
    text_back, codes_back = layout.undelay_layout(grid)
    assert torch.equal(text_back, text) and torch.equal(codes_back, codes)


def test_single_codebook_codec_is_one_stream_with_delay_one():
    layout = snac_like(num_audio_streams=1, codebook_size=256)
    assert layout.delays == [1]
    codes = torch.arange(9).unsqueeze(0)
    assert torch.equal(layout.undelay_layout(layout.build_delayed_layout([7, 8], codes))[1], codes)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.tensor([[0, 4096]] * 7), r"codes must lie in \[0, 4096\)"),
        (torch.tensor([[-1, 3]] * 7), r"codes must lie in \[0, 4096\)"),
        (torch.zeros(6, 3, dtype=torch.long), r"num_audio_streams=7"),
    ],
)
def test_bad_codes_are_rejected(codes, message):
    with pytest.raises(ValueError, match=message):
        snac_like().build_delayed_layout([7], codes)


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="one delay per stream"):
        snac_like(delays=[1, 2])
    with pytest.raises(ValueError, match="eot_id=5000 is not a text id"):
        snac_like(eot_id=5000)
    with pytest.raises(ValueError, match=r"text ids must lie in \[0, 1000\)"):
        snac_like().build_delayed_layout([1200], torch.zeros(7, 1, dtype=torch.long))
