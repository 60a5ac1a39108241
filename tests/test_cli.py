"""The command line's first impression and its input checks, as real subprocesses of `python -m deeptalk`:
help without torch or transformers, the lazy Auto registration, one-line errors (exit code 2) for
missing folders, unreachable Hub ids, bad counts and bad output paths, before anything loads."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import convert

from deeptalk.tiny import tiny_text_moe

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["demo", "quickstart", "chat", "evaluate", "push", "space", "convert", "upgrade", "train", "assign"]


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_proxy", "_PROXY")) and k != "DEEPTALK_HOME"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", DEEPTALK_DEBUG="")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _cli(*args, cwd, timeout=120, **env):
    return subprocess.run([sys.executable, "-m", "deeptalk", *args], check=False, capture_output=True, text=True,
                          cwd=cwd, env=_env(**env), timeout=timeout)


def _python(code, *, cwd, timeout=300, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          cwd=cwd, env=_env(**env), timeout=timeout)


def _one_line_error(result, command, expected):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"deeptalk {command}: error: "), result.stderr[-3000:]
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny saved DeepTalk model (config, safetensors, remote-code files) with its processor."""
    from deeptalk import DeepTalkProcessor
    from deeptalk.processing.tokenizer import train_demo_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = train_demo_tokenizer(["what does the dog say woof"], vocab_size=120)
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, 2, 8)
    model = convert(tiny_text_moe("qwen3_moe"), experts=(1, 5))
    model.add_speech(processor.layout)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_model_with_speech_processor(tmp_path_factory):
    """A text-only model saved next to a processor with two audio streams: fine to train, not to run."""
    from deeptalk import DeepTalkProcessor
    from deeptalk.processing.tokenizer import train_demo_tokenizer

    folder = tmp_path_factory.mktemp("text") / "model"
    tokenizer = train_demo_tokenizer(["what does the dog say woof"], vocab_size=120)
    convert(tiny_text_moe("qwen3_moe"), experts=(1, 5)).save_pretrained(folder)
    DeepTalkProcessor.from_codec_layout(tokenizer, 2, 8).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------ help and imports


def test_help_imports_neither_torch_nor_transformers(tmp_path):
    result = _python(f"""
        import sys
        import deeptalk
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "import deeptalk"
        from deeptalk.cli import main
        for argv in ([], *([c] for c in {COMMANDS!r})):
            try:
                main([*argv, "--help"])
            except SystemExit as exit:
                assert exit.code == 0, argv
        heavy = sorted(m for m in ("torch", "transformers", "numpy", "soundfile") if m in sys.modules)
        print("HEAVY", heavy, file=sys.stderr)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stderr
    assert "(default: deeptalk_output/quickstart/model)" in result.stdout  # defaults are shown


def test_help_names_the_home_folder_of_the_defaults(tmp_path):
    result = _cli("chat", "--help", cwd=tmp_path, DEEPTALK_HOME=str(tmp_path / "home"), COLUMNS="400")
    assert result.returncode == 0
    assert f"(default: {tmp_path / 'home' / 'quickstart' / 'model'})" in " ".join(result.stdout.split())
    assert "DEEPTALK_HOME" in result.stdout


def test_routing_mode_choices_match_the_config():
    from deeptalk.cli import build_parser
    from deeptalk.configuration_deeptalk import ROUTING_MODES

    convert_parser = build_parser()._subparsers._group_actions[0].choices["convert"]
    action = next(a for a in convert_parser._actions if a.dest == "routing_mode")
    assert set(action.choices) == set(ROUTING_MODES)


@pytest.mark.parametrize("imports", [
    "import deeptalk",
    "import deeptalk; from transformers import WhisperModel",  # transformers' Auto modules load mid-import
    "import deeptalk.modeling_deeptalk",  # transformers is first imported by a half-imported deeptalk module
])
def test_import_deeptalk_makes_the_auto_classes_load_deeptalk_folders(model_dir, tmp_path, imports):
    result = _python(f"""
        import sys
        {imports}
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        import deeptalk
        config = AutoConfig.for_model("deeptalk")
        assert type(config) is deeptalk.DeepTalkConfig, type(config)
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})  # no trust_remote_code
        assert type(model) is deeptalk.DeepTalkForCausalLM, type(model).__module__
        assert type(AutoModel.from_pretrained({str(model_dir)!r})) is deeptalk.DeepTalkModel
        print("LOADED", type(model).__module__)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED deeptalk.modeling_deeptalk" in result.stdout


# ------------------------------------------------------------------------------------ missing models, the Hub


