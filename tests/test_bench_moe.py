"""benchmarks/bench_moe.py --processes: the benchmark runs in fresh processes (real subprocesses, tiny model,
one round) and reports each ratio's median over them next to every process's value. Nothing is asserted
about speed."""

import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_moe.py")


def test_processes_report_the_median_of_every_processs_ratio(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--families", "deepseek_v2", "--sizes", "tiny", "--modes", "free", "--no-speech-step", "--warmup", "0",
            "--repeats", "1", "--new-tokens", "4", "--threads", "1", "--processes", "3", "--json", str(out)]
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("## process ") == 3 and "Median over 3 processes" in proc.stdout
    payload = json.loads(out.read_text())
    assert len(payload["runs"]) == 3
    rows = {(r["phase"], r["mode"]): r for r in payload["median_over_processes"]}
    assert set(rows) == {("prefill", "converted:free"), ("decode", "converted:free")}
    for (phase, mode), row in rows.items():
        per_process = [run["results"][0][phase][mode]["ratio_of_medians"] for run in payload["runs"]]
        assert row["per_process"] == per_process and all(r > 0 for r in per_process)
        assert row["ratio_of_medians"] == statistics.median(per_process)
    # every process checked the converted model against its source before timing it
    assert all(run["results"][0]["free_greedy_tokens_equal"] for run in payload["runs"])
