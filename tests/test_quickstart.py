"""The main job, `deeptalk quickstart`, end to end with a few steps per phase."""

import json
import subprocess
import sys

import soundfile
from transformers import AutoModelForCausalLM, AutoProcessor

import deeptalk
from deeptalk.quickstart import QuickstartSettings, run_quickstart


def test_quickstart_runs_every_phase_and_writes_its_outputs(tmp_path):
    settings = QuickstartSettings(output_dir=str(tmp_path), text_pretrain_steps=20, align_steps=3, speech_steps=3,
                                  text_steps=3, joint_steps=3, assignment_batches=2)
    summary = run_quickstart(settings)
    for key in ("original_text_qa_accuracy", "final_text_qa_accuracy", "spoken_qa_text_accuracy", "audio_token_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert json.loads((tmp_path / "summary.json").read_text())["speech_experts"] == summary["speech_experts"]
    assert all(len(layer) == settings.num_speech_experts for layer in summary["speech_experts"])
    assert (tmp_path / "modality_load.png").read_bytes()[:4] == b"\x89PNG"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    assert isinstance(model, deeptalk.DeepTalkForCausalLM) and isinstance(processor, deeptalk.DeepTalkProcessor)
    assert model.config.speech_experts == summary["speech_experts"]
    phases = json.loads((tmp_path / "model" / "deeptalk_phases.json").read_text())
    assert [p["routing_mode"] for p in phases] == ["free", "speech_only", "text_only", "free"]
    if summary["spoken_answer"]["wav"]:
        audio, rate = soundfile.read(summary["spoken_answer"]["wav"])
        assert rate == 16000 and len(audio) > 0

    # the chat and evaluate commands on what the quickstart wrote (real subprocesses)
    question = summary["spoken_answer"]["question"]
    from deeptalk.data import load_demo_corpus

    record = next(r for r in load_demo_corpus("spoken_qa", decode_audio=False)["test"] if r["question_text"] == question)
    chat = subprocess.run([sys.executable, "-m", "deeptalk", "chat", "--model", str(tmp_path / "model"), "--audio",
                           record["question_audio"], "--out", str(tmp_path / "reply.wav"), "--max-steps", "40"],
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "decode steps" in chat.stderr
    if "codec frames" in chat.stderr:
        assert soundfile.info(str(tmp_path / "reply.wav")).samplerate == 16000
    evaluation = subprocess.run([sys.executable, "-m", "deeptalk", "evaluate", "--model", str(tmp_path / "model"),
                                 "--base-model", str(tmp_path / "original_llm"), "--output", str(tmp_path / "eval.json"),
                                 "--limit", "8", "--max-speech-steps", "30"], capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    for key in ("text_qa_accuracy", "base_text_qa_accuracy", "spoken_qa_text_accuracy", "audio_token_accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    assert set(results["asr"]) == {"wer", "cer"}
    assert 0.0 <= results["spoken_qa_speech_accuracy"] <= 1.0 and results["speech_answer_asr"] == "own"
    assert results["max_speech_steps"] == 30

    # the Space for this model (the browser test is tests/test_space.py)
    space = subprocess.run([sys.executable, "-m", "deeptalk", "space", str(tmp_path / "space"), "--model",
                            str(tmp_path / "model")], capture_output=True, text=True, timeout=120)
    assert space.returncode == 0, space.stderr[-2000:]
    assert {"app.py", "requirements.txt", "README.md"} <= {p.name for p in (tmp_path / "space").iterdir()}
    assert "sdk: gradio" in (tmp_path / "space" / "README.md").read_text()