def test_default_model_missing_outside_the_clone_says_run_quickstart(tmp_path):
    result = _cli("chat", "--text", "hi", cwd=tmp_path)
    _one_line_error(result, "chat", "no model at deeptalk_output/quickstart/model: run `deeptalk quickstart` first "
                                    "or pass --model DIR")
    home = tmp_path / "home"
    result = _cli("evaluate", cwd=tmp_path, DEEPTALK_HOME=str(home))
    _one_line_error(result, "evaluate", f"no model at {home / 'quickstart' / 'model'}: run `deeptalk quickstart`")


@pytest.mark.parametrize("command", [
    ["chat", "--text", "hi", "--model", "{missing}"],
    ["evaluate", "--model", "{missing}"],
    ["convert", "{missing}", "out"],
    ["assign", "--model", "{missing}", "--output", "out", "--strategy", "random"],
    ["train", "joint", "--recipe", "tiny_cpu/joint", "--model", "{missing}", "--data", "d.jsonl", "--output", "out"],
    ["push", "me/repo", "--model", "{missing}", "--export-only", "repo"],
    ["space", "app", "--model", "{missing}"],
])
@pytest.mark.parametrize("missing", ["./no_model", "runs/no/model", "~/surely_no_deeptalk_model_here"])
def test_a_missing_model_folder_is_not_taken_for_a_hub_id(tmp_path, command, missing):
    argv = [a.replace("{missing}", missing) for a in command]
    option = "SRC" if command[0] == "convert" else "--model"
    _one_line_error(_cli(*argv, cwd=tmp_path), command[0], f"{option} {missing}: no such folder.")


@pytest.mark.parametrize("command, option", [
    (["convert", "deepseek-ai/DeepSeek-V2-Lite-Chat", "out"], "SRC"),
    (["chat", "--text", "hi", "--model", "someone/deeptalk-model"], "--model"),
    (["chat", "--text", "hi", "--model", "{model}", "--codec", "hubertsiuzdak/snac_24khz"], "--codec"),
    (["evaluate", "--model", "{model}", "--base-model", "deepseek-ai/DeepSeek-V2-Lite"], "--base-model"),
    (["evaluate", "--model", "{model}", "--asr", "openai/whisper-large-v3"], "--asr"),
    (["assign", "--model", "someone/deeptalk-model", "--output", "out", "--strategy", "random"], "--model"),
    (["train", "joint", "--recipe", "tiny_cpu/joint", "--model", "someone/m", "--data", "d.jsonl", "--output", "o"],
     "--model"),
    (["quickstart", "--base-model", "deepseek-ai/DeepSeek-V2-Lite"], "--base-model"),
])
def test_hub_ids_fail_fast_in_offline_mode_and_without_network(tmp_path, model_dir, command, option):
    argv = [a.replace("{model}", str(model_dir)) for a in command]
    repo = argv[argv.index(option) + 1] if option != "SRC" else argv[1]
    offline = _cli(*argv, cwd=tmp_path, HF_HUB_CACHE=str(tmp_path / "cache"))
    line = _one_line_error(offline, command[0], f"{option} {repo}: no such folder, and offline mode (HF_HUB_OFFLINE=1)")
    assert f"hf download {repo} --local-dir DIR" in line
    # a Hub that cannot be reached (port 9 refuses at once), offline mode not set
    no_network = _cli(*argv, cwd=tmp_path, HF_HUB_OFFLINE=None, HF_ENDPOINT="http://127.0.0.1:9",
                      HF_HUB_CACHE=str(tmp_path / "cache"), timeout=60)
    _one_line_error(no_network, command[0], f"{option} {repo}: no such folder, and no network to reach http://127.0.0.1:9")


def test_quickstart_refuses_the_ctc_loss_without_the_ctc_adapter(tmp_path):
    _one_line_error(_cli("quickstart", "--audio-adapter", "stack", "--align-loss", "ctc", cwd=tmp_path), "quickstart",
                    "--align-loss ctc trains the CTC adapter's head, but --audio-adapter is stack")
    assert not (tmp_path / "deeptalk_output").exists()  # refused before any work


