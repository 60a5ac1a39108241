#!/usr/bin/env python
# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Memory of reading data as it grows, and prepare's throughput (CPU).

Synthetic data in local parquet folders (1000-row files):

* ``clips``: rows in the ASR schema (``audio``: a 1-second 16 kHz clip as WAV bytes, ``text``), up to
  ``--clip-rows`` (10k) rows;
* ``codes``: rows in the VoiceAssistant schema with text questions (``question``, ``answer``,
  ``answer_snac``: ~1 s of random SNAC 24 kHz codes), up to ``--code-rows`` (100k) rows.

Measured, each in its own fresh subprocess so that its peak RSS is its own:

1. **Iterating** N rows (``--sizes``, default 1k, 10k, 100k) through a ``torch.utils.data.DataLoader``
   with ``DeepTalkDataCollator`` (batch 8), the way a trainer would read them (no model):
   ``raw``: conversations straight from parquet (``load_conversation_dataset``; the collator encodes each
   clip on the fly), streamed or memory-mapped; ``prepared``: rows from ``prepare_dataset``'s shards
   (memory-mapped ``load_prepared_dataset``, or streamed). Clip data stops at ``--clip-rows``; larger
   sizes use the prepared code rows.
2. **Prepare throughput**: ``prepare_dataset`` rows/s with ``num_proc`` 1 and 2 on the same rows
   (``--throughput-rows``), clips (audio -> log-mel features) and code rows (``answer_snac`` parsed),
   and the CPU time it spent per row (its own and its map workers'), which other processes' load
   disturbs far less than rows/s.

Peak RSS is read from ``VmHWM`` after resetting the high-water mark to the current RSS right before
the loop (``echo 5 > /proc/self/clear_refs``), so loading code and opening the data are not counted.
Memory-mapped Arrow pages count as RSS once touched (file-backed page cache, shared and dropped under
memory pressure), so that peak grows with the bytes read; the loop therefore also samples ``RssAnon``
(the process's own heap) every 4 batches and reports its largest growth: the number that must stay
flat as the data grows. Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers leave
the heap. "other load" is CPU used by other processes during a block (prepare's own map workers
excluded); rows/s from blocks flagged ``(!)`` are not trustworthy on a shared machine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_memory.py                 # ~35 min on 2 busy cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_memory.py --quick         # smoke run, ~5 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/data_memory.py --json data_memory.json

A script, not a test: it checks the row counts it reads, never the memory or the speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # run as a script (benchmarks/ is sys.path[0]) or as `python -m benchmarks.<script>`
    from _common import ForeignLoad, load_flag, machine_info
except ModuleNotFoundError:
    from benchmarks._common import ForeignLoad, load_flag, machine_info

FILE_ROWS = 1000
BATCH = 8
WORDS = ("what", "is", "the", "colour", "of", "a", "red", "apple", "three", "plus", "four", "seven", "yes", "no",
         "where", "does", "anna", "live", "paris", "cat", "dog", "sky", "blue", "green", "how", "many", "legs")


# ---------------------------------------------------------------------------------------------- memory probes
def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- synthetic data
def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


def write_clips(folder: str, rows: int, seed: int = 0):
    """`rows` ASR-schema rows with 1-second 16 kHz clips, as parquet files of FILE_ROWS rows."""
    import numpy as np
    import soundfile as sf
    from datasets import Audio, Dataset, Features, Value

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    features = Features({"audio": Audio(sampling_rate=16000), "text": Value("string")})
    for start in range(0, rows, FILE_ROWS):
        audio, text = [], []
        for i in range(start, min(start + FILE_ROWS, rows)):
            f0 = rng.uniform(100, 300)
            wave = 0.3 * np.sin(2 * np.pi * f0 * t) * np.hanning(16000) + 0.01 * rng.standard_normal(16000)
            buffer = io.BytesIO()
            sf.write(buffer, wave.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
            audio.append({"bytes": buffer.getvalue(), "path": f"clip-{i:06d}.wav"})
            text.append(_sentence(rng, 6))
        Dataset.from_dict({"audio": audio, "text": text}, features=features).to_parquet(
            os.path.join(folder, f"part-{start // FILE_ROWS:05d}.parquet"))


def write_codes(folder: str, rows: int, frames: int = 12, seed: int = 0):
    """`rows` VoiceAssistant-schema rows with text questions and `frames` frames (~1 s) of random SNAC codes."""
    import numpy as np
    from datasets import Dataset, Features, Value

    from deeptalk.data.formats import format_answer_snac

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    features = Features({"split_name": Value("string"), "index": Value("int64"), "round": Value("int64"),
                         "question": Value("string"), "answer": Value("string"), "answer_snac": Value("string")})
    for start in range(0, rows, FILE_ROWS):
        n = min(FILE_ROWS, rows - start)
        Dataset.from_dict({
            "split_name": ["synthetic"] * n, "index": list(range(start, start + n)), "round": [0] * n,
            "question": [_sentence(rng, 8) for _ in range(n)], "answer": [_sentence(rng, 4) for _ in range(n)],
            "answer_snac": [format_answer_snac(rng.integers(0, 4096, size=(7, frames))) for _ in range(n)],
        }, features=features).to_parquet(os.path.join(folder, f"part-{start // FILE_ROWS:05d}.parquet"))


def files(folder: str, rows: int) -> list[str]:
    return [os.path.join(folder, f"part-{i:05d}.parquet") for i in range(-(-rows // FILE_ROWS))]


def build_processor():
    from deeptalk import DeepTalkProcessor
    from deeptalk.recipes import build_demo_tokenizer

    return DeepTalkProcessor.from_codec_layout(build_demo_tokenizer(), 7, 4096)  # SNAC 24 kHz's layout


def conversations(kind: str, folder: str, rows: int, streaming: bool, cache_dir: str):
    """The first `rows` rows of a synthetic folder as conversations."""
    from deeptalk.data import load_conversation_dataset

    options = {"data_format": "asr"} if kind == "clips" else {"data_format": "voiceassistant",
                                                              "question_modality": "text"}
    data = load_conversation_dataset(files(folder, rows), streaming=streaming, cache_dir=cache_dir,
                                     split="train" if streaming else f"train[:{rows}]", **options)
    return data.take(rows) if streaming else data


# ---------------------------------------------------------------------------------------------- workers
def worker_iterate(spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from deeptalk import DeepTalkDataCollator
    from deeptalk.data import load_prepared_dataset

    torch.set_num_threads(1)
    processor = build_processor()
    rows, streaming = spec["rows"], spec["streaming"]
    if spec["source"] == "raw":
        data = conversations(spec["kind"], spec["folder"], rows, streaming, spec["cache_dir"])
    else:
        data = load_prepared_dataset(spec["folder"], streaming=streaming)
        data = data.take(rows) if streaming else data.select(range(rows))
    loader = DataLoader(data, batch_size=BATCH, collate_fn=DeepTalkDataCollator(processor), num_workers=0)
    anon0, rss0 = status_kib("RssAnon"), status_kib("VmRSS")
    reset = reset_peak_rss()
    anon_max, seen, started = anon0, 0, time.perf_counter()
    with ForeignLoad() as load:
        for step, batch in enumerate(loader):
            seen += batch["input_ids"].shape[0]
            if step % 4 == 0:
                anon_max = max(anon_max, status_kib("RssAnon"))
    seconds = time.perf_counter() - started
    anon_max = max(anon_max, status_kib("RssAnon"))
    if seen != rows:
        raise RuntimeError(f"read {seen} rows, expected {rows}")
    return {"rss_before_mib": rss0 / 1024, "peak_mib": status_kib("VmHWM") / 1024,
            "peak_growth_mib": (status_kib("VmHWM") - rss0) / 1024, "anon_growth_mib": (anon_max - anon0) / 1024,
            "rows_per_s": rows / seconds, "seconds": seconds, "peak_reset": reset, "foreign_load": load.cores,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker_prepare(spec: dict) -> dict:
    import datasets

    from deeptalk.data import prepare_dataset

    datasets.disable_progress_bars()
    processor = build_processor()
    data = conversations(spec["kind"], spec["folder"], spec["rows"], False, spec["cache_dir"])
    started, children, own = time.perf_counter(), _children_cpu_s(), _own_cpu_s()
    with ForeignLoad() as load:
        prepared = prepare_dataset(data, processor, output_dir=spec["output"], num_proc=spec["num_proc"],
                                   shard_size=spec["shard_size"], data_format=spec["format"], overwrite=True)
    seconds = time.perf_counter() - started
    children = _children_cpu_s() - children
    if load.cores is not None:  # map's worker processes are ours, not foreign load
        load.cores = max(0.0, load.cores - children / seconds)
    cpu = children + _own_cpu_s() - own
    if len(prepared) != spec["rows"]:
        raise RuntimeError(f"prepared {len(prepared)} rows, expected {spec['rows']}")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(spec["output"]) for f in fs)
    return {"rows_per_s": spec["rows"] / seconds, "seconds": seconds, "foreign_load": load.cores,
            "cpu_ms_per_row": 1000 * cpu / spec["rows"],
            "mib_on_disk": size / 2**20, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- driver
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1000,10000,100000", help="rows read in the iteration runs")
    parser.add_argument("--clip-rows", type=int, default=10_000, help="largest 1-second-clip dataset")
    parser.add_argument("--throughput-rows", type=int, default=2000, help="rows prepared with 1 and 2 processes")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--parts", default="prepare,iterate", help="what to measure: prepare, iterate or both")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200/1000 rows, clips up to 1000")
    parser.add_argument("--workdir", help="keep the synthetic data here (default: a temporary folder)")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps((worker_iterate if spec["task"] == "iterate" else worker_prepare)(spec)))
        return
    import datasets

    datasets.disable_progress_bars()
    if args.quick:
        args.sizes, args.clip_rows, args.throughput_rows, args.shard_size = "200,1000", 1000, 400, 500
    sizes = sorted(int(s) for s in args.sizes.split(","))
    code_rows, clip_rows = max(sizes), min(args.clip_rows, max(sizes))
    work = args.workdir or tempfile.mkdtemp(prefix="deeptalk-data-memory-")
    paths = {k: os.path.join(work, k) for k in ("clips", "codes", "cache", "prepared_clips", "prepared_codes", "tp")}
    results = {"machine": machine_info(1, mem_total=True), "args": vars(args), "iterate": [], "prepare": []}
    try:
        started = time.perf_counter()
        write_clips(paths["clips"], clip_rows)
        write_codes(paths["codes"], code_rows)
        print(f"synthetic data: {clip_rows} clip rows, {code_rows} code rows ({time.perf_counter() - started:.0f} s)",
              flush=True)

        def prepare(kind, rows, num_proc, output, fmt):
            spec = {"task": "prepare", "kind": kind, "folder": paths[kind], "rows": rows, "num_proc": num_proc,
                    "output": output, "shard_size": args.shard_size, "format": fmt, "cache_dir": paths["cache"]}
            result = dict(run_worker(spec), kind=kind, rows=rows, num_proc=num_proc)
            results["prepare"].append(result)
            print(f"prepare {kind:5s} {rows:>7d} rows, {num_proc} proc: {result['rows_per_s']:8.1f} rows/s, "
                  f"{result['cpu_ms_per_row']:.2f} CPU ms/row ({result['mib_on_disk']:.0f} MiB, other load "
                  f"{load_flag(result['foreign_load'])})", flush=True)

        parts = args.parts.split(",")
        if "prepare" in parts:
            tp = min(args.throughput_rows, clip_rows)
            for kind, fmt in (("clips", "asr"), ("codes", "voiceassistant")):
                for num_proc in (1, 2):
                    prepare(kind, tp, num_proc, paths["tp"], fmt)
        if "iterate" in parts:
            prepare("clips", clip_rows, 2, paths["prepared_clips"], "asr")
            prepare("codes", code_rows, 2, paths["prepared_codes"], "voiceassistant")

        for rows in sizes if "iterate" in parts else ():
            runs = []
            if rows <= clip_rows:
                runs += [("clips", "raw", paths["clips"]), ("clips", "prepared", paths["prepared_clips"])]
            runs += [("codes", "prepared", paths["prepared_codes"])]
            for kind, source, folder in runs:
                for streaming in (False, True):
                    spec = {"task": "iterate", "kind": kind, "source": source, "folder": folder, "rows": rows,
                            "streaming": streaming, "cache_dir": paths["cache"]}
                    result = dict(run_worker(spec), kind=kind, source=source, rows=rows, streaming=streaming)
                    results["iterate"].append(result)
                    print(f"iterate {kind:5s} {source:8s} {'streamed' if streaming else 'mapped':8s} {rows:>7d} rows: "
                          f"peak +{result['peak_growth_mib']:7.1f} MiB, heap +{result['anon_growth_mib']:6.1f} MiB, "
                          f"{result['rows_per_s']:8.1f} rows/s (other load {load_flag(result['foreign_load'])})",
                          flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def print_tables(results):
    if results["iterate"]:
        print_iterate_table(results)
    if results["prepare"]:
        print_prepare_table(results)


def print_iterate_table(results):
    print("\n| data | source | read as | rows | RSS before (MiB) | peak growth (MiB) | heap growth (MiB) | rows/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results["iterate"]:
        print(f"| {r['kind']} | {r['source']} | {'streamed' if r['streaming'] else 'memory-mapped'} | {r['rows']} | "
              f"{r['rss_before_mib']:.0f} | {r['peak_growth_mib']:.1f} | {r['anon_growth_mib']:.1f} | "
              f"{r['rows_per_s']:.0f} |")


def print_prepare_table(results):
    print("\n| data | rows | processes | rows/s | vs 1 process | CPU ms/row | on disk (MiB) | other load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for r in results["prepare"]:
        key = (r["kind"], r["rows"])
        base.setdefault(key, r["rows_per_s"] if r["num_proc"] == 1 else None)
        ratio = f"{r['rows_per_s'] / base[key]:.2f}x" if base.get(key) else "-"
        print(f"| {r['kind']} | {r['rows']} | {r['num_proc']} | {r['rows_per_s']:.1f} | {ratio} | "
              f"{r['cpu_ms_per_row']:.2f} | {r['mib_on_disk']:.1f} | {load_flag(r['foreign_load'])} |")


if __name__ == "__main__":
    main()
