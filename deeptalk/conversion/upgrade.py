"""Upgrade a folder saved by deeptalk 0.1 (format 1) to the current format.

Format 1 kept the decoder under `model.language_model.*`, one embedding table (and head) over the whole
extended vocabulary, and the speech vocabulary as flat config fields without the text stream's EOT/PAD_T
ids. The current format names the decoder `model.*` (the source family's own names), keeps the audio
rows in separate `audio_weight` parameters, and stores the whole `speech_layout` in config.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..configuration_deeptalk import FORMAT_VERSION, SpeechTokenLayout
from ..saving import atomic_directory, check_output_path

_FLAT_SPEECH_FIELDS = ("num_audio_streams", "audio_codebook_size", "audio_stream_delays", "audio_special_tokens",
                       "text_vocab_size")


def upgrade_folder(old_dir: str | os.PathLike, new_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the format-1 folder `old_dir` in the current format to `new_dir` (new or empty unless `overwrite`;
    written atomically).
    Files other than config.json and the weights (tokenizer, processor, codec, reports) are copied."""
    old_dir, new_dir = Path(old_dir), Path(new_dir)
    config_path = old_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{old_dir} has no config.json: it is not a saved DeepTalk model folder.")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "deeptalk":
        raise ValueError(f"{config_path} describes a {config.get('model_type')!r} model, not a DeepTalk one.")
    if config.get("deeptalk_format_version", 1) == FORMAT_VERSION:
        raise ValueError(f"{old_dir} is already in format {FORMAT_VERSION}: nothing to upgrade.")
    check_output_path(new_dir, overwrite=overwrite, forbid=[old_dir], what="the new folder")
    weights = old_dir / "model.safetensors"  # other .safetensors files (reports, test data) are not weights
    if (old_dir / "model.safetensors.index.json").exists():
        raise ValueError(f"{old_dir}: upgrade handles one model.safetensors file (format 1 was never sharded).")
    if not weights.is_file():
        raise FileNotFoundError(f"{old_dir} has no model.safetensors: it is not a folder saved by deeptalk 0.1.")

    num_audio_streams = config.get("num_audio_streams", 0)
    text_vocab_size = config.get("text_vocab_size") or config["text_config"]["vocab_size"]
    layout = None
    if num_audio_streams:
        processor_path = old_dir / "processor_config.json"
        if not processor_path.is_file():
            raise FileNotFoundError(
                f"{old_dir} holds a speech model but no processor_config.json: the text stream's EOT/PAD_T ids are "
                "stored only there. Save the processor next to the model first."
            )
        layout = SpeechTokenLayout(**json.loads(processor_path.read_text())["speech_layout"])
        expected = (num_audio_streams, config["audio_codebook_size"], config["audio_stream_delays"], text_vocab_size)
        if (layout.num_audio_streams, layout.codebook_size, layout.delays, layout.text_vocab_size) != tuple(expected):
            raise ValueError(f"{old_dir}: the processor's speech layout does not match the model's config.")
    for name in _FLAT_SPEECH_FIELDS:
        config.pop(name, None)
    config.pop("auto_map", None)  # the new remote-code files are written by a later save_pretrained
    config["speech_layout"] = None if layout is None else layout.to_dict()
    config["deeptalk_format_version"] = FORMAT_VERSION

    tensors = {}
    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            tensor = f.get_tensor(key)
            new_key = "model." + key[len("model.language_model."):] if key.startswith("model.language_model.") else key
            if layout is not None and new_key in ("model.embed_tokens.weight", "lm_head.weight"):
                tensors[new_key] = tensor[:text_vocab_size].contiguous()
                tensors[new_key.replace(".weight", ".audio_weight")] = tensor[text_vocab_size:].contiguous()
            else:
                tensors[new_key] = tensor

    with atomic_directory(new_dir, overwrite=overwrite, forbid=[old_dir], what="the new folder") as staging:
        staging = Path(staging)
        for item in old_dir.iterdir():
            if item.suffix == ".py" or item.name == "config.json" or item == weights:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        save_file(tensors, staging / "model.safetensors", metadata=metadata or {"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return new_dir
