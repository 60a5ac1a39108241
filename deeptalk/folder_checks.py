"""Checks of a saved model folder before anything loads, with messages that name the file and the fix.

transformers and safetensors report a bad folder late and obliquely (`SafetensorError: Error while
deserializing header` with no file name, `Repo id must be in the form ...` for a missing local folder).
`check_model_folder` reads only headers and small JSON files, so it costs milliseconds.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .saving import STAGING_NAME

PROCESSOR_FILES = ("processor_config.json",)
CODEC_FOLDER = "codec"


def _json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): the {what} is damaged; "
                         "save the model again or restore the file.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object: the {what} is damaged.")
    return value


def check_safetensors_file(path: str | os.PathLike) -> None:
    """A complete safetensors file: its header parses and every tensor's bytes are present."""
    path = Path(path)
    size = path.stat().st_size
    fix = "it was cut short or damaged (an interrupted download or save?): save or download it again."
    if size < 8:
        raise ValueError(f"{path} is {size} bytes, too short to be a safetensors file: {fix}")
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        if header_length > size - 8:
            raise ValueError(
                f"{path} declares a {header_length}-byte header but holds {size - 8} bytes after it: {fix}"
            )
        try:
            header = json.loads(f.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} has an unreadable header: {fix}") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + header_length + max(ends, default=0)
    if size < needed:
        raise ValueError(f"{path} holds {size} bytes but its tensors need {needed}: {fix}")


def _describe_layout(layout: dict | None) -> str:
    return "none" if layout is None else f"{layout['num_audio_streams']} streams x {layout['codebook_size']}"


def _check_processor_fits(folder: Path, config: dict, processor_config: dict, option: str) -> None:
    """The saved processor must speak the model's vocabulary: the same speech layout (which fixes the text block's
    size too); otherwise the first forward fails deep inside an embedding lookup."""
    model_layout, processor_layout = config.get("speech_layout"), processor_config.get("speech_layout")
    if model_layout != processor_layout:
        raise ValueError(
            f"{option} {folder}: the processor's speech layout ({_describe_layout(processor_layout)}) is not the "
            f"model's ({_describe_layout(model_layout)}): save the processor the model was trained with next to it "
            "(or give the model that layout with model.add_speech(processor.layout))."
        )


def check_model_folder(folder: str | os.PathLike, *, need_processor: bool = False, need_codec: bool = False,
                       processor_must_fit: bool = False, option: str = "--model") -> Path:
    """Validate a saved DeepTalk model folder; returns it as a Path. ValueError / FileNotFoundError name the
    file at fault and the fix: missing folder, missing or invalid config.json, a format this release cannot
    read, missing / truncated / empty weights, no processor (when needed), no codec (when needed). With
    ``processor_must_fit`` (a model about to run as saved) the processor must also fit the model: same speech layout
    (and so the same text vocabulary)."""
    folder = Path(os.path.expanduser(folder))
    if not folder.exists():
        raise FileNotFoundError(f"{option} {folder}: no such folder.")
    if not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file; give the model's folder.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / STAGING_NAME).is_dir():
            checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
            fallback = f", or load its last checkpoint ({checkpoints[-1]})" if checkpoints else ""
            raise FileNotFoundError(
                f"{option} {folder}: the training run's final save was interrupted (no config.json yet). Run the same "
                f"`deeptalk train` again with --resume-from-checkpoint latest{fallback}.")
        raise FileNotFoundError(f"{option} {folder} has no config.json: it is not a saved model folder.")
    config = _json(config_path, "model config")
    if config.get("model_type") != "deeptalk":
        raise ValueError(f"{config_path} describes a {config.get('model_type')!r} model, not a DeepTalk one: "
                         f"convert it first (`deeptalk convert {folder} OUT`).")
    if "deeptalk_format_version" not in config:
        raise ValueError(f"{folder} was saved by deeptalk 0.1 (format 1): convert it once with "
                         f"`deeptalk upgrade {folder} NEW_FOLDER`.")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_json(index, "weights index").get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index} lists no weight files: save the model again.")
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{index} names {shard}, which is missing from {folder}: save the model again.")
            check_safetensors_file(folder / shard)
    elif (folder / "model.safetensors").is_file():
        check_safetensors_file(folder / "model.safetensors")
    else:
        legacy = [p.name for p in folder.glob("*.bin")]
        extra = f" (found {legacy}: deeptalk reads safetensors only)" if legacy else ""
        raise FileNotFoundError(f"{folder} has no model.safetensors{extra}: save the model with save_pretrained.")
    if need_processor and not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise FileNotFoundError(f"{folder} has no processor (processor_config.json): save it next to the model "
                                "with processor.save_pretrained(folder).")
    if need_processor:
        processor_config = _json(folder / PROCESSOR_FILES[0], "processor config")
        if processor_must_fit:
            _check_processor_fits(folder, config, processor_config, option)
    if need_codec and not (folder / CODEC_FOLDER).is_dir():
        raise FileNotFoundError(f"{folder} has no codec/ folder: pass --codec DIR, or save the codec next to the "
                                "model (codec.save_pretrained(folder / 'codec')).")
    return folder
