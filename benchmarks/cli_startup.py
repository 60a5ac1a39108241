# Copyright 2026 The deeptalk authors. Apache-2.0.
"""How fast the command line answers: `deeptalk --help`, every subcommand's `--help`, and the error for
a Hub id that cannot be fetched (offline mode, and a Hub that refuses connections).

Each command runs as a fresh subprocess (`python -m deeptalk ...`) `--runs` times, interleaved with
the baseline `python -c pass` so that all see the same machine load; the script prints the median
wall time of each, its ratio to the baseline, and whether the help imported torch or transformers
(it must not).

    OMP_NUM_THREADS=1 python benchmarks/cli_startup.py                 # 9 runs per command
    python benchmarks/cli_startup.py --runs 21 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["demo", "quickstart", "chat", "evaluate", "push", "space", "convert", "train", "assign"]
# Run inside the timed child after the help: which heavy packages the help pulled in.
IMPORTS_PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['deeptalk', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('deeptalk', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'yaml') if m in sys.modules), file=sys.stderr)\n"
)


def timed(argv: list[str], env: dict, expected_code: int = 0) -> float:
    start = time.perf_counter()
    code = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
    elapsed = time.perf_counter() - start
    if code != expected_code:
        raise SystemExit(f"{' '.join(argv)} exited with {code}, not {expected_code}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="timed runs per command (the median is reported)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    cases = {"python -c pass": [sys.executable, "-c", "pass"],
             "deeptalk --help": [sys.executable, "-m", "deeptalk", "--help"]}
    cases.update({f"deeptalk {c} --help": [sys.executable, "-m", "deeptalk", c, "--help"] for c in COMMANDS})
    hub_id = [sys.executable, "-m", "deeptalk", "convert", "deepseek-ai/DeepSeek-V2-Lite-Chat", "unused_out"]
    errors = {  # a Hub id that is not cached: one line and exit code 2
        "convert HUB_ID (offline)": (hub_id, {"HF_HUB_CACHE": os.devnull + "_no_cache"}),
        "convert HUB_ID (no network)": (hub_id, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9",
                                                 "HF_HUB_CACHE": os.devnull + "_no_cache"}),
    }
    runs = {name: (argv, env, 0) for name, argv in cases.items()}
    runs.update({name: (argv, {**env, **extra}, 2) for name, (argv, extra) in errors.items()})
    for argv, run_env, code in runs.values():  # warm the file cache and check every command answers
        timed(argv, run_env, code)
    times = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, (argv, run_env, code) in runs.items():
            times[name].append(timed(argv, run_env, code))

    baseline = statistics.median(times["python -c pass"])
    rows = []
    print(f"{'command':<28} {'median ms':>10} {'x python -c pass':>17}  heavy imports")
    for name, samples in times.items():
        median = statistics.median(samples)
        heavy = ""
        if name in cases and name != "python -c pass":
            probe = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, *cases[name][3:]], env=env,
                                   capture_output=True, text=True, check=True)
            heavy = probe.stderr.strip().splitlines()[-1]
        rows.append({"command": name, "median_ms": round(median * 1000, 1), "ratio": round(median / baseline, 2),
                     "min_ms": round(min(samples) * 1000, 1), "imports": heavy})
        print(f"{name:<28} {median * 1000:>10.1f} {median / baseline:>17.2f}  {heavy}")
    print(f"({args.runs} runs each, interleaved; {os.cpu_count()} logical CPUs; loadavg {os.getloadavg()[0]:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "python": sys.version.split()[0],
                                               "logical_cpus": os.cpu_count(), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
