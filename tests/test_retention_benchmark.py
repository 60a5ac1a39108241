"""benchmarks/retention.py runs end to end in its --quick mode (tiny sizes, a few steps) and writes a JSON
holding every section the README reads: per strategy the relative text drop with its 95 % interval,
the speech metrics, the control sweep and the ablations; the plots are PNG files. Nothing is asserted
about which strategy wins (the quick run is far too small for that)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "retention.py")
STRATEGIES = ("adaptive", "random", "moextend", "full_finetune", "lora", "by_token_modality")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("retention")
    out = tmp_path / "retention.json"
    proc = run(["--quick", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "relative text drop" in proc.stdout  # the table was printed
    with open(out) as f:
        return json.load(f), out


def check_interval(summary, seeds):
    assert set(summary) == {"mean", "ci_low", "ci_high", "n", "values"}
    assert summary["n"] == len(summary["values"]) == len(seeds)
    assert all(math.isfinite(v) for v in summary["values"])
    assert summary["mean"] == pytest.approx(sum(summary["values"]) / len(summary["values"]))
    assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]


def test_every_strategy_has_its_drop_with_an_interval(quick):
    payload, _ = quick
    seeds = payload["settings"]["seeds"]
    assert len(seeds) >= 2 and set(payload["strategies"]) == set(STRATEGIES)
    original = payload["original_llm"]["kinds_accuracy"]["test"]
    assert 0 < original <= 1  # the quick original LLM learns something, so relative drops are defined
    for name, row in payload["strategies"].items():
        check_interval(row["text_relative_drop"], seeds)
        for key in ("kinds_accuracy", "spoken_qa_accuracy", "audio_token_accuracy", "world_text_accuracy"):
            check_interval(row[key], seeds)
        assert row["judge_s2s_accuracy"] is None  # the judge hook is off without --judge-asr
        # the drop is (original - new) / original of each seed's final accuracy
        for seed in map(str, seeds):
            run_ = payload["runs"]["main"][seed][name]
            assert run_["text_relative_drop"] == pytest.approx((original - run_["kinds_accuracy"]) / original)
            assert [s["stage"] for s in run_["stages"]] == ["speech", "text", "joint"]
    paired = payload["paired_vs_adaptive"]
    assert set(paired) == set(STRATEGIES) - {"adaptive"}
    check_interval(paired["full_finetune"]["text_relative_drop"], seeds)


def test_phase1_keeps_the_text_skill_and_data_is_disjoint(quick):
    payload, _ = quick
    # phase 1 trains the encoder, adapter and audio rows only: text answers are the original LLM's
    phase1, original = payload["phase1"]["kinds_accuracy"], payload["original_llm"]["kinds_accuracy"]["test"]
    one_question = 1 / payload["data"]["kinds_questions"]["test"]  # conversion matches the source's logits to ~1e-5
    assert all(abs(v - original) <= one_question + 1e-9 for v in phase1["values"])
    data = payload["data"]
    assert data["test_questions_in_speech_data"] == 0 and data["speech_texts_naming_a_thing_or_kind"] == 0
    assert data["speech_texts_checked"] > 0 and data["kinds_questions"]["test"] > 0


def test_the_plot_is_a_png(quick):
    _, out = quick
    with open(out.with_suffix(".png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_control_sweep_and_ablations_run(tmp_path):
    out = tmp_path / "sweep.json"
    proc = run(["--quick", "--strategies", "adaptive", "--ablations", "--control-sweep", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    sweep = payload["control_sweep"]
    assert sweep["split"] == "validation"
    points = sweep["curves"]["full_finetune"]
    assert [p["speech_steps"] for p in points] == sorted(p["speech_steps"] for p in points) and len(points) >= 2
    for point in points:
        check_interval(point["text_relative_drop"], sweep["seeds"])
    assert set(payload["ablations"]) >= {"router_trained", "dense_layer_frozen", "no_phase_2b", "speech_experts_1"}
    for name, row in payload["ablations"].items():
        check_interval(row["text_relative_drop"], payload["settings"]["seeds"])
    no_2b = payload["runs"]["main"][str(payload["settings"]["seeds"][0])]["no_phase_2b"]
    assert [s["stage"] for s in no_2b["stages"]] == ["speech", "joint"]
    for suffix in ("_control_sweep.png", "_ablations.png"):
        with open(str(out.with_suffix("")) + suffix, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    proc = run(["--quick", "--strategies", "adaptive,nope"], tmp_path)
    assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr
    proc = run(["--quick", "--seeds", "0"], tmp_path)
    assert proc.returncode == 2 and "at least two --seeds" in proc.stderr
