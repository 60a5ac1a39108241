"""Hub export up to the network boundary: the folder, the rendered card, remote-code loading."""

import json
import subprocess
import sys

import torch
import yaml
from conftest import convert, random_ids
from huggingface_hub import ModelCard
from transformers import AutoProcessor

from deeptalk.tiny import tiny_whisper_config
from deeptalk import DeepTalkProcessor
from deeptalk.hub import export_for_hub, logits_via_remote_code
from deeptalk.processing.tokenizer import train_demo_tokenizer
from deeptalk.tiny import tiny_text_moe


def _model_and_processor():
    tokenizer = train_demo_tokenizer(["what is two plus two", "four", "is seven bigger than three", "yes"] * 5)
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, 2, 16)
    whisper = tiny_whisper_config()
    model = convert(tiny_text_moe("deepseek_v2", vocab_size=len(tokenizer)), experts=(2, 5))
    model.add_speech(audio_config=whisper, **processor.model_speech_kwargs())
    return model, processor


def test_export_for_hub_writes_a_complete_repository(tmp_path):
    model, processor = _model_and_processor()
    results = {"dataset": "deeptalk demo corpus (test split)", "text_qa_accuracy": 0.5, "spoken_qa_text_accuracy": 0.25,
               "audio_token_accuracy": 0.75, "asr": {"wer": 0.4, "cer": 0.2}, "base_text_qa_accuracy": 0.625,
               "text_relative_drop": 0.2, "spoken_qa_speech_accuracy": 0.125, "tts_wer": 0.875, "speech_answer_asr": "own",
               "num_examples": {"text_qa_accuracy": 8, "tts_wer": 7}, "skipped": {}}
    phases = [{"phase": "align", "card": "### Phase: align\n\n- routing mode: `free`\n"}]
    folder = export_for_hub(model, processor, tmp_path / "repo", repo_id="someone/deeptalk-tiny",
                            base_model="deepseek-ai/DeepSeek-V2-Lite-Chat", eval_results=results, phases=phases)
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_deeptalk.py", "modeling_deeptalk.py",
            "processor_config.json", "README.md", "deeptalk_phases.json", "eval_results.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    card = (folder / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "any-to-any" and metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "deepseek-ai/DeepSeek-V2-Lite-Chat" and "deeptalk" in metadata["tags"]
    assert metadata["license"] == "apache-2.0"
    scores = {r.metric_name: (r.metric_type, r.metric_value) for r in ModelCard.load(folder / "README.md").data.eval_results}
    assert scores == {"text_qa_accuracy": ("accuracy", 0.5), "text_relative_drop": ("relative_drop", 0.2),
                      "spoken_qa_text_accuracy": ("accuracy", 0.25), "spoken_qa_speech_accuracy": ("accuracy", 0.125),
                      "audio_token_accuracy": ("accuracy", 0.75), "tts_wer": ("wer", 0.875), "asr_wer": ("wer", 0.4),
                      "asr_cer": ("cer", 0.2)}
    assert "- **num_examples**: text_qa_accuracy 8, tts_wer 7" in card
    assert "[[2, 5], [2, 5]]" in card and "### Phase: align" in card and "deepseek_v2" in card
    # the exported folder stands on its own: remote code in a process without deeptalk
    ids = random_ids(vocab_size=len(processor.tokenizer))
    remote, module = logits_via_remote_code(folder, ids)
    with torch.no_grad():
        assert (remote - model(ids).logits).abs().max() <= 1e-4
    assert module.startswith("transformers_modules.")
    assert AutoProcessor.from_pretrained(folder).layout == processor.layout


def test_push_cli_export_only(tmp_path):
    model, processor = _model_and_processor()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "eval.json").write_text(json.dumps({"text_qa_accuracy": 0.3}))
    result = subprocess.run([sys.executable, "-m", "deeptalk", "push", "me/tiny", "--model", str(tmp_path / "model"),
                             "--eval-results", str(tmp_path / "eval.json"), "--export-only", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing uploaded" in result.stdout
    assert "text_qa_accuracy" in (tmp_path / "repo" / "README.md").read_text()
