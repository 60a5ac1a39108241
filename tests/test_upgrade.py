"""Format versions: a folder saved by deeptalk 0.1 (format 1) is refused with the command that converts it, and
`deeptalk upgrade` turns it into a current folder that computes the same logits (a real format-1 folder, with
the logits it gave when it was saved)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

import deeptalk  # noqa: F401  (registers the Auto classes)
from deeptalk.configuration_deeptalk import FORMAT_VERSION
from deeptalk.conversion import upgrade_folder

FORMAT_1 = pathlib.Path(__file__).parent / "fixtures" / "format_v1_qwen3_moe"


@pytest.mark.parametrize("auto_class", [AutoConfig, AutoModelForCausalLM])
def test_loading_a_format_1_folder_names_the_upgrade_command(auto_class):
    with pytest.raises(ValueError, match=r"format 1.*deeptalk upgrade OLD_DIR NEW_DIR"):
        auto_class.from_pretrained(FORMAT_1)


def _check_upgraded(folder: pathlib.Path):
    assert json.loads((folder / "config.json").read_text())["deeptalk_format_version"] == FORMAT_VERSION
    expected = load_file(FORMAT_1 / "expected_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert AutoProcessor.from_pretrained(folder).layout == model.config.layout


def test_an_upgraded_format_1_folder_reproduces_its_logits(tmp_path):
    _check_upgraded(upgrade_folder(FORMAT_1, tmp_path / "upgraded"))
    with pytest.raises(ValueError, match="already in format"):
        upgrade_folder(tmp_path / "upgraded", tmp_path / "again")


def test_upgrade_refuses_an_existing_folder_before_reading(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        upgrade_folder(FORMAT_1, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


def test_deeptalk_upgrade_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deeptalk", "upgrade", str(FORMAT_1), str(tmp_path / "upgraded")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"format {FORMAT_VERSION}" in result.stdout
    _check_upgraded(tmp_path / "upgraded")
    result = subprocess.run([sys.executable, "-m", "deeptalk", "upgrade", str(FORMAT_1), str(tmp_path / "upgraded")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "not empty" in result.stderr
