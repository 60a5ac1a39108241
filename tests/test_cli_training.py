"""`deeptalk assign` and `deeptalk train` as real subprocesses on a tiny model and shipped speech."""

import json
import shutil
import subprocess
import sys

import torch
from conftest import convert
from transformers import AutoModelForCausalLM

from deeptalk import DeepTalkProcessor
from deeptalk.data import load_demo_corpus
from deeptalk.processing.tokenizer import train_demo_tokenizer
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "deeptalk", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _write_model_and_data(tmp_path):
    corpus = load_demo_corpus("spoken_qa", decode_audio=False)
    tokenizer = train_demo_tokenizer([r["question_text"] + " " + r["answer_text"] for r in corpus["train"]])
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, 2, 16)
    whisper = tiny_whisper_config()
    model = convert(tiny_text_moe("qwen3_moe", vocab_size=len(tokenizer), num_experts=8), experts=None)
    model.config.num_speech_experts = 2
    model.add_speech(audio_config=whisper, **processor.model_speech_kwargs())
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    gen = torch.Generator().manual_seed(0)
    with open(tmp_path / "speech.jsonl", "w") as f:
        for r in corpus["train"].select(range(8)):
            codes = torch.randint(0, 16, (2, 3), generator=gen).tolist()
            f.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "audio", "audio": r["question_audio"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": r["answer_text"]},
                                                  {"type": "audio", "audio_codes": codes}]},
            ]}) + "\n")
    with open(tmp_path / "text.jsonl", "w") as f:
        for r in corpus["train"].select(range(8)):
            f.write(json.dumps({"messages": [{"role": "user", "content": r["question_text"]},
                                             {"role": "assistant", "content": r["answer_text"]}]}) + "\n")


def test_assign_then_train_speech_experts(tmp_path):
    _write_model_and_data(tmp_path)
    result = _cli("assign", "--model", "model", "--text-data", "text.jsonl", "--speech-data", "speech.jsonl",
                  "--output", "assigned", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "assigned" / "modality_load.json").read_text())
    saved = json.loads((tmp_path / "assigned" / "config.json").read_text())
    assert saved["speech_experts"] == report["speech_experts"] and len(saved["speech_experts"][0]) == 2
    assert (tmp_path / "assigned" / "modality_load.png").read_bytes()[:4] == b"\x89PNG"

    result = _cli("train", "experts", "--recipe", "tiny_cpu/experts_speech", "--model", "assigned",
                  "--data", "speech.jsonl", "--output", "phase2a",
                  "--set", "max_steps=2", "per_device_train_batch_size=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 steps on 8 conversations" in result.stdout
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "assigned")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "phase2a")
    assert torch.equal(before.moe_blocks()[0].text_bank.gate_up_proj, after.moe_blocks()[0].text_bank.gate_up_proj)
    assert not torch.equal(
        before.moe_blocks()[0].speech_bank.gate_up_proj, after.moe_blocks()[0].speech_bank.gate_up_proj
    )
    phases = json.loads((tmp_path / "phase2a" / "deeptalk_phases.json").read_text())
    assert phases[-1]["routing_mode"] == "speech_only"

    wrong = _cli("train", "joint", "--recipe", "tiny_cpu/experts_speech", "--model", "assigned",
                 "--data", "speech.jsonl", "--output", "x", cwd=tmp_path)
    assert wrong.returncode == 2 and "is for phase 'experts', not 'joint'" in wrong.stderr


def test_train_dpo_from_preference_jsonl(tmp_path):
    _write_model_and_data(tmp_path)
    corpus = load_demo_corpus("spoken_qa", decode_audio=False)["train"].select(range(4))
    gen = torch.Generator().manual_seed(2)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for r in corpus:
            turn = lambda: {"role": "assistant", "content": [{"type": "text", "text": r["answer_text"]},  # noqa: E731
                            {"type": "audio", "audio_codes": torch.randint(0, 16, (2, 3), generator=gen).tolist()}]}
            prompt = [{"role": "user", "content": [{"type": "audio", "audio": r["question_audio"]}]}]
            f.write(json.dumps({"prompt": prompt, "chosen": turn(), "rejected": turn()}) + "\n")
    result = _cli("train", "dpo", "--recipe", "tiny_cpu/dpo", "--model", "model", "--data", "pairs.jsonl",
                  "--output", "dpo", "--set", "max_steps=2", "per_device_train_batch_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 steps on 4 conversations" in result.stdout
    phases = json.loads((tmp_path / "dpo" / "deeptalk_phases.json").read_text())
    assert phases[-1]["phase"] == "dpo"


def test_train_output_is_guarded_and_resumes_from_the_latest_complete_checkpoint(tmp_path):
    _write_model_and_data(tmp_path)
    train = ["train", "joint", "--recipe", "tiny_cpu/joint", "--model", "model", "--data", "speech.jsonl",
             "--output", "out", "--set", "per_device_train_batch_size=4", "save_strategy=steps", "save_steps=1"]
    first = _cli(*train, "max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out"
    assert {"checkpoint-1", "checkpoint-2", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / ".deeptalk-final-save").exists()

    again = _cli(*train, "max_steps=2", cwd=tmp_path)
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr
    assert "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    # a checkpoint whose save was killed before trainer_state.json: `latest` skips it
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    bad = _cli(*train, "max_steps=3", "--resume-from-checkpoint", "out/checkpoint-3", cwd=tmp_path)
    assert bad.returncode == 2 and "an incomplete checkpoint" in bad.stderr
    resumed = _cli(*train, "max_steps=3", "--resume-from-checkpoint", "latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping" in resumed.stderr and "checkpoint-3: an incomplete checkpoint" in resumed.stderr
    assert "3 steps on 8 conversations" in resumed.stdout
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "deeptalk"

    empty = tmp_path / "empty"
    empty.mkdir()
    none = _cli(*train[:8], "--output", "empty", "--resume-from-checkpoint", "latest", cwd=tmp_path)
    assert none.returncode == 2 and "holds no complete checkpoint-N folder" in none.stderr
