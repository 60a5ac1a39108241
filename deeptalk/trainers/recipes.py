"""Recipes: a YAML file per phase (`phase`, `data`, `args`) -> a ready phase trainer.

Shipped recipes live next to this package's `recipes/` data folder: `deepseek_v2_lite/*.yaml` (the
paper's settings for 8 GPUs) and `tiny_cpu/*.yaml` (tests, quickstart). `accelerate/*.yaml` holds
launcher configs for DDP, FSDP and DeepSpeed ZeRO-2/3.

A recipe is validated key by key when it is loaded: the top level takes `phase`, `data` and `args`;
`data` takes `max_length`; `args` takes the fields of the phase's config dataclass
(`DeepTalkAlignmentConfig`, `DeepTalkExpertsConfig`, `DeepTalkJointConfig`, `DeepTalkSpeechDPOConfig`:
`TrainingArguments` plus DeepTalk's own). A misspelt key is refused with the closest names, and every
value is converted to its field's type (`learning_rate: 3e-3` is a float, `save_strategy: no` stays
the string "no"); `--set KEY=VALUE` overrides go through the same checks. YAML is read with the YAML
1.2 core rules for booleans and numbers (only true/false are booleans; `3e-3` is a number).

Training data is conversations in JSON Lines, one `{"messages": [...]}` per line, in the
processor's chat format; audio paths are resolved relative to the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import re
import types
import typing
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
PHASE_CLASSES = {
    "align": ("alignment", "DeepTalkAlignmentConfig", "DeepTalkAlignmentTrainer"),
    "experts": ("experts", "DeepTalkExpertsConfig", "DeepTalkExpertsTrainer"),
    "joint": ("joint", "DeepTalkJointConfig", "DeepTalkJointTrainer"),
    "dpo": ("dpo", "DeepTalkSpeechDPOConfig", "DeepTalkSpeechDPOTrainer"),
}
RECIPE_KEYS = ("phase", "data", "args")
DATA_KEYS = ("max_length",)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core booleans and numbers: YAML 1.1 reads `no`/`off` as False,
    `3e-3` as a string and `010` as 8, none of which a recipe means."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_RecipeLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


def _did_you_mean(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def load_recipe(name_or_path: str) -> dict:
    """A validated recipe `{"phase", "data", "args"}` from a file path, or a shipped one by name
    (`tiny_cpu/experts_speech`). `args` values are converted to the phase config's field types."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if not path.is_file():
        shipped = sorted(str(p.relative_to(RECIPES_DIR))[:-5] for p in RECIPES_DIR.glob("*/*.yaml")
                         if p.parent.name != "accelerate")
        raise FileNotFoundError(f"No recipe {name_or_path!r}. Give a YAML path or one of: {', '.join(shipped)}.")
    where = f"recipe {path}"
    try:
        recipe = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"{where}: expected a mapping with the keys {', '.join(RECIPE_KEYS)}, "
                         f"got {type(recipe).__name__}.")
    for key in recipe:
        if key not in RECIPE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}{_did_you_mean(str(key), RECIPE_KEYS)} "
                             f"(a recipe has {', '.join(RECIPE_KEYS)}).")
    phase = recipe.get("phase")
    if phase not in PHASE_CLASSES:
        raise ValueError(f"{where}: 'phase' must be one of {sorted(PHASE_CLASSES)}, got {phase!r}.")
    data = _mapping(recipe.get("data"), f"{where}: data")
    for key in data:
        if key not in DATA_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} under 'data'{_did_you_mean(str(key), DATA_KEYS)} "
                             f"('data' has {', '.join(DATA_KEYS)}).")
    max_length = data.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"{where}: data.max_length must be a positive integer (or null for no limit), "
                         f"got {max_length!r}.")
    args = validate_training_args(phase, _mapping(recipe.get("args"), f"{where}: args"), prefix=f"{where}: args.")
    return {"phase": phase, "data": data, "args": args}


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(value).__name__} {value!r}.")
    return dict(value)


def phase_config_class(phase: str) -> type:
    """The config dataclass of a phase (`"align"` -> `DeepTalkAlignmentConfig`, ...)."""
    import importlib

    if phase not in PHASE_CLASSES:
        raise ValueError(f"Unknown phase {phase!r}; phases: {sorted(PHASE_CLASSES)}.")
    module_name, config_name, _ = PHASE_CLASSES[phase]
    return getattr(importlib.import_module(f"deeptalk.trainers.{module_name}"), config_name)


