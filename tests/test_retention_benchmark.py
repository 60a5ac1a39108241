"""benchmarks/retention.py runs end to end in its --quick mode (tiny sizes, a few steps, every strategy, the
ablations and the control sweep in one run) and writes a JSON holding every section docs/retention.md reads:
per strategy the relative text drop with its 95 % interval, the speech metrics, the control sweep and the
ablations; the plots are PNG files. Nothing is asserted about which strategy wins (the quick run is far
too small for that)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "retention.py")
STRATEGIES = ("adaptive", "random", "moextend", "full_finetune", "lora", "by_token_modality")
ABLATIONS = {"speech_experts_1", "router_trained", "dense_layer_frozen", "no_phase_2b"}
ACCURACIES = ("kinds_accuracy", "spoken_qa_accuracy", "audio_token_accuracy", "world_text_accuracy")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=3600, check=False)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("retention")
    out = tmp_path / "retention.json"
    proc = run(["--quick", "--ablations", "--control-sweep", "--json", str(out), "--original-llm-dir",
                str(tmp_path / "original"), "--phase1-dir", str(tmp_path / "phase1")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), out, proc.stdout


def check_interval(summary, seeds, low=-math.inf, high=math.inf):
    assert set(summary) == {"mean", "ci_low", "ci_high", "n", "values"}
    assert summary["n"] == len(summary["values"]) == len(seeds)
    assert all(math.isfinite(v) and low <= v <= high for v in summary["values"])
    assert summary["mean"] == pytest.approx(sum(summary["values"]) / len(summary["values"]))
    assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    if len(set(summary["values"])) > 1:  # a spread gives an interval of nonzero width
        assert summary["ci_low"] < summary["mean"] < summary["ci_high"]


def test_every_strategy_has_its_drop_with_an_interval(quick):
    payload, _, stdout = quick
    seeds = payload["settings"]["seeds"]
    assert len(seeds) >= 2 and set(payload["strategies"]) == set(STRATEGIES)
    assert "relative text drop" in stdout  # the table was printed
    original = payload["original_llm"]["kinds_accuracy"]["test"]
    assert 0 < original <= 1  # the quick original LLM learns something, so relative drops are defined
    for name, row in payload["strategies"].items():
        check_interval(row["text_relative_drop"], seeds, high=1)
        for key in ACCURACIES:
            check_interval(row[key], seeds, 0, 1)
        assert row["judge_s2s_accuracy"] is None  # the judge hook is off without --judge-asr
        # the drop is (original - new) / original of each seed's final accuracy
        for seed in map(str, seeds):
            run_ = payload["runs"]["main"][seed][name]
            assert run_["text_relative_drop"] == pytest.approx((original - run_["kinds_accuracy"]) / original)
            assert [s["stage"] for s in run_["stages"]] == ["speech", "text", "joint"]
            assert all(s["steps"] > 0 and s["trainable_parameters"] > 0 for s in run_["stages"])
    paired = payload["paired_vs_adaptive"]
    assert set(paired) == set(STRATEGIES) - {"adaptive"}
    for name, diffs in paired.items():  # per-seed differences to adaptive, from the same runs
        check_interval(diffs["text_relative_drop"], seeds)
        expected = [payload["runs"]["main"][str(s)][name]["text_relative_drop"]
                    - payload["runs"]["main"][str(s)]["adaptive"]["text_relative_drop"] for s in seeds]
        assert diffs["text_relative_drop"]["values"] == pytest.approx(expected)


def test_strategies_train_what_they_say(quick):
    payload, _, _ = quick
    run_ = payload["runs"]["main"][str(payload["settings"]["seeds"][0])]
    k = payload["settings"]["num_speech_experts"]
    layers = payload["settings"]["num_hidden_layers"]
    for name in ("adaptive", "random", "by_token_modality"):  # k existing experts per MoE layer
        experts = run_[name]["speech_experts"]
        assert 0 < len(experts) < layers and all(len(set(e)) == k for e in experts)  # the first layer is dense
    assert run_["full_finetune"]["speech_experts"] is None and run_["lora"]["speech_experts"] is None
    trainable = {name: run_[name]["stages"][0]["trainable_parameters"] for name in STRATEGIES}
    # the speech stage: full fine-tuning trains the most, LoRA adapters and the speech experts far less
    assert trainable["full_finetune"] > max(v for n, v in trainable.items() if n != "full_finetune")
    assert run_["by_token_modality"]["stages"][0]["routing_mode"] == "by_token_modality"


def test_phase1_keeps_the_text_skill_and_data_is_disjoint(quick):
    payload, _, _ = quick
    # phase 1 trains the encoder, adapter and audio rows only: text answers are the original LLM's
    phase1, original = payload["phase1"]["kinds_accuracy"], payload["original_llm"]["kinds_accuracy"]["test"]
    one_question = 1 / payload["data"]["kinds_questions"]["test"]  # conversion matches the source's logits to ~1e-5
    assert all(abs(v - original) <= one_question + 1e-9 for v in phase1["values"])
    data = payload["data"]
    assert data["test_questions_in_speech_data"] == 0 and data["speech_texts_naming_a_thing_or_kind"] == 0
    assert data["speech_texts_checked"] > 0 and data["kinds_questions"]["test"] > 0


def test_ablations_and_control_sweep(quick):
    payload, _, _ = quick
    seeds = payload["settings"]["seeds"]
    assert set(payload["ablations"]) >= ABLATIONS
    for row in payload["ablations"].values():
        check_interval(row["text_relative_drop"], seeds, high=1)
    seed_runs = payload["runs"]["main"][str(seeds[0])]
    assert [s["stage"] for s in seed_runs["no_phase_2b"]["stages"]] == ["speech", "joint"]
    assert all(len(e) == 1 for e in seed_runs["speech_experts_1"]["speech_experts"])
    sweep = payload["control_sweep"]
    assert sweep["split"] == "validation"
    points = sweep["curves"]["full_finetune"]
    steps = [p["speech_steps"] for p in points]
    assert steps == sorted(steps) and len(set(steps)) >= 2
    for point in points:
        check_interval(point["text_relative_drop"], sweep["seeds"], high=1)
        assert point["stage_steps"]["speech"] == point["speech_steps"]


def test_the_plots_are_pngs(quick):
    _, out, _ = quick
    for suffix in (".png", "_control_sweep.png", "_ablations.png"):
        with open(str(out.with_suffix("")) + suffix, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_replot_redraws_from_the_json(quick, tmp_path):
    _, out, _ = quick
    plot = tmp_path / "again.png"
    proc = run(["--replot", str(out), "--plot", str(plot)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relative text drop" in proc.stdout and plot.read_bytes()[:8] == PNG_MAGIC


def test_saved_original_and_phase1_models_are_reused(quick, tmp_path):
    payload, out, _ = quick
    again = tmp_path / "again.json"
    proc = run(["--quick", "--strategies", "adaptive", "--json", str(again), "--original-llm-dir",
                str(out.parent / "original"), "--phase1-dir", str(out.parent / "phase1")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "original LLM: reusing" in proc.stdout and "teaching the original LLM" not in proc.stdout
    second = json.loads(again.read_text())
    assert second["original_llm"]["kinds_accuracy"] == payload["original_llm"]["kinds_accuracy"]
    for seed in map(str, payload["settings"]["seeds"]):
        reused, first = second["runs"]["main"][seed]["phase1"], payload["runs"]["main"][seed]["phase1"]
        assert reused["reused"] == str(out.parent / "phase1" / f"phase1_main_{seed}") and "reused" not in first
        assert reused["stages"] == first["stages"]  # the saved training record
        for key in ("kinds_accuracy", "spoken_qa_accuracy", "audio_token_accuracy"):  # the same model
            assert reused[key] == first[key]


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    proc = run(["--quick", "--strategies", "adaptive,nope"], tmp_path)
    assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr
    proc = run(["--quick", "--seeds", "0"], tmp_path)
    assert proc.returncode == 2 and "at least two --seeds" in proc.stderr
    proc = run(["--json", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "is a folder" in proc.stderr


@pytest.fixture(scope="module")
def retention():
    spec = importlib.util.spec_from_file_location("retention_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_critical_matches_tables(retention, df, expected):
    assert retention.t_critical(df) == pytest.approx(expected, abs=1e-4)


def test_summarize_interval(retention):
    summary = retention.summarize([0.1, 0.2, 0.3, None])
    half = retention.t_critical(2) * 0.1 / math.sqrt(3)
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(0.2)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert not retention.excludes_zero(summary)  # the interval reaches below 0
    assert retention.excludes_zero(retention.summarize([0.3, 0.4, 0.5]))
    assert retention.excludes_zero(retention.summarize([-0.3, -0.4, -0.5]))



def test_kind_questions_are_distinct_disjoint_and_answered_right():
    from deeptalk.data.demo_world import KIND_OF_THING, THING_KINDS, kind_questions, num

    test = kind_questions(300, seed=1)
    assert kind_questions(300, seed=1) == test  # deterministic
    train = kind_questions(600, seed=3, exclude=[q.question for q in test])
    assert len({q.question for q in test + train}) == 900  # distinct within and across splits
    for item in test + train:
        asked, listed = item.question.split(" in [")
        things = listed.rstrip("]").split(",")
        kind = next(k for k in THING_KINDS if k in asked)  # "a tool", "an instrument", "pieces of furniture"
        of_kind = [t for t in things if KIND_OF_THING[t] == kind]
        if item.template == "which_is":
            assert of_kind == [item.answer]
        elif item.template == "which_is_not":
            assert [t for t in things if KIND_OF_THING[t] != kind] == [item.answer]
        else:
            assert item.template == "how_many" and item.answer == num(len(of_kind))
    with pytest.raises(ValueError, match="unknown kind template"):
        kind_questions(3, templates=["nope"])
