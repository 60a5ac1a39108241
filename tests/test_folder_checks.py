"""A saved model folder is checked before loading, with messages that name the file and the fix."""

import json
import shutil

import pytest
from conftest import convert

from deeptalk.folder_checks import check_model_folder, check_safetensors_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from deeptalk.tiny import tiny_text_moe

    folder = tmp_path_factory.mktemp("model")
    convert(tiny_text_moe("qwen3_moe")).save_pretrained(folder)
    return folder


def copy(saved, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(saved, target)
    return target


def test_a_good_folder_passes(saved):
    assert check_model_folder(saved) == saved


@pytest.mark.parametrize("cut", [0, 5, 100, -1])
def test_truncated_or_empty_weights_are_named(saved, tmp_path, cut):
    folder = copy(saved, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:cut] if cut >= 0 else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors .*(too short|header|need).*save or download it again"):
        check_model_folder(folder)


def test_missing_and_invalid_files_are_named(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_model_folder(tmp_path / "absent")
    folder = copy(saved, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .* the model config is damaged"):
        check_model_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_folder(folder)


def test_other_models_old_formats_and_missing_parts_say_what_to_do(saved, tmp_path):
    folder = copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match="not a DeepTalk one: convert it first"):
        check_model_folder(folder)
    config.pop("deeptalk_format_version")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="deeptalk upgrade"):
        check_model_folder(folder)
    folder = copy(saved, tmp_path / "again")
    with pytest.raises(FileNotFoundError, match="has no processor"):
        check_model_folder(folder, need_processor=True)
    with pytest.raises(FileNotFoundError, match="has no codec/ folder: pass --codec DIR"):
        check_model_folder(folder, need_codec=True)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        check_model_folder(folder)


def test_the_old_format_fixture_is_recognised():
    from pathlib import Path

    with pytest.raises(ValueError, match="format 1"):
        check_model_folder(Path(__file__).parent / "fixtures" / "format_v1_qwen3_moe")


def test_a_safetensors_file_missing_its_last_bytes(saved, tmp_path):
    weights = tmp_path / "w.safetensors"
    data = (saved / "model.safetensors").read_bytes()
    weights.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="tensors need"):
        check_safetensors_file(weights)
