"""Recipes: a YAML file per phase (`phase`, `data`, `args`) -> a ready phase trainer.

Shipped recipes live next to this package's `recipes/` data folder: `deepseek_v2_lite/*.yaml` (the
paper's settings for 8 GPUs) and `tiny_cpu/*.yaml` (tests, quickstart). `accelerate/*.yaml` holds
launcher configs for DDP, FSDP and DeepSpeed ZeRO-2/3.

Training data is conversations in JSON Lines, one `{"messages": [...]}` per line, in the
processor's chat format; audio paths are resolved relative to the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
PHASE_CLASSES = {
    "align": ("alignment", "DeepTalkAlignmentConfig", "DeepTalkAlignmentTrainer"),
    "experts": ("experts", "DeepTalkExpertsConfig", "DeepTalkExpertsTrainer"),
    "joint": ("joint", "DeepTalkJointConfig", "DeepTalkJointTrainer"),
    "dpo": ("dpo", "DeepTalkSpeechDPOConfig", "DeepTalkSpeechDPOTrainer"),
}


def load_recipe(name_or_path: str) -> dict:
    """A recipe from a file path, or a shipped one by name (`tiny_cpu/experts_speech`)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if not path.is_file():
        shipped = sorted(str(p.relative_to(RECIPES_DIR))[:-5] for p in RECIPES_DIR.glob("*/*.yaml") if p.parent.name != "accelerate")
        raise FileNotFoundError(f"No recipe {name_or_path!r}. Give a YAML path or one of: {', '.join(shipped)}.")
    recipe = yaml.safe_load(path.read_text()) or {}
    if recipe.get("phase") not in PHASE_CLASSES:
        raise ValueError(f"{path}: 'phase' must be one of {sorted(PHASE_CLASSES)}, got {recipe.get('phase')!r}.")
    recipe.setdefault("data", {})
    recipe.setdefault("args", {})
    return recipe


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings -> dict, values parsed as YAML (numbers, booleans, lists)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"Override {pair!r} is not key=value.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_conversations(path: str | os.PathLike) -> list[dict]:
    """Conversations from JSON Lines, with relative audio paths made absolute. Rows are
    `{"messages": [...]}`, or for the DPO phase `{"prompt": [...], "chosen": {...}, "rejected": {...}}`
    (a conversation ending with the user turn, and two assistant turns)."""
    path = Path(path)
    base = path.resolve().parent
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not JSON ({err}).") from None
        if "messages" in row:
            messages = row["messages"]
        elif {"prompt", "chosen", "rejected"} <= set(row):
            messages = [*row["prompt"], row["chosen"], row["rejected"]]
        else:
            raise ValueError(f"{path}:{number} needs a 'messages' list (or 'prompt'/'chosen'/'rejected' for DPO).")
        for message in messages:
            for part in message["content"] if isinstance(message["content"], list) else []:
                audio = part.get("audio")
                if isinstance(audio, str) and not os.path.isabs(audio):
                    part["audio"] = str(base / audio)
        rows.append(row)
    return rows


def encode_dataset(processor, conversations: list[dict], *, codec=None, max_length: int | None = None):
    """Processor-encoded `datasets.Dataset`; conversations longer than `max_length` steps are dropped."""
    from datasets import Dataset

    if conversations and "messages" not in conversations[0]:  # DPO preference pairs
        from .dpo import encode_preference_pairs

        encoded = encode_preference_pairs(processor, [c["prompt"] for c in conversations],
                                          [c["chosen"] for c in conversations], [c["rejected"] for c in conversations])
        length_column = "chosen_audio_input_mask"
    else:
        encoded = processor.encode_batch([c["messages"] for c in conversations], codec=codec)
        length_column = "audio_input_mask"
    dataset = Dataset.from_dict(encoded)
    if max_length:
        dataset = dataset.filter(lambda mask: len(mask) <= max_length, input_columns=length_column)
    if len(dataset) == 0:
        raise ValueError(f"No training example fits max_length={max_length}.")
    return dataset


def build_trainer(phase: str, model, processor, train_dataset, args: dict, *, peft_config=None, codec=None):
    """The phase's trainer with its config dataclass built from `args`."""
    import importlib

    from ..processing.processing_deeptalk import DeepTalkDataCollator

    module_name, config_name, trainer_name = PHASE_CLASSES[phase]
    module = importlib.import_module(f"deeptalk.trainers.{module_name}")
    config = getattr(module, config_name)(**args)
    kwargs = {"train_dataset": train_dataset}
    if phase == "dpo":
        kwargs["processing_class"] = processor  # the trainer pairs chosen/rejected itself
    else:
        kwargs["data_collator"] = DeepTalkDataCollator(processor, codec=codec)
    if phase == "joint":
        kwargs["processing_class"] = processor
    return getattr(module, trainer_name)(model, config, peft_config=peft_config, **kwargs)
