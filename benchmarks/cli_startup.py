# Copyright 2026 The deeptalk authors. Apache-2.0.
"""How fast the command line answers: `deeptalk --help` and every subcommand's `--help`.

Each command runs as a fresh subprocess (`python -m deeptalk ... --help`) `--runs` times, interleaved
with the baseline `python -c pass` so that both see the same machine load; the script prints the
median wall time of each, its ratio to the baseline, and whether the help imported torch or
transformers (it must not).

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


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


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
    for argv in cases.values():  # warm the file cache and check every command answers
        timed(argv, env)
    times = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, argv in cases.items():
            times[name].append(timed(argv, env))

    baseline = statistics.median(times["python -c pass"])
    rows = []
    print(f"{'command':<28} {'median ms':>10} {'x python -c pass':>17}  heavy imports")
    for name, samples in times.items():
        median = statistics.median(samples)
        heavy = ""
        if name != "python -c pass":
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