def validate_training_args(phase: str, args: dict, *, prefix: str = "args.", raw: dict | None = None) -> dict:
    """Check every key of `args` against the phase config's fields and convert each value to its field's type.

    Errors start with `prefix` + the key (`"recipe FILE: args."`, `"--set "`). `raw` maps keys to the
    strings they were parsed from (`--set`): a field typed `str` keeps the string as given.
    """
    config_class = phase_config_class(phase)
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    try:
        hints = typing.get_type_hints(config_class)
    except (NameError, TypeError):  # an annotation that does not resolve: values of such fields pass through
        hints = {}
    out = {}
    for key, value in args.items():
        if key not in fields:
            raise ValueError(f"{prefix}{key}: unknown key{_did_you_mean(str(key), fields)} "
                             f"(the {phase!r} phase takes the fields of {config_class.__name__}).")
        expected = hints.get(key, fields[key].type)
        if raw is not None and key in raw and _is_plain_str(expected):
            out[key] = None if value is None and _optional(expected) else raw[key]
            continue
        try:
            out[key] = _convert(value, expected)
        except (TypeError, ValueError):
            shown = repr(raw[key]) if raw is not None and key in raw else "null" if value is None else repr(value)
            raise ValueError(f"{prefix}{key}={shown} is not valid: expected {_type_name(expected)}.") from None
    return out


def parse_overrides(pairs: list[str], phase: str | None = None) -> dict:
    """`key=value` strings (`--set`) -> dict. Values are read as YAML (numbers, booleans, lists); with
    `phase`, keys and values are validated and converted like a recipe's `args`."""
    out, raw = {}, {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {pair!r} is not KEY=VALUE (e.g. --set max_steps=10).")
        try:
            out[key] = yaml.load(value, Loader=_RecipeLoader) if value.strip() else None
        except yaml.YAMLError:
            out[key] = value  # not YAML: the text as given
        raw[key] = value
    return validate_training_args(phase, out, prefix="--set ", raw=raw) if phase is not None else out


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _is_plain_str(tp) -> bool:
    """`str` or `str | None`: a `--set` value for it is taken as written (`run_name=001` stays "001")."""
    if tp is str:
        return True
    members = [m for m in typing.get_args(tp) if m is not type(None)] if _is_union(tp) else []
    return members == [str]


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    if _is_union(tp):
        members = typing.get_args(tp)
        if any(isinstance(m, type) and issubclass(m, enum.Enum) for m in members):  # `Enum | str`: the Enum's values
            members = [m for m in members if m is not str]
        return " or ".join(_type_name(m) for m in members)
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {[m.value for m in tp]}"
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}


def _convert(value, tp):
    """`value` as type `tp`, or TypeError/ValueError. Unknown annotations pass the value through."""
    if tp is typing.Any or tp is object:
        return value
    if _is_union(tp):
        members = typing.get_args(tp)
        if value is None:
            if type(None) in members:
                return None
            raise ValueError("null")
        members = [m for m in members if m is not type(None)]
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if enums and isinstance(value, str):  # `IntervalStrategy | str`: the string must name a member
            return _convert(value, enums[0])
        for member in members:  # a value already of a member type is kept as it is
            if _is_instance(value, member):
                return value
        for member in members:
            try:
                return _convert(value, member)
            except (TypeError, ValueError):
                continue
        raise ValueError("no member")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value in typing.get_args(tp) and type(value) in {type(v) for v in typing.get_args(tp)}:
            return value
        raise ValueError("wrong type")
    if tp is type(None):
        if value is None:
            return None
        raise ValueError("wrong type")
    if value is None:
        raise ValueError("null")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if isinstance(value, tp):
            return value.value
        if value in choices:
            return value
        raise ValueError("not a member")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError("wrong type")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("wrong type")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError("wrong type")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("wrong type")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError("wrong type")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("wrong type")
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        (item_type,) = typing.get_args(tp)[:1] or (typing.Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_convert(item, item_type) for item in items]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise ValueError("wrong type")
    return value  # an annotation this check does not know (e.g. ParallelismConfig): the config decides


def _is_instance(value, tp) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, tp) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is dict or tp is dict:
        return isinstance(value, dict)
    return False


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
        if isinstance(row, dict) and "messages" in row:
            messages = row["messages"]
        elif isinstance(row, dict) and {"prompt", "chosen", "rejected"} <= set(row):
            if not isinstance(row["prompt"], list):
                raise ValueError(f"{path}:{number}: 'prompt' must be a list of messages, "
                                 f"got {type(row['prompt']).__name__}.")
            messages = [*row["prompt"], row["chosen"], row["rejected"]]
        else:
            raise ValueError(f"{path}:{number} needs a 'messages' list (or 'prompt'/'chosen'/'rejected' for DPO).")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{number}: 'messages' must be a non-empty list of messages.")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "content" not in message:
                raise ValueError(f"{path}:{number}: message {index} needs 'role' and 'content' "
                                 f"(e.g. {{\"role\": \"user\", \"content\": \"...\"}}), got {message!r:.80}.")
            for part in message["content"] if isinstance(message["content"], list) else []:
                if not isinstance(part, dict):
                    raise ValueError(f"{path}:{number}: message {index}: every content part must be a mapping "
                                     f"such as {{\"type\": \"text\", \"text\": \"...\"}}, got {part!r:.80}.")
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