def test_a_cached_hub_id_without_network_switches_to_offline_mode(tmp_path):
    snapshot = tmp_path / "cache" / "models--someone--model" / "snapshots" / "0123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    result = _python("""
        import os, sys
        from deeptalk.cli import check_source
        print(check_source("someone/model", "--model"), os.environ["HF_HUB_OFFLINE"])
        assert "torch" not in sys.modules
    """, cwd=tmp_path, HF_HUB_OFFLINE=None, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["someone/model", "1"]
    assert "using the cached copy of someone/model" in result.stderr


def test_a_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli("chat", "--text", "hi", "--model", "empty", cwd=tmp_path), "chat",
                    "--model empty has no config.json: it is not a saved model folder.")
    (tmp_path / "file").write_text("x")
    _one_line_error(_cli("evaluate", "--model", "file", cwd=tmp_path), "evaluate", "--model file is a file")


def test_uploads_are_refused_up_front_offline(tmp_path, model_dir):
    _one_line_error(_cli("push", "me/repo", "--model", str(model_dir), cwd=tmp_path), "push",
                    "push uploads to the Hub, but offline mode is on (HF_HUB_OFFLINE=1): unset it, or use "
                    "--export-only")
    _one_line_error(_cli("space", "app", "--model", str(model_dir), "--push", "me/space", cwd=tmp_path), "space",
                    "space --push uploads to the Hub, but offline mode is on")
    assert not (tmp_path / "app").exists()


# ------------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "--limit", "0"], "argument --limit: must be a positive integer, got 0"),
    (["evaluate", "--limit", "-1"], "argument --limit: must be a positive integer, got -1"),
    (["convert", "tiny:qwen3_moe", "out", "--num-speech-experts", "0"],
     "argument --num-speech-experts: must be a positive integer, got 0"),
    (["assign", "--model", "m", "--output", "o", "--num-speech-experts", "0"], "must be a positive integer, got 0"),
    (["chat", "--text", "hi", "--max-steps", "0"], "argument --max-steps: must be a positive integer, got 0"),
    (["chat", "--text", "hi", "--repetition-penalty", "0"], "argument --repetition-penalty: must be a positive number"),
    (["chat", "--text", "hi", "--seed", "-3"], "argument --seed: must be 0 or more, got -3"),
    (["assign", "--model", "m", "--output", "o", "--batch-size", "0"],
     "argument --batch-size: must be a positive integer"),
    (["evaluate", "--limit", "two"], "argument --limit: invalid int value: 'two'"),
])
def test_zero_and_negative_counts_are_refused(tmp_path, argv, expected):
    result = _cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr


# ------------------------------------------------------------------------------------ output paths


@pytest.mark.parametrize("out, expected", [
    ("missing_dir/reply.wav", "--out missing_dir/reply.wav: the folder"),
    (".", "--out . is a folder; give a file name such as ./reply.wav"),
    ("reply", "--out reply: has no extension; use e.g. reply.wav"),
    ("reply.txt", "--out reply.txt: extension .txt is not an audio format"),
])
def test_chat_refuses_a_bad_out_before_the_model_loads(tmp_path, model_dir, out, expected):
    result = _python(f"""
        import sys
        from deeptalk.cli import main
        code = main(["chat", "--model", {str(model_dir)!r}, "--text", "hi", "--out", {out!r}])
        assert code == 2 and "torch" not in sys.modules, (code, sorted(sys.modules))
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"deeptalk chat: error: {expected}" in result.stderr, result.stderr


