"""Real data through the command line, as real subprocesses: each public schema, written as a small local dataset
from the shipped corpus (test_data_formats.write_schema_datasets), is prepared with `deeptalk prepare` and trained
for 2 steps with `deeptalk train`, streamed and not, on 1 and on 2 processes (`accelerate launch`, DDP over gloo);
`deeptalk evaluate --data` scores spoken-QA datasets in the paper's table; trained and assigned outputs carry the
codec their speech codes belong to, so `deeptalk chat` on them writes a WAV.

Several commands share one subprocess where that saves interpreter starts (`main([...])` is the whole command)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import convert
from datasets import Dataset, load_from_disk
from test_data_formats import ROWS, SPOKEN_QA_FEATURES, write_schema_datasets

REPO = Path(__file__).resolve().parent.parent
DDP_CONFIG = REPO / "deeptalk" / "recipes" / "accelerate" / "ddp.yaml"
STREAMS, CODEBOOK = 7, 256  # the tiny SNAC's layout
TWO_STEPS = ["--set", "max_steps=2", "per_device_train_batch_size=8", "save_strategy=no"]


def _env(tmp, **changes):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_proxy", "_PROXY")) and k != "DEEPTALK_HOME"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "hf_datasets"), DEEPTALK_DEBUG="",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(changes)
    return env


def _cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "deeptalk", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, env=_env(cwd), timeout=timeout)


def _commands(commands, *, cwd, timeout=900):
    """Several `deeptalk` commands in one subprocess; returns (result, exit codes)."""
    code = textwrap.dedent(f"""
        import json, sys
        from deeptalk.cli import main
        codes = [main(argv) for argv in {[[str(a) for a in c] for c in commands]!r}]
        print("@@CODES " + json.dumps(codes))
    """)
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=cwd,
                            env=_env(cwd), timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("@@CODES ")]
    return result, json.loads(lines[-1][8:]) if lines else None


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result.stdout


def _line(stdout, prefix):
    found = [line for line in stdout.splitlines() if line.startswith(prefix)]
    assert found, stdout[-3000:]
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The public schemas as local datasets, a tiny speech model (SNAC 24 kHz's 7 streams, 256 codes) with its
    processor, and the tiny random SNAC whose codes the VoiceAssistant-schema `answer_snac` holds."""
    from deeptalk import DeepTalkProcessor
    from deeptalk.recipes import build_demo_tokenizer
    from deeptalk.tiny import tiny_text_moe, tiny_whisper_config

    root = tmp_path_factory.mktemp("cli_data")
    data = write_schema_datasets(str(root / "data"))
    processor = DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), STREAMS, CODEBOOK)
    model = convert(tiny_text_moe("qwen3_moe", vocab_size=len(processor.tokenizer)), experts=(1, 5))
    model.add_speech(audio_config=tiny_whisper_config(), **processor.model_speech_kwargs())
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    data["voiceassistant"]["codec"].save_pretrained(root / "codec")
    return root, data


def _row_keys(folder):
    """sha1 of each prepared row's input_ids, shard by shard (what the 2-process driver records)."""
    manifest = json.loads((folder / "prepare_manifest.json").read_text())
    return [[hashlib.sha1(json.dumps(ids).encode()).hexdigest()
             for ids in load_from_disk(folder / s["name"])["input_ids"]]
            for s in manifest["shards"]]


