"""`deeptalk convert` (`deeptalk.conversion.convert_folder`): the folder it writes carries the source's tokenizer
with a chat template, refuses a source without one, and TRL's own CLI fine-tunes it on chat data."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from deeptalk.conversion import convert_folder
from deeptalk.processing_deeptalk import DEFAULT_CHAT_TEMPLATE
from deeptalk.tiny import tiny_text_moe


def test_a_source_without_tokenizer_files_is_refused_before_anything_is_written(tmp_path):
    source = tmp_path / "source"
    tiny_text_moe("qwen3_moe").save_pretrained(source)  # weights and config only
    with pytest.raises(ValueError, match=r"has no tokenizer.*tokenizer files"):
        convert_folder(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_source_tokenizer_is_copied_and_given_a_chat_template(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(_demo_tokenizer_folder(tmp_path))
    source = tmp_path / "source"
    tiny_text_moe("deepseek_v2", vocab_size=len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    convert_folder(source, tmp_path / "out", [[0, 1], [2, 3]], progress=False)
    converted = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert converted.get_vocab() == tokenizer.get_vocab()
    assert converted.chat_template == DEFAULT_CHAT_TEMPLATE
    chat = [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}]
    assert converted.apply_chat_template(chat, tokenize=False) == "<|user|>two plus two<|eot|><|assistant|>four<|eot|>"

    with_template = tmp_path / "with_template"
    shutil.copytree(source, with_template)
    (with_template / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    convert_folder(with_template, tmp_path / "out2", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "out2").chat_template == "{{ messages[0]['content'] }}"


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    source = tmp_path / "source"
    tiny_text_moe("qwen3_moe", vocab_size=64).save_pretrained(source)
    AutoTokenizer.from_pretrained(_demo_tokenizer_folder(tmp_path)).save_pretrained(source)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model's vocabulary only 64"):
        convert_folder(source, tmp_path / "out", progress=False)


def _demo_tokenizer_folder(tmp_path):
    from deeptalk.recipes import build_demo_tokenizer

    folder = tmp_path / "demo_tokenizer"
    if not folder.exists():
        build_demo_tokenizer().save_pretrained(folder)
    return folder


def test_trl_sft_cli_fine_tunes_a_converted_folder_on_chat_data(tmp_path):
    """`trl sft --model_name_or_path OUT --trust_remote_code` with a local `messages` dataset, run as TRL's own
    command on a `deeptalk convert tiny:qwen3_moe` folder: two optimizer steps, a saved model that changed."""
    converted = tmp_path / "converted"
    convert_folder("tiny:qwen3_moe", converted, progress=False)  # what `deeptalk convert tiny:qwen3_moe OUT` runs
    data = tmp_path / "chat"
    data.mkdir()
    pairs = [("what is two plus two", "four"), ("is seven bigger than three", "yes"),
             ("what colour is the sky", "blue"), ("what does a cow say", "moo")]
    with open(data / "train.jsonl", "w") as f:
        for question, answer in pairs * 2:
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    trl = shutil.which("trl", path=os.path.dirname(sys.executable))
    assert trl is not None, "TRL's command line (`trl`) is not installed next to this Python"
    tuned = tmp_path / "sft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [trl, "sft", "--model_name_or_path", str(converted), "--trust_remote_code", "--dataset_name", str(data),
         "--output_dir", str(tuned), "--max_steps", "2", "--per_device_train_batch_size", "4",
         "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
         "--use_cpu", "--dtype", "float32"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert "'loss'" in result.stdout + result.stderr
    assert "differ from the model config" not in result.stderr  # the converted config agrees with its tokenizer
    before, after = load_file(converted / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert json.loads((tuned / "config.json").read_text())["model_type"] == "deeptalk"
