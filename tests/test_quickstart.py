"""The main job, `deeptalk quickstart`, end to end with a few steps per phase."""

import json
import os
import subprocess
import sys

import pytest
import soundfile
from transformers import AutoModelForCausalLM, AutoProcessor

import deeptalk
from deeptalk.quickstart import QuickstartSettings, run_quickstart


def test_quickstart_runs_every_phase_and_writes_its_outputs(tmp_path):
    settings = QuickstartSettings(output_dir=str(tmp_path), text_pretrain_steps=20, align_steps=3, speech_steps=3,
                                  text_steps=3, joint_steps=3, assignment_batches=2, judge_spoken_answers=False)
    summary = run_quickstart(settings)
    for key in ("original_text_qa_accuracy", "final_text_qa_accuracy", "spoken_qa_text_accuracy",
                "spoken_test_as_text_accuracy", "audio_token_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["num_threads"] == 1 and summary["majority_answer_share"] == 8 / 36 and summary["asr"]["wer"] >= 0
    assert set(summary["asr_heard"]) == {"wer", "cer"} and summary["asr_heard"]["wer"] >= 0  # the CTC adapter's own
    assert len(summary["targets"]) == 4 and summary["spoken_qa_speech"] == {"skipped": "judge_spoken_answers=False"}
    assert json.loads((tmp_path / "summary.json").read_text())["speech_experts"] == summary["speech_experts"]
    assert all(len(layer) == settings.num_speech_experts for layer in summary["speech_experts"])
    assert (tmp_path / "modality_load.png").read_bytes()[:4] == b"\x89PNG"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    assert isinstance(model, deeptalk.DeepTalkForCausalLM) and isinstance(processor, deeptalk.DeepTalkProcessor)
    assert model.config.speech_experts == summary["speech_experts"]
    phases = json.loads((tmp_path / "model" / "deeptalk_phases.json").read_text())
    assert [p["routing_mode"] for p in phases] == ["free", "speech_only", "text_only", "free"]
    # phase 2a leaves the dense first layer frozen (speech_phase_trains_dense_layers=False); phase 2b trains it
    assert "dense_layers" not in phases[1]["trainable_groups"] and "dense_layers" in phases[2]["trainable_groups"]
    assert model.config.audio_adapter == "ctc" and model.config.audio_ctc_hide_span_markers
    if summary["spoken_answer"]["wav"]:
        audio, rate = soundfile.read(summary["spoken_answer"]["wav"])
        assert rate == 16000 and len(audio) > 0

    # the chat and evaluate commands on what the quickstart wrote (real subprocesses)
    question = summary["spoken_answer"]["question"]
    from deeptalk.data import load_demo_corpus

    test_records = load_demo_corpus("spoken_qa", decode_audio=False)["test"]
    record = next(r for r in test_records if r["question_text"] == question)
    chat = subprocess.run([sys.executable, "-m", "deeptalk", "chat", "--model", str(tmp_path / "model"), "--audio",
                           record["question_audio"], "--out", str(tmp_path / "reply.wav"), "--max-steps", "40"],
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "decode steps" in chat.stderr
    assert "[heard: " in chat.stderr  # the CTC adapter's transcript of the question, before the answer
    if "codec frames" in chat.stderr:
        assert soundfile.info(str(tmp_path / "reply.wav")).samplerate == 16000
    evaluation = subprocess.run([sys.executable, "-m", "deeptalk", "evaluate", "--model", str(tmp_path / "model"),
                                 "--base-model", str(tmp_path / "original_llm"),
                                 "--output", str(tmp_path / "eval.json"), "--limit", "8", "--max-speech-steps", "30"],
                                capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    for key in ("text_qa_accuracy", "base_text_qa_accuracy", "spoken_qa_text_accuracy", "audio_token_accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    assert set(results["asr"]) == {"wer", "cer"}
    assert 0.0 <= results["spoken_qa_speech_accuracy"] <= 1.0
    from deeptalk.evaluation.judge import judge_available

    if judge_available():  # the Whisper judge by default, named, with its ceilings
        assert results["speech_answer_asr"].startswith("whisper-tiny.en") and results["judge"]["pad_seconds"] == 0.2
        ceilings = results["ceilings"]["answer_audio"]
        assert 0.5 <= ceilings["reference_audio"]["accuracy"] <= 1.0 and 0 <= ceilings["codec_round_trip"]["wer"]
    else:
        assert results["speech_answer_asr"] == "own"
    assert results["max_speech_steps"] == 30
    assert results["num_threads"] == 1  # --threads' default, whatever OMP_NUM_THREADS says

    # the Space for this model (the browser test is tests/test_space.py)
    space = subprocess.run([sys.executable, "-m", "deeptalk", "space", str(tmp_path / "space"), "--model",
                            str(tmp_path / "model")], capture_output=True, text=True, timeout=120)
    assert space.returncode == 0, space.stderr[-2000:]
    assert {"app.py", "requirements.txt", "README.md"} <= {p.name for p in (tmp_path / "space").iterdir()}
    assert "sdk: gradio" in (tmp_path / "space" / "README.md").read_text()


def _tiny_frozen_encoder():
    import torch

    from deeptalk.modeling_deeptalk import DeepTalkAudioEncoder
    from deeptalk.tiny import tiny_whisper_config

    torch.manual_seed(0)
    encoder = DeepTalkAudioEncoder(tiny_whisper_config(d_model=32, encoder_layers=2)).eval()
    encoder.requires_grad_(False)
    return encoder


def test_cached_encoder_outputs_encode_each_clip_once_at_its_real_length():
    import torch

    from deeptalk.quickstart import cached_encoder_outputs

    encoder = _tiny_frozen_encoder()
    lengths = torch.tensor([60, 41, 23])
    features = torch.randn(3, 80, 60)
    for i, n in enumerate(lengths.tolist()):
        features[i, :, n:] = 0.0  # as the collator pads
    alone = [encoder.encode(features[i : i + 1, :, :n], lengths[i : i + 1])[0][0]
             for i, n in enumerate(lengths.tolist())]
    with cached_encoder_outputs(encoder) as cache:
        hidden, steps = encoder.encode(features, lengths)
        assert steps.tolist() == [30, 21, 12] and len(cache) == 3
        for i, expected in enumerate(alone):
            assert torch.equal(hidden[i, : steps[i]], expected)
        # the same clips in another batch (other order, other padding) come from the cache
        again, _ = encoder.encode(torch.nn.functional.pad(features[[2, 0]], (0, 8)), lengths[[2, 0]])
        assert len(cache) == 3 and torch.equal(again[0, :12], alone[2]) and torch.equal(again[1, :30], alone[0])
        # a trainable encoder is run as usual, nothing cached
        encoder.layers[0].requires_grad_(True)
        encoder.encode(features[:1, :, :50], torch.tensor([50]))
        assert len(cache) == 3
    assert "encode" not in vars(encoder)  # the method is the class's again


def test_settings_refuse_a_bad_adapter_or_phase_1_loss_before_any_work():
    with pytest.raises(ValueError, match=r"audio_adapter='conv': choose one of \('stack', 'ctc'\)"):
        QuickstartSettings(audio_adapter="conv")
    with pytest.raises(ValueError, match=r"align_loss_type='mse': choose one of \('lm', 'ctc'\)"):
        QuickstartSettings(align_loss_type="mse")
    with pytest.raises(ValueError, match="set audio_adapter='ctc' or align_loss_type='lm'"):
        QuickstartSettings(align_loss_type="ctc", audio_adapter="stack")
    assert QuickstartSettings(align_loss_type="ctc").align_loss_type == "ctc"


def test_torch_threads_sets_and_restores_the_count():
    import pytest
    import torch

    from deeptalk.quickstart import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads=0 must be >= 1"), torch_threads(0):
        pass


def test_resolve_audio_encoder():
    from deeptalk.evaluation.judge import judge_available
    from deeptalk.quickstart import resolve_audio_encoder

    assert resolve_audio_encoder("random")[0] is None and resolve_audio_encoder(None)[0] is None
    assert resolve_audio_encoder("openai/whisper-medium")[0] == "openai/whisper-medium"
    name, why = resolve_audio_encoder("auto")
    if judge_available():
        assert name == "tiny.en" and "pretrained Whisper tiny.en (frozen)" in why
    else:
        assert name is None and 'pip install "deeptalk[whisper]"' in why


def test_the_same_seed_gives_the_same_model_whatever_omp_num_threads_says(tmp_path):
    """Two real runs of a tiny quickstart, with OMP_NUM_THREADS=1 and 2: the quickstart sets torch's thread count
    itself, so the trained weights are the same bit for bit and so are the figures."""
    import os

    script = ("import sys\nfrom deeptalk.quickstart import QuickstartSettings, run_quickstart\n"
              "run_quickstart(QuickstartSettings(output_dir=sys.argv[1], data_limit=24, text_pretrain_steps=6, "
              "align_steps=2, speech_steps=2, text_steps=2, joint_steps=2, assignment_batches=1, "
              "judge_spoken_answers=False, audio_encoder='random', audio_adapter='ctc'))\n")
    runs = {}
    for threads in ("1", "2"):
        out = tmp_path / f"omp{threads}"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[threads] = out
    weights = [(runs[t] / "model" / "model.safetensors").read_bytes() for t in ("1", "2")]
    assert weights[0] == weights[1]
    config = json.loads((runs["1"] / "model" / "config.json").read_text())
    assert (config["audio_adapter"], config["audio_adapter_dropout"]) == ("ctc", 0.3)
    figures = [json.loads((runs[t] / "summary.json").read_text()) for t in ("1", "2")]
    for summary in figures:
        for key in ("timings_s", "total_s", "cpu_s", "files"):
            summary.pop(key)
        summary["spoken_answer"].pop("wav")
    assert figures[0] == figures[1] and figures[0]["num_threads"] == 1