def test_evaluate_refuses_an_unwritable_output_before_evaluating(tmp_path, model_dir):
    (tmp_path / "a_file").write_text("x")
    for output, expected in (("a_file/results.json", "is not a folder"), (".", "--output . is a folder")):
        result = _python(f"""
            import sys
            from deeptalk.cli import main
            code = main(["evaluate", "--model", {str(model_dir)!r}, "--output", {output!r}])
            assert code == 2 and "torch" not in sys.modules, code
        """, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "deeptalk evaluate: error: --output " in result.stderr and expected in result.stderr, result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs POSIX modes, and sysfs when run as root")
def test_evaluate_refuses_a_read_only_folder(tmp_path, model_dir):
    if os.geteuid() == 0:  # root writes into any folder mode 0o500 allows; sysfs refuses new entries even to root
        locked = Path("/sys/kernel")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    result = _cli("evaluate", "--model", str(model_dir), "--output", str(locked / "r.json"), cwd=tmp_path)
    _one_line_error(result, "evaluate", "cannot write into")


def test_evaluate_and_chat_refuse_a_processor_that_does_not_fit_the_model(tmp_path, text_model_with_speech_processor):
    model = str(text_model_with_speech_processor)
    result = _cli("evaluate", "--model", model, "--output", str(tmp_path / "r.json"), cwd=tmp_path)
    _one_line_error(result, "evaluate", "the processor's speech layout (2 streams x 8) is not the model's (none)")
    assert not (tmp_path / "r.json").exists()
    result = _cli("chat", "--model", model, "--text", "hi", "--out", str(tmp_path / "a.wav"), cwd=tmp_path)
    _one_line_error(result, "chat", "the processor's speech layout (2 streams x 8) is not the model's (none)")


def test_convert_refuses_to_write_over_its_source_or_a_file(tmp_path, model_dir):
    (tmp_path / "a_file").write_text("x")
    _one_line_error(_cli("convert", "tiny:qwen3_moe", "a_file", cwd=tmp_path), "convert", "OUT a_file is a file")
    _one_line_error(_cli("train", "joint", "--recipe", "tiny_cpu/joint", "--model", str(model_dir), "--data", "a_file",
                         "--output", str(model_dir), cwd=tmp_path), "train", "is the input given to --model")


def test_write_results_is_strict_json(tmp_path):
    from deeptalk.evaluation.evaluate import write_results

    path = tmp_path / "out" / "results.json"
    written = write_results({"text_qa_accuracy": float("nan"), "asr": {"wer": float("inf"), "cer": 0.5},
                             "warnings": {}}, str(path))

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    on_disk = json.loads(path.read_text(), parse_constant=refuse)
    assert on_disk == written
    assert on_disk["text_qa_accuracy"] is None and on_disk["asr"] == {"wer": None, "cer": 0.5}
    assert set(on_disk["warnings"]) == {"text_qa_accuracy", "asr.wer"}
    assert not math.isnan(json.loads(json.dumps(written))["asr"]["cer"])
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left


# ------------------------------------------------------------------------------------ recipes, data, tracebacks


def test_train_refuses_bad_recipes_and_overrides_before_loading(tmp_path, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "typo.yaml").write_text("phase: joint\ndata:\n  max_lenght: 64\nargs:\n  max_steps: 2\n")
    (tmp_path / "broken.yaml").write_text("phase: joint\nargs: {max_steps: [1\n")
    base = ["train", "joint", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o")]
    cases = [
        (["--recipe", "typo.yaml"],
         "recipe typo.yaml: unknown key 'max_lenght' under 'data'; did you mean 'max_length'?"),
        (["--recipe", "tiny_cpu/joint", "--set", "learnin_rate=0.1"],
         "--set learnin_rate: unknown key; did you mean 'learning_rate'?"),
        (["--recipe", "tiny_cpu/joint", "--set", "save_strategy=sometimes"],
         "--set save_strategy='sometimes' is not valid: expected one of"),
        (["--recipe", "broken.yaml"], "recipe broken.yaml is not valid YAML"),
    ]
    # one process for all cases: each `main()` call is the whole command; the recipe checks import the trainers once
    result = _python(f"""
        import sys
        from deeptalk.cli import main
        for extra in {[extra for extra, _ in cases]!r}:
            code = main({base!r} + extra)
            print(f"@@ exit {{code}}", file=sys.stderr)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = [b.strip() for b in result.stderr.split("@@")][:-1]
    assert len(blocks) == len(cases), result.stderr[-3000:]
    for block, (_, expected) in zip(blocks, cases, strict=True):
        line = block.splitlines()[-1]
        assert line.startswith("deeptalk train: error: ") and expected in line, block
    assert result.stderr.count("@@ exit 2") == len(cases)
    assert "DEEPTALK_DEBUG=1 shows the traceback" in blocks[0]
    assert not (tmp_path / "o").exists()


def test_debug_variable_shows_the_traceback(tmp_path):
    argv = ["convert", "tiny:qwen3_moe", "out", "--speech-experts", "not json"]
    _one_line_error(_cli(*argv, cwd=tmp_path), "convert",
                    "--speech-experts: 'not json' is neither a JSON file nor inline JSON")
    loud = _cli(*argv, cwd=tmp_path, DEEPTALK_DEBUG="1")
    assert loud.returncode != 0 and "Traceback (most recent call last)" in loud.stderr
    assert "is neither a JSON file nor inline JSON" in loud.stderr


def test_assign_needs_both_data_files_for_measured_strategies(tmp_path, model_dir):
    _one_line_error(_cli("assign", "--model", str(model_dir), "--output", "o", "--text-data", "t.jsonl", cwd=tmp_path),
                    "assign", "--strategy adaptive measures the modality load: pass --speech-data FILE.jsonl")
    _one_line_error(_cli("assign", "--model", str(model_dir), "--output", "o", "--text-data", "t.jsonl",
                         "--speech-data", "s.jsonl", cwd=tmp_path), "assign", "--text-data t.jsonl: no such file.")


def test_chat_checks_its_question_file(tmp_path, model_dir):
    _one_line_error(_cli("chat", "--model", str(model_dir), "--audio", "q.wav", cwd=tmp_path), "chat",
                    "--audio q.wav: no such file.")
    _one_line_error(_cli("chat", "--model", str(model_dir), cwd=tmp_path), "chat",
                    "give the question as --audio FILE or as --text '...', one of the two.")
