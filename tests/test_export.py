"""Registration, remote-code export and the `deeptalk convert` CLI, with real subprocesses."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import convert, random_ids
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import deeptalk
from deeptalk import DeepTalkForCausalLM
from deeptalk.hub import logits_via_remote_code
from deeptalk.tiny import tiny_text_moe


def test_import_registers_auto_classes():
    config = AutoConfig.for_model("deeptalk")
    assert isinstance(config, deeptalk.DeepTalkConfig)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    assert MODEL_FOR_CAUSAL_LM_MAPPING[deeptalk.DeepTalkConfig] is deeptalk.DeepTalkForCausalLM
    assert MODEL_MAPPING[deeptalk.DeepTalkConfig] is deeptalk.DeepTalkModel


def test_exported_folder_loads_with_remote_code_where_deeptalk_is_not_importable(tiny_source, tmp_path):
    model = convert(tiny_source("deepseek_v2"), experts=(2, 6))
    model.save_pretrained(tmp_path)
    ids = random_ids()
    remote_logits, module = logits_via_remote_code(tmp_path, ids)
    assert module.startswith("transformers_modules.")  # the folder's own copy of modeling_deeptalk
    with torch.no_grad():
        assert (remote_logits - model(ids).logits).abs().max() <= 1e-4


REMOTE_CODE_FILES = ("configuration_deeptalk.py", "modeling_deeptalk.py", "processing_deeptalk.py",
                     "generation_deeptalk.py", "codec_deeptalk.py")


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_files_need_only_transformers_and_its_dependencies(name):
    """A Hub folder must work without the package. transformers' own scan (what `trust_remote_code` loading
    checks, Hub files included) finds only torch, transformers and what transformers itself installs;
    optional backends (soundfile, torchaudio, snac) and the deeptalk package sit in ImportError guards; relative
    imports reach only the sibling remote-code files, which saving copies next to them."""
    import pathlib

    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    path = pathlib.Path(deeptalk.__file__).parent / name
    allowed = {"torch", "transformers", "numpy", "safetensors", "huggingface_hub"} | set(sys.stdlib_module_names)
    assert set(get_imports(path)) <= allowed, set(get_imports(path)) - allowed
    assert {f"{m}.py" for m in get_relative_imports(path)} <= set(REMOTE_CODE_FILES)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "deeptalk", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_convert_writes_a_hub_ready_folder(tmp_path):
    out = tmp_path / "converted"
    mapping = tmp_path / "speech_experts.json"
    mapping.write_text(json.dumps([[0, 3], [4, 7]]))
    result = _cli("convert", "tiny:deepseek_v2", str(out), "--speech-experts", str(mapping), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 MoE layers x 8 routed experts" in result.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["speech_experts"] == [[0, 3], [4, 7]] and saved["routing_mode"] == "free"
    assert set(saved["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    assert (out / "modeling_deeptalk.py").exists() and (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.moe_blocks()[0].speech_bank.gate_up_proj.shape[0] == 2
    assert isinstance(AutoModel.from_pretrained(out), deeptalk.DeepTalkModel)


def test_cli_convert_rejects_a_bad_map_without_writing(tmp_path):
    out = tmp_path / "converted"
    result = _cli("convert", "tiny:qwen3_moe", str(out), "--speech-experts", "[[0, 0], [1, 2], [3, 4]]", cwd=tmp_path)
    assert result.returncode == 2
    assert "repeats an expert" in result.stderr
    assert not out.exists()
    result = _cli("convert", "tiny:qwen3_moe", str(out), "--speech-experts", "not json", cwd=tmp_path)
    assert result.returncode != 0 and "neither a JSON file nor inline JSON" in result.stderr


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe", "mixtral"])
def test_training_the_conversion_leaves_the_source_model_untouched(family):
    """from_text_moe(instance) copies every tensor (the routers too): the source stays the original LLM."""
    source = tiny_text_moe(family)
    before = {name: p.detach().clone() for name, p in source.named_parameters()}
    model = DeepTalkForCausalLM.from_text_moe(source)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert [n for n, p in source.named_parameters() if not torch.equal(p, before[n])] == []
