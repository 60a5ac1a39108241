"""Hub export up to the network boundary: the folder, the rendered card, and the folder used where deeptalk
is not installed (remote code: logits, a spoken answer with its waveform, a stock pipeline)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import convert, random_ids
from huggingface_hub import ModelCard
from test_codecs import TINY_SNAC_24K
from test_trainers import speech_model
from transformers import AutoProcessor

from deeptalk import DeepTalkProcessor
from deeptalk.generation import generate_speech_answer
from deeptalk.hub import export_for_hub, logits_via_remote_code, pipeline_via_remote_code, speak_via_remote_code
from deeptalk.processing.codecs import SNACCodec
from deeptalk.processing.tokenizer import train_demo_tokenizer
from deeptalk.recipes import build_demo_processor, build_demo_tokenizer, fit_demo_codec
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config

QUESTIONS = sorted((pathlib.Path(__file__).parents[1] / "deeptalk/data/demo_corpus/audio/questions").glob("*.flac"))


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
    assert metadata["pipeline_tag"] == "text-generation" and metadata["library_name"] == "transformers"
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


@pytest.fixture(scope="module", params=["melvq", "snac"])
def exported_speech_model(request, tmp_path_factory):
    """A tiny speech model exported with its codec: the offline MelVQ, or a (random, tiny) SNAC."""
    torch.manual_seed(0)
    codec = fit_demo_codec(iters=3) if request.param == "melvq" else SNACCodec.from_config(**TINY_SNAC_24K)
    processor = build_demo_processor(build_demo_tokenizer(), codec)
    torch.manual_seed(0)
    model = speech_model(processor).eval()
    folder = export_for_hub(model, processor, tmp_path_factory.mktemp(request.param) / "repo", codec=codec)
    return model, processor, codec, folder


def test_exported_folder_answers_a_spoken_question_where_deeptalk_is_not_importable(exported_speech_model):
    """Model, processor and codec come from the folder's own code in a process that cannot import deeptalk;
    the same seed gives the same columns, text and waveform as the package."""
    model, processor, codec, folder = exported_speech_model
    question = QUESTIONS[0]
    remote = speak_via_remote_code(folder, question, max_steps=16, seed=3)
    assert set(remote.modules) == {"model", "processor", "codec"}
    assert all(module.startswith("transformers_modules.") for module in remote.modules.values()), remote.modules
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": str(question)}]}]
    local = generate_speech_answer(model, processor, conversation, codec=codec, max_steps=16, seed=3)
    assert torch.equal(remote.layout, local.layout) and remote.text == local.text
    assert local.codes.shape[1] > 0, "the answer should speak for the waveform check to mean anything"
    assert remote.sampling_rate == codec.sampling_rate
    assert remote.waveform.shape == (local.codes.shape[1] * codec.samples_per_frame,)
    assert torch.allclose(remote.waveform, local.waveform, atol=1e-5)


@pytest.mark.parametrize("exported_speech_model", ["melvq"], indirect=True)
def test_stock_text_generation_pipeline_serves_an_exported_folder(exported_speech_model):
    """The card's pipeline_tag is `text-generation`: transformers' own pipeline loads the folder (remote code,
    no deeptalk) and generates from a text prompt, greedy, as the model's own `generate` does."""
    model, processor, _, folder = exported_speech_model
    prompt = "what is two plus two"
    outputs, module = pipeline_via_remote_code(folder, "text-generation", prompt, max_new_tokens=6, do_sample=False)
    assert module.startswith("transformers_modules.")
    tokenizer = processor.tokenizer
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert outputs == [{"generated_text": tokenizer.decode(expected[0], skip_special_tokens=True)}]
