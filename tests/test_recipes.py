"""Recipe and `--set` validation: keys checked at every level with did-you-mean, values converted to the
phase config's field types, errors that name the file, the key, the value and the expected type."""

import json

import pytest

from deeptalk.trainers.recipes import (
    RECIPES_DIR,
    load_conversations,
    load_recipe,
    parse_overrides,
    phase_config_class,
)


def _recipe(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("path", sorted(p for p in RECIPES_DIR.glob("*/*.yaml") if p.parent.name != "accelerate"),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_recipe_validates_and_builds_its_config(path, tmp_path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe["args"]["learning_rate"], float)
    args = {**recipe["args"], "output_dir": str(tmp_path), "use_cpu": True, "bf16": False}
    config = phase_config_class(recipe["phase"])(**args)
    assert config.learning_rate == recipe["args"]["learning_rate"]


def test_yaml_values_are_converted_to_the_field_types(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, """
phase: experts
data: {max_length: 128}
args:
  learning_rate: 3e-3        # PyYAML's YAML 1.1 reads this as a string
  max_steps: "5"
  save_strategy: no          # YAML 1.1 reads this as False
  bf16: false
  num_train_epochs: 2
  run_name: 2024
  report_to: none
  label_names: labels
"""))
    args = recipe["args"]
    assert args["learning_rate"] == 3e-3 and isinstance(args["learning_rate"], float)
    assert args["max_steps"] == 5 and isinstance(args["max_steps"], int)
    assert args["save_strategy"] == "no"
    assert args["bf16"] is False
    assert args["num_train_epochs"] == 2.0 and isinstance(args["num_train_epochs"], float)
    assert args["run_name"] == "2024"
    assert args["label_names"] == ["labels"]
    assert recipe["data"] == {"max_length": 128}
    config = phase_config_class("experts")(**args, output_dir=str(tmp_path), use_cpu=True)
    assert config.save_strategy == "no" and config.learning_rate == 3e-3


@pytest.mark.parametrize("text, expected", [
    ("phse: experts\nargs: {}\n", "unknown key 'phse'; did you mean 'phase'?"),
    ("phase: experts\narg: {max_steps: 2}\n", "unknown key 'arg'; did you mean 'args'?"),
    ("phase: experts\ndata: {max_lenght: 64}\n", "unknown key 'max_lenght' under 'data'; did you mean 'max_length'?"),
    ("phase: experts\nargs: {learnin_rate: 0.1}\n", "args.learnin_rate: unknown key; did you mean 'learning_rate'?"),
    ("phase: experts\nargs: {max_steps: many}\n", "args.max_steps='many' is not valid: expected int."),
    ("phase: experts\nargs: {max_steps: 2.5}\n", "args.max_steps=2.5 is not valid: expected int."),
    ("phase: experts\nargs: {bf16: maybe}\n", "args.bf16='maybe' is not valid: expected bool."),
    ("phase: experts\nargs: {learning_rate: fast}\n", "args.learning_rate='fast' is not valid: expected float."),
    ("phase: experts\nargs: {save_strategy: sometimes}\n",
     "args.save_strategy='sometimes' is not valid: expected one of ['no', 'steps', 'epoch', 'best']."),
    ("phase: experts\nargs: {max_steps: null}\n", "args.max_steps=null is not valid: expected int."),
    ("phase: experts\ndata: {max_length: 0}\n", "data.max_length must be a positive integer"),
    ("phase: experts\nargs: [1, 2]\n", "args must be a mapping"),
    ("phase: pretrain\n", "'phase' must be one of ['align', 'dpo', 'experts', 'joint'], got 'pretrain'"),
    ("- phase: experts\n", "expected a mapping with the keys phase, data, args"),
    ("phase: experts\nargs: {max_steps: [1\n", "is not valid YAML"),
])
def test_bad_recipes_are_refused_with_the_file_and_the_fix(tmp_path, text, expected):
    path = _recipe(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"recipe {path}"), message
    assert expected in message, message


def test_set_overrides_keep_strings_and_convert_numbers():
    pairs = ["save_strategy=no", "learning_rate=3e-3", "max_steps=2", "bf16=false", "run_name=001", "report_to=none",
             "warmup_steps=0.1", "resume_from_checkpoint=null", "gradient_checkpointing=True"]
    args = parse_overrides(pairs, phase="experts")
    assert args == {"save_strategy": "no", "learning_rate": 3e-3, "max_steps": 2, "bf16": False, "run_name": "001",
                    "report_to": "none", "warmup_steps": 0.1, "resume_from_checkpoint": None,
                    "gradient_checkpointing": True}


@pytest.mark.parametrize("pairs, expected", [
    (["learnin_rate=1"], "--set learnin_rate: unknown key; did you mean 'learning_rate'?"),
    (["max_steps=abc"], "--set max_steps='abc' is not valid: expected int."),
    (["max_steps="], "--set max_steps='' is not valid: expected int."),
    (["save_strategy=never"],
     "--set save_strategy='never' is not valid: expected one of ['no', 'steps', 'epoch', 'best']."),
    (["beta=0.2"], "--set beta: unknown key"),  # a DPO field is not an experts field
    (["max_steps"], "--set 'max_steps' is not KEY=VALUE"),
])
def test_bad_set_overrides_are_refused(pairs, expected):
    with pytest.raises(ValueError, match=None) as info:
        parse_overrides(pairs, phase="experts")
    assert expected in str(info.value), str(info.value)


def test_dpo_fields_are_known_to_the_dpo_phase():
    assert parse_overrides(["beta=0.2"], phase="dpo") == {"beta": 0.2}


@pytest.mark.parametrize("row, expected", [
    ({"messages": [{"role": "user"}]}, "message 0 needs 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}, "hello"]}, "message 1 needs 'role' and 'content'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": ["not a part"]}]}, "message 0: every content part must be a mapping"),
    ([1, 2], "needs a 'messages' list"),
])
def test_malformed_conversations_name_the_line_and_the_message(tmp_path, row, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError) as info:
        load_conversations(path)
    assert f"{path}:2" in str(info.value) and expected in str(info.value), str(info.value)
