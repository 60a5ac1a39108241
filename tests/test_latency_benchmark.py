"""benchmarks/latency.py runs end to end (tiny config, one round) and its JSON is complete and
consistent: every stage is there and positive, the stages add up to the time to first chunk, and
the step counts follow the delayed layout. No timing thresholds."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIRST_CHUNK_PARTS = ("features_ms", "encoder_ms", "llm_prefill_ms", "decode_to_first_chunk_ms",
                     "codec_first_chunk_ms", "stream_overhead_ms")
POSITIVE_KEYS = FIRST_CHUNK_PARTS + (
    "ttfc_ms", "prefill_ms", "steps_to_first_chunk", "decode_forwards_to_first_chunk", "per_step_ms",
    "step_forward_ms", "decode_ms", "codec_total_ms", "e2e_ms", "steps", "frames", "audio_s", "rtf",
    "forward_rows", "per_step_ms_vs_source", "step_forward_ms_vs_source")
ANSWER_SECONDS, TEXT_TOKENS = 0.6, 4


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency") / "latency.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "latency.py"), "--config", "tiny", "--repeats", "1",
           "--warmup", "0", "--answer-seconds", str(ANSWER_SECONDS), "--text-tokens", str(TEXT_TOKENS),
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TTFC" in proc.stdout and "end to end" in proc.stdout  # the tables were printed
    with open(out) as f:
        return json.load(f)


def test_every_variant_has_every_stage_and_positive_numbers(result):
    assert result["config"] == "tiny" and result["machine"]["cpu_model"]
    variants = {(r["variant"]["strategy"], r["variant"]["cache"]) for r in result["rows"]}
    assert variants == {(s, c) for s in ("single_pass", "batch_parallel") for c in ("dynamic", "static")}
    assert {r["variant"]["first_chunk_frames"] for r in result["rows"]} == {1, 4}
    assert {r["lookahead_frames"] for r in result["rows"]} == {0, result["info"]["codec"]["default_decode_context"]}
    for row in result["rows"]:
        for key in POSITIVE_KEYS:
            assert row[key] > 0, (row["label"], key, row[key])
    for cache in ("dynamic", "static"):
        assert result["source"][cache]["per_token_ms"] > 0
    chat = result["chat_api"]
    assert chat["ttfc_ms"] > 0 and chat["e2e_ms"] >= chat["ttfc_ms"]


def test_stages_add_up_to_the_time_to_first_chunk(result):
    for row in result["rows"]:
        parts = sum(row[key] for key in FIRST_CHUNK_PARTS)
        assert parts == pytest.approx(row["ttfc_ms"], rel=0.05, abs=1.0), row["label"]
        assert row["encoder_ms"] + row["llm_prefill_ms"] == pytest.approx(row["prefill_ms"], rel=1e-6, abs=1e-6)
        assert row["e2e_ms"] >= row["ttfc_ms"] and row["decode_ms"] >= row["decode_to_first_chunk_ms"]
    for name, runs in result["raw"].items():
        for run in runs:
            if "ttfc_residual_ms" in run:
                assert abs(run["ttfc_residual_ms"]) <= 0.05 * run["ttfc_ms"] + 1.0, name


def test_step_counts_follow_the_layout_and_the_forced_answer(result):
    delays, answer = result["info"]["delays"], result["answer"]
    frame_rate = result["info"]["codec"]["frame_rate"]
    assert answer["frames"] == round(ANSWER_SECONDS * frame_rate)
    assert answer["max_steps"] == answer["frames"] + max(delays)
    for row in result["rows"]:
        v = row["variant"]
        assert row["steps_to_first_chunk"] == max(delays) + v["first_chunk_frames"] + row["lookahead_frames"]
        assert row["decode_forwards_to_first_chunk"] == row["steps_to_first_chunk"] - 1
        assert row["steps"] == answer["max_steps"] and row["frames"] == answer["frames"]
        assert row["audio_s"] == pytest.approx(answer["frames"] / frame_rate)
        single_rows = answer["max_steps"] - 1
        if v["strategy"] == "single_pass":
            assert row["forward_rows"] == single_rows
        elif v["cache"] == "static":  # the text-only copy cannot leave a static cache
            assert row["forward_rows"] == 2 * single_rows
        else:  # two rows until the step that emits EOT, then one
            assert row["forward_rows"] == single_rows + TEXT_TOKENS