# ---------------------------------------------------------------------------------------------- prepare + train
def test_every_schema_prepares_and_trains_streamed_and_not(world):
    root, data = world
    # VoiceAssistant-400K's schema (answer_snac parsed, never re-encoded) and LibriSpeech's, as the README says them
    _line(_ok(_cli("prepare", data["voiceassistant"]["parquet"], "--data-format", "voiceassistant", "--model", "model",
                   "--codec", "codec", "--output", "prep/va", "--shard-size", "4", cwd=root)),
          "deeptalk prepare: 10 of 10 rows (0 too long and 0 invalid dropped) in 3 shards -> prep/va; speech codes of")
    result, codes = _commands([
        ["prepare", data["asr"]["parquet"], "--data-format", "asr", "--model", "model", "--output", "prep/asr",
         "--streaming", "--num-proc", "2", "--shard-size", "3"],
        ["prepare", data["spoken_qa"]["disk"], "--data-format", "spoken_qa", "--model", "model", "--output", "prep/qa"],
        ["prepare", data["messages"]["parquet"], "--data-format", "messages", "--processor", "model",
         "--output", "prep/chat"],
        # today's JSON Lines: spoken answers as audio files, encoded by the codec here, once
        ["prepare", data["jsonl"], "--data-format", "messages", "--model", "model", "--codec", "codec",
         "--output", "prep/jsonl"],
        # every schema mixed by weight (each one prepared), streamed and not, then from the raw files as they are
        ["train", "joint", "--recipe", "tiny_cpu/joint", "--model", "model", "--data", "prep/va:2", "--data",
         "prep/asr:1", "--data", "prep/qa:1", "--data", "prep/chat:1", "--data", "prep/jsonl:1",
         "--output", "out/mixed", *TWO_STEPS],
        ["train", "joint", "--recipe", "tiny_cpu/joint", "--model", "model", "--data", "prep/va:2", "--data",
         "prep/asr:1", "--data", "prep/qa:1", "--data", "prep/chat:1", "--data", "prep/jsonl:1", "--streaming",
         "--output", "out/mixed_streamed", *TWO_STEPS],
        ["train", "align", "--recipe", "tiny_cpu/align", "--model", "model", "--data", data["asr"]["parquet"],
         "--data-format", "asr", "--streaming", "--output", "out/asr_streamed", *TWO_STEPS],
        ["train", "experts", "--recipe", "tiny_cpu/experts_speech", "--model", "model", "--codec", "codec",
         "--data", data["voiceassistant"]["parquet"], "--data", data["spoken_qa"]["parquet"], "--data", data["jsonl"],
         "--data-format", "voiceassistant", "--data-format", "spoken_qa", "--data-format", "messages",
         "--output", "out/raw", *TWO_STEPS],
        ["train", "experts", "--recipe", "tiny_cpu/experts_text", "--model", "model", "--data",
         data["messages"]["disk"], "--streaming", "--output", "out/chat_streamed", *TWO_STEPS],
        # the trained output speaks through the codec it carries
        ["chat", "--model", "out/mixed", "--text", "what is two plus two", "--out", "reply.wav", "--max-steps", "24"],
    ], cwd=root)
    assert codes == [0] * 10, result.stderr[-4000:]
    manifests = {name: json.loads((root / "prep" / name / "prepare_manifest.json").read_text())
                 for name in ("va", "asr", "qa", "chat", "jsonl")}
    assert {n: m["num_rows"] for n, m in manifests.items()} == {"va": ROWS, "asr": ROWS, "qa": ROWS, "chat": ROWS,
                                                                 "jsonl": ROWS + 1}
    assert manifests["asr"]["streamed"] and len(manifests["asr"]["shards"]) == 4
    for name in ("va", "jsonl"):  # the codec the codes belong to, with its weights
        assert manifests[name]["codec"]["weights"] is True
        assert (root / "prep" / name / "codec" / "model.safetensors").is_file()
    assert _line(result.stdout, "deeptalk train") == [
        "deeptalk train joint: 2 steps on 51 conversations -> out/mixed (codec in out/mixed/codec)",
        ("deeptalk train joint: 2 steps on streamed data (5 sources) -> out/mixed_streamed "
         "(codec in out/mixed_streamed/codec)"),
        "deeptalk train align: 2 steps on streamed data (1 source) -> out/asr_streamed",
        "deeptalk train experts: 2 steps on 31 conversations -> out/raw (codec in out/raw/codec)",
        "deeptalk train experts: 2 steps on streamed data (1 source) -> out/chat_streamed",
    ]
    for name in ("mixed", "mixed_streamed", "asr_streamed", "raw", "chat_streamed"):
        files = {p.name for p in (root / "out" / name).iterdir()}
        assert {"model.safetensors", "processor_config.json", "tokenizer.json", "deeptalk_phases.json"} <= files, name
        assert ("codec" in files) == (name in ("mixed", "mixed_streamed", "raw")), name
    assert json.loads((root / "out/mixed/codec/codec_config.json").read_text())["codec_type"] == "snac"

    import soundfile

    wave, rate = soundfile.read(root / "reply.wav")
    assert rate == 24000 and wave.size > 0


# ---------------------------------------------------------------------------------------------- 2 processes
DRIVER = '''
import hashlib, json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from deeptalk.processing_deeptalk import DeepTalkDataCollator

report_dir, cells = sys.argv[1], json.loads(sys.argv[2])
rank, seen, current = int(os.environ.get("RANK", "0")), {}, [None]
collate = DeepTalkDataCollator.__call__

def recording_collate(self, examples):  # which rows this rank's batches hold
    keys = [hashlib.sha1(json.dumps(e["input_ids"]).encode()).hexdigest() for e in examples]
    seen.setdefault(current[0], []).extend(keys)
    return collate(self, examples)

DeepTalkDataCollator.__call__ = recording_collate
from deeptalk.cli import main
codes = {}
for name, argv in cells:
    current[0] = name
    codes[name] = main(argv)
with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"codes": codes, "seen": seen}, f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stream_their_own_parts_unevenly_and_resume(world, tmp_path):
    root, data = world
    _ok(_cli("prepare", data["voiceassistant"]["parquet"], "--data-format", "voiceassistant", "--model", "model",
             "--codec", "codec", "--output", tmp_path / "va", "--shard-size", "3", cwd=root))
    shards = _row_keys(tmp_path / "va")
    assert [len(s) for s in shards] == [3, 3, 3, 1]  # rank 0 reads shards 0 and 2 (6 rows), rank 1 shards 1 and 3 (4)

    def train(name, phase, recipe, data_args, steps, *extra):
        return [name, ["train", phase, "--recipe", recipe, "--model", root / "model", *data_args, "--streaming",
                       "--output", tmp_path / name, *extra, "--set", "bf16=true", f"max_steps={steps}",
                       "per_device_train_batch_size=2", "logging_steps=1",
                       *(["save_strategy=steps", "save_steps=2"] if name != "uneven" else ["save_strategy=no"])]]

    va = ["--data", tmp_path / "va"]
    cells = [
        train("uneven", "experts", "tiny_cpu/experts_speech", va, 3),
        train("raw", "align", "tiny_cpu/align", ["--data", data["asr"]["parquet"], "--data-format", "asr"], 2),
        train("full", "experts", "tiny_cpu/experts_speech", va, 4),
        train("resumed", "experts", "tiny_cpu/experts_speech", va, 4, "--resume-from-checkpoint",
              tmp_path / "full" / "checkpoint-2"),
    ]
    (tmp_path / "driver.py").write_text(DRIVER)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes",
              "2", "--main_process_port", str(_free_port()), str(tmp_path / "driver.py"), str(tmp_path),
              json.dumps([[name, [str(a) for a in argv]] for name, argv in cells])]
    result = subprocess.run(launch, check=False, capture_output=True, text=True, cwd=root, env=_env(root), timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["codes"] for r in reports] == [dict.fromkeys(("uneven", "raw", "full", "resumed"), 0)] * 2
    assert _line(result.stdout, "deeptalk train experts: 3 steps") == [
        (f"deeptalk train experts: 3 steps on streamed data (1 source) -> {tmp_path / 'uneven'} "
         f"(codec in {tmp_path / 'uneven' / 'codec'})")]  # one completion line, from rank 0

    # each rank read its own shards first (6 rows and 4 rows), then went round again: 3 steps of 2 rows each
    first, second = (r["seen"]["uneven"] for r in reports)
    assert first[:6] == shards[0] + shards[2] and second[:4] == shards[1] + shards[3]
    assert len(first) >= 6 and len(second) >= 6 and set(second[4:6]) <= set().union(*shards)
    # a parquet file's single stream shard: each rank keeps every other row, none read twice across ranks
    raw = [r["seen"]["raw"][:4] for r in reports]
    assert len(set(raw[0] + raw[1])) == 8

    # resuming from step 2 skips the rows steps 1-2 read: steps 3-4 see what the uninterrupted run saw
    def losses(name):
        state = json.loads((tmp_path / name / "checkpoint-4" / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    full, resumed = losses("full"), losses("resumed")
    assert len(full) == len(resumed) == 4 and resumed[2:] == pytest.approx(full[2:], rel=1e-3)
    assert resumed[2:] != pytest.approx(full[:2], rel=1e-3)  # not the first steps' batches again


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_scores_spoken_qa_datasets_in_the_papers_table(world):
    root, data = world
    common = ["--codec", "codec", "--limit", "4", "--max-speech-steps", "12", "--max-new-tokens", "4"]
    _ok(_cli("evaluate", "--model", "model", "--data", data["spoken_qa"]["parquet"], "--data",
             data["spoken_qa"]["disk"],
             "--split", "train", *common, "--output", "eval/first.json", cwd=root))
    first = json.loads((root / "eval/first.json").read_text())
    (row,) = first["rows"]
    assert first["datasets"] == ["spoken_qa", "spoken_qa_disk"] and first["match"] == "contains"
    predictions = row["results"]["spoken_qa"]["predictions"]
    assert len(predictions["s2t"]) == len(predictions["s2s_transcripts"]) == 4
    from deeptalk.evaluation.judge import judge_available

    # --asr auto (the default): the pretrained Whisper judge where the whisper extra is installed
    assert row["settings"]["asr"].startswith("whisper") if judge_available() else row["settings"]["asr"] == "own"

    # a dataset whose even rows list the model's own answers among their answers: exactly those rows count
    spoken = Dataset.from_parquet(data["spoken_qa"]["parquet"], cache_dir=str(root / "hf_datasets")).select(range(4))
    from deeptalk.evaluation.judge import normalize_transcript

    answers = [[*row_answers, text, heard] if i % 2 == 0 else ["zzzz qqqq"]
               for i, (row_answers, text, heard) in enumerate(zip(spoken["answers"], predictions["s2t"],
                                                                  predictions["s2s_transcripts"]))]
    Dataset.from_dict({"question": spoken["question"], "answers": answers, "audio": spoken["audio"]},
                      features=SPOKEN_QA_FEATURES).to_parquet(root / "eval" / "own_answers.parquet")
    said = [bool(normalize_transcript(t)) for t in predictions["s2t"]]
    heard = [bool(normalize_transcript(t)) for t in predictions["s2s_transcripts"]]
    result, codes = _commands([
        ["evaluate", "--model", "model", "--data", data["spoken_qa"]["parquet"], "--data",
         root / "eval/own_answers.parquet",
         "--split", "train", *common, "--output", "eval/table.json"],
        ["evaluate", "--model", "out_model", "--data", data["spoken_qa"]["parquet"], "--data",
         root / "eval/own_answers.parquet", "--split", "train", *common, "--no-speech-answers", "--output",
         "eval/table.json"],
    ], cwd=_copy_model(root))
    assert codes == [0, 0], result.stderr[-4000:]
    table = json.loads((root / "eval/table.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["model", "out_model"]
    mine = table["rows"][0]["results"]
    assert mine["own_answers"]["s2t"] == pytest.approx(sum(said[0::2]) / 4)
    assert mine["own_answers"]["s2s"] == pytest.approx(sum(heard[0::2]) / 4)
    assert mine["spoken_qa"]["s2t"] == row["results"]["spoken_qa"]["s2t"]  # the same answers as the first run
    assert table["rows"][1]["results"]["own_answers"]["s2s"] is None
    assert table["rows"][1]["skipped"] == {"spoken_qa S2S": "speech answers were not asked for (--no-speech-answers)",
                                           "own_answers S2S": "speech answers were not asked for (--no-speech-answers)"}
    lines = (root / "eval/table.md").read_text().splitlines()
    assert lines[0] == ("| Model | spoken_qa S2T | spoken_qa S2S | own_answers S2T | own_answers S2S | Avg S2T | "
                        "Avg S2S |")
    assert len(lines) == 4 and lines[3].startswith("| out_model |") and lines[3].count(" - |") == 3


def _copy_model(root):
    """`out_model`: the model again under another name (a second row of the table)."""
    import shutil

    if not (root / "out_model").exists():
        shutil.copytree(root / "model", root / "out_model")
    return root


# ---------------------------------------------------------------------------------------------- assign, codecs
def test_assign_takes_a_codec_and_outputs_carry_it(world, tmp_path):
    root, data = world
    jsonl = data["jsonl"]  # spoken answers given as audio files: measuring their load needs the codec
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question_text"]},
                                                     {"role": "assistant", "content": r["answer_text"]}]}) + "\n"
                            for r in data["messages"]["records"]))
    result, codes = _commands([
        ["assign", "--model", "model", "--text-data", text, "--speech-data", jsonl, "--output", tmp_path / "no_codec"],
        ["assign", "--model", "model", "--text-data", text, "--speech-data", jsonl, "--codec", "codec",
         "--num-speech-experts", "2", "--output", tmp_path / "assigned"],
        ["assign", "--model", tmp_path / "assigned", "--strategy", "random", "--output", tmp_path / "again"],
    ], cwd=root)
    assert codes == [2, 0, 0], result.stderr[-4000:]
    assert "no codec was given" in result.stderr
    for name in ("assigned", "again"):  # given, then carried on from the model folder
        assert (tmp_path / name / "codec" / "model.safetensors").is_file(), name
    assert len(json.loads((tmp_path / "assigned" / "config.json").read_text())["speech_experts"][0]) == 2


def test_a_codec_recorded_without_weights_says_where_they_are(world, tmp_path):
    """VoiceAssistant data prepared for SNAC 24 kHz's layout records that codec as a configuration only (its
    weights are on the Hub): a model carrying it says so when asked to speak."""
    import shutil

    from deeptalk import DeepTalkProcessor
    from deeptalk.recipes import build_demo_tokenizer

    root, data = world
    DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), 7, 4096).save_pretrained(tmp_path / "snac_processor")
    shutil.copytree(root / "model", tmp_path / "model")
    _ok(_cli("prepare", data["voiceassistant"]["parquet"], "--data-format", "voiceassistant", "--processor",
             tmp_path / "snac_processor", "--output", tmp_path / "va", cwd=root))
    shutil.copytree(tmp_path / "va" / "codec", tmp_path / "model" / "codec")
    result = _cli("chat", "--model", tmp_path / "model", "--text", "hi", "--out", tmp_path / "reply.wav", cwd=root)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and line.startswith("deeptalk chat: error: "), result.stderr[-3000:]
    assert "records this model's codec, hubertsiuzdak/snac_24khz (24 kHz, 7 streams x 4096 codes), without its " \
           "weights" in line and "pip install snac" in line and "--codec at hubertsiuzdak/snac_24khz" in line
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- input checks
def test_data_options_are_checked_before_anything_loads(world, tmp_path):
    root, data = world
    (tmp_path / "notes.txt").write_text("x")
    base = ["train", "experts", "--recipe", "tiny_cpu/experts_speech", "--model", "model", "--output", tmp_path / "o"]
    cases = [
        (base + ["--data", "missing.parquet"], "--data missing.parquet: no such file or folder."),
        (base + ["--data", tmp_path / "notes.txt"], "not a data file"),
        (base + ["--data", str(tmp_path / "*.parquet")], "the pattern matches no file."),
        (base + ["--data", "owner/not-cached"], "no cached copy of the Hub dataset 'owner/not-cached'"),
        (base + ["--data", f"{data['asr']['parquet']}:0"], "the weight after ':' must be a finite number > 0"),
        (base + ["--data", f"{data['asr']['parquet']}:1", "--data", data["jsonl"]],
         "give a weight to every --data (SOURCE:WEIGHT"),
        (base + ["--data", data["asr"]["parquet"], "--data", data["jsonl"], "--data-format", "asr", "--data-format",
                 "asr", "--data-format", "messages"], "3 --data-format values for 2 --data sources"),
        (base + ["--data", data["asr"]["parquet"], "--data-format", "asr", "--columns", "question=q"],
         "columns ['question'] are read by none of the formats ['asr']"),
        (base + ["--data", data["asr"]["parquet"], "--columns", "audio"], "--columns 'audio' is not NAME=COLUMN"),
        (base + ["--data", data["asr"]["parquet"], "--data-format", "asr", "--streaming", "--set", "max_steps=-1"],
         "--streaming reads the data as a stream with no length: set max_steps"),
        (["train", "dpo", "--recipe", "tiny_cpu/dpo", "--model", "model", "--output", tmp_path / "o", "--data",
          data["asr"]["parquet"]], "the dpo phase reads preference pairs"),
        (["prepare", data["asr"]["parquet"], "--data-format", "asr", "--output", tmp_path / "p"],
         "give the processor as --model DIR"),
        (["prepare", data["asr"]["parquet"], "--data-format", "asr", "--processor", tmp_path, "--output",
          tmp_path / "p"],
         "has no processor_config.json"),
        (["prepare", data["asr"]["parquet"], "--data-format", "asr", "--model", "model", "--answer-modality", "speech",
          "--output", tmp_path / "p"], "answer_modality='speech' needs spoken answers"),
        (["evaluate", "--model", "model", "--data", data["spoken_qa"]["parquet"], "--base-model", "model",
          "--output", tmp_path / "e.json"], "--base-model scores the demo corpus's text QA"),
    ]
    result, codes = _commands([argv for argv, _ in cases], cwd=root)
    assert codes == [2] * len(cases), result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if " error: " in line]
    assert len(errors) == len(cases), result.stderr[-4000:]
    for line, (argv, expected) in zip(errors, cases, strict=True):
        assert line.startswith(f"deeptalk {argv[0]}: error: ") and expected in line, (line, expected)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


def test_prepare_help_is_light_and_formats_match_the_library(tmp_path):
    code = textwrap.dedent("""
        import sys
        from deeptalk.cli import DATA_FORMAT_CHOICES, main
        for argv in (["prepare", "--help"], ["train", "--help"], ["evaluate", "--help"]):
            try:
                main(argv)
            except SystemExit as exit:
                assert exit.code == 0, argv
        heavy = sorted(m for m in ("torch", "transformers", "datasets", "numpy") if m in sys.modules)
        print("HEAVY", heavy, file=sys.stderr)
        from deeptalk.data.formats import DATA_FORMATS
        assert tuple(DATA_FORMAT_CHOICES) == tuple(DATA_FORMATS)
    """)
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=tmp_path,
                            env=_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stderr
    assert "SOURCE:WEIGHT" in result.stdout and "voiceassistant" in result.stdout
