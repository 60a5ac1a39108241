#!/usr/bin/env python
"""Generate the tiny offline demo speech corpus shipped in ``deeptalk/data/demo_corpus``.

The corpus is *synthetic*: every utterance is produced by the ``espeak-ng``
formant synthesiser from the templated world in :mod:`deeptalk.data.demo_world`.
It exists so that CPU demos, unit/integration tests and the quickstart can run
end to end without any download.  It is **not** a benchmark of real speech:
numbers measured on it say nothing about performance on natural recordings.

What gets written (``--out``, default ``deeptalk/data/demo_corpus``)::

    audio/questions/sqa-<split>-NNNNN.flac   spoken questions (several voices)
    audio/answers/<answer>.flac              one-word spoken answers (one "assistant" voice,
                                             one file per distinct answer word)
    audio/answer_sentences/<sentence>.flac   sentence-length spoken answers ("the dog says woof"),
                                             same voice, one file per distinct sentence
    audio/statements/stm-<split>-NNNNN.flac  plain statements (extra ASR material)
    spoken_qa/{train,validation,test}.jsonl
    asr/{train,validation,test}.jsonl
    text_qa/{train,validation,test}.jsonl
    world.json      the fact tables of the world
    manifest.json   generator settings, tool versions, counts, sizes
    README.md       human-readable description (generated from the same data)

Every unique question text is assigned to exactly one split (stratified per
template), and the same assignment is used for ``spoken_qa`` and the question
part of ``asr``; so no speech test question is ever heard in training. The
text LLM is taught, in text, every question it is later asked by voice:
``text_qa``'s train split also holds the text of the spoken validation and test
questions, and its held-out splits hold text-only questions.
Facts are shared between splits on purpose (paraphrases / other templates).

Generation is deterministic for a given ``--seed`` and espeak-ng version
(the audio bytes may differ across espeak-ng / libsndfile versions, the
metadata does not).

Requirements: ``apt-get install -y espeak-ng`` (sox is *not* needed; resampling
uses ``torchaudio.functional.resample``), plus torch/torchaudio/soundfile/numpy.

Usage::

    python scripts/make_demo_corpus.py            # regenerate in place
    python scripts/make_demo_corpus.py --out /tmp/demo --spoken-train 100
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_world():
    """Import ``deeptalk/data/demo_world.py`` by path: it is pure Python, and this avoids
    importing the whole ``deeptalk`` package (torch/transformers) just to generate data."""
    import importlib.util

    path = REPO_ROOT / "deeptalk" / "data" / "demo_world.py"
    spec = importlib.util.spec_from_file_location("_deeptalk_demo_world", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # needed by @dataclass
    spec.loader.exec_module(mod)
    return mod


W = _load_world()

SAMPLE_RATE = 16_000
SPLITS = ("train", "validation", "test")

# espeak-ng voices (language[+variant]) used for the *questions* / statements.
QUESTION_VOICES: Tuple[str, ...] = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-029",
    "en+m3",
    "en+f3",
    "en-us+f2",
    "en-gb-x-rp+f4",
)
# The single, fixed "assistant" voice used for every spoken answer.
ASSISTANT_VOICE = {"voice": "en-us+f5", "rate": 160, "pitch": 50}
QUESTION_RATE_RANGE = (150, 190)  # words per minute (espeak -s)
QUESTION_PITCH_RANGE = (30, 70)  # espeak -p, 0..99

SPOKEN_CATEGORY_MIX = {"arithmetic": 0.4, "yes_no": 0.3, "fact": 0.3}


# ---------------------------------------------------------------------------
# sentence answers
# ---------------------------------------------------------------------------
def answer_sentence(item: W.QAItem) -> str:
    """The spoken assistant's full-sentence answer to ``item`` ("the dog says woof").

    It holds the one-word answer and restates what was asked, so an ASR judge hears a sentence rather than
    a lone word; a "no" answer states the true fact ("no, the apple is red").
    """
    w, answer, t = item.question.split(), item.answer, item.template
    if t in ("plus", "minus", "times", "plus_how_much", "minus_how_much"):
        return f"{w[-3]} {w[-2]} {w[-1]} is {answer}"
    if t in ("after", "before"):
        return f"{answer} comes {t} {w[-1]}"
    if t in ("bigger", "smaller"):
        a, b = w[1], w[4]
        relation = t if answer == "yes" else ("smaller" if t == "bigger" else "bigger")
        return f"{answer}, {a} is {relation} than {b}"
    if t == "older":
        a, b = w[1], w[4]
        return f"{answer}, {a} is {'older' if answer == 'yes' else 'younger'} than {b}"
    if t in ("color", "color_of"):
        return f"the {w[-1]} is {answer}"
    if t == "is_color":
        return f"{answer}, the {w[2]} is {W.OBJECT_COLORS[w[2]]}"
    if t in ("lives", "lives_city"):
        return f"{w[-2]} lives in {answer}"
    if t == "who_lives":
        return f"{answer} lives in {w[-1]}"
    if t == "lives_in":
        return f"{answer}, {w[1]} lives in {W.PEOPLE[w[1]]['city']}"
    if t in ("pet", "pet_animal"):
        return f"{w[-2]} has a {answer}"
    if t == "has_pet":
        return f"{answer}, {w[1]} has a {W.PEOPLE[w[1]]['pet']}"
    if t in ("age", "age_of"):
        return f"{w[-1]} is {answer} years old"
    if t in ("sound", "sound_make"):
        return f"the {w[3] if t == 'sound' else w[4]} says {answer}"
    if t == "who_says":
        return f"the {answer} says {w[-1]}"
    if t == "says":
        return f"{answer}, the {w[2]} says {W.ANIMAL_SOUNDS[w[2]]}"
    if t == "legs":
        return f"a {w[5]} has {answer} legs"
    if t == "has_legs":
        return f"{answer}, a {w[2]} has {W.num(W.ANIMAL_LEGS[w[2]])} legs"
    raise ValueError(f"no sentence answer for template {t!r} ({item.question!r})")

TRIM_THRESHOLD_DB = -50.0  # relative to the peak
PAD_START_S = 0.05
PAD_END_S = 0.08
PEAK_LEVEL = 0.6
FLAC_COMPRESSION_LEVEL = 1.0  # soundfile scale 0..1 (max = smallest files)
MAX_MB = 28.0  # disk budget of the shipped folder (MiB, du-style)


# ---------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------
def espeak_version() -> str:
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # pragma: no cover - environment
        raise SystemExit(
            "espeak-ng is required to *regenerate* the corpus (the shipped corpus needs nothing).\n"
            "Install it with: apt-get install -y espeak-ng"
        ) from e
    return out.split("Data at")[0].strip().rstrip(":").strip()  # "eSpeak NG text-to-speech: 1.51"


def synthesize(text: str, voice: str, rate: int, pitch: int, tmpdir: str) -> np.ndarray:
    """espeak-ng -> float32 mono 16 kHz, edge silence trimmed, peak normalised."""
    fd, wav_path = tempfile.mkstemp(suffix=".wav", dir=tmpdir)
    os.close(fd)
    try:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", wav_path, text],
            check=True, capture_output=True,
        )
        x, sr = sf.read(wav_path, dtype="float32", always_2d=True)
    finally:
        os.unlink(wav_path)
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        x = AF.resample(torch.from_numpy(x), sr, SAMPLE_RATE).numpy()
    peak = float(np.abs(x).max())
    if peak <= 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r} ({voice})")
    loud = np.flatnonzero(np.abs(x) >= peak * 10 ** (TRIM_THRESHOLD_DB / 20))
    start = max(0, loud[0] - int(PAD_START_S * SAMPLE_RATE))
    end = min(len(x), loud[-1] + 1 + int(PAD_END_S * SAMPLE_RATE))
    x = x[start:end] * (PEAK_LEVEL / peak)
    return x.astype(np.float32)


def write_flac(path: Path, audio: np.ndarray) -> float:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16",
             compression_level=FLAC_COMPRESSION_LEVEL)
    return round(len(audio) / SAMPLE_RATE, 3)


# ---------------------------------------------------------------------------
# splitting / sampling
# ---------------------------------------------------------------------------
def split_stratified(items: Sequence, key, rng: random.Random, frac_val: float, frac_test: float) -> Dict[str, list]:
    """Assign each item to one split, stratified by ``key(item)``."""
    groups: Dict[str, list] = defaultdict(list)
    for it in items:
        groups[key(it)].append(it)
    out: Dict[str, list] = {s: [] for s in SPLITS}
    for name in sorted(groups):
        g = list(groups[name])
        rng.shuffle(g)
        n = len(g)
        n_test = max(1, round(n * frac_test)) if n >= 3 else 0
        n_val = max(1, round(n * frac_val)) if n >= 3 else 0
        out["test"] += g[:n_test]
        out["validation"] += g[n_test:n_test + n_val]
        out["train"] += g[n_test + n_val:]
    return out


def round_robin_by_template(items: List[W.QAItem], rng: random.Random) -> List[W.QAItem]:
    """Shuffle, then interleave templates so any prefix covers many templates."""
    by_t: Dict[str, List[W.QAItem]] = defaultdict(list)
    for it in items:
        by_t[it.template].append(it)
    queues = []
    for t in sorted(by_t):
        q = list(by_t[t])
        rng.shuffle(q)
        queues.append(q)
    rng.shuffle(queues)
    out: List[W.QAItem] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out


def sample_spoken(pool: List[W.QAItem], n: int, rng: random.Random) -> List[W.QAItem]:
    """Pick ``n`` distinct questions, mixing categories per SPOKEN_CATEGORY_MIX."""
    by_cat: Dict[str, List[W.QAItem]] = {c: [] for c in SPOKEN_CATEGORY_MIX}
    for it in pool:
        by_cat[it.category].append(it)
    ordered = {c: round_robin_by_template(v, rng) for c, v in by_cat.items()}
    want = {c: int(round(n * f)) for c, f in SPOKEN_CATEGORY_MIX.items()}
    chosen: List[W.QAItem] = []
    for c in SPOKEN_CATEGORY_MIX:
        take = ordered[c][:want[c]]
        chosen += take
        ordered[c] = ordered[c][len(take):]
    leftovers = [it for c in SPOKEN_CATEGORY_MIX for it in ordered[c]]
    rng.shuffle(leftovers)
    chosen += leftovers[: max(0, n - len(chosen))]
    chosen = chosen[:n]
    rng.shuffle(chosen)
    return chosen


def voice_cycle(rng: random.Random):
    """Endless balanced stream of (voice, rate, pitch) for question speakers."""
    while True:
        voices = list(QUESTION_VOICES)
        rng.shuffle(voices)
        for v in voices:
            yield v, rng.randint(*QUESTION_RATE_RANGE), rng.randint(*QUESTION_PITCH_RANGE)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def dir_size_bytes(path: Path, block: int = 4096) -> int:
    """Disk usage like ``du`` (each file rounded up to ``block`` bytes), the budget metric."""
    return sum(-(-p.stat().st_size // block) * block for p in path.rglob("*") if p.is_file())


def write_jsonl(path: Path, records: List[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "deeptalk" / "data" / "demo_corpus")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--world-seed", type=int, default=0, help="seed of demo_world.all_questions (false yes/no picks)")
    ap.add_argument("--spoken-train", type=int, default=288)
    ap.add_argument("--spoken-validation", type=int, default=36)
    ap.add_argument("--spoken-test", type=int, default=36)
    ap.add_argument("--statements-train", type=int, default=48)
    ap.add_argument("--statements-validation", type=int, default=6)
    ap.add_argument("--statements-test", type=int, default=6)
    ap.add_argument("--frac-validation", type=float, default=0.1)
    ap.add_argument("--frac-test", type=float, default=0.1)
    ap.add_argument("--max-mb", type=float, default=MAX_MB,
                    help="fail if the corpus folder uses more disk (MiB, du-style 4 KiB blocks)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(1)
    version = espeak_version()
    rng = random.Random(args.seed)
    out: Path = args.out.resolve()

    # Clean only what this script owns.
    for sub in ("audio", "spoken_qa", "asr", "text_qa"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for f in ("world.json", "manifest.json", "README.md"):
        (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # ---- text QA: every world question, one split per unique question ----
    questions = W.all_questions(args.world_seed)
    q_split = split_stratified(questions, lambda it: it.template, rng, args.frac_validation, args.frac_test)

    # ---- spoken QA: a subset of each split's pool ----
    spoken_n = {"train": args.spoken_train, "validation": args.spoken_validation, "test": args.spoken_test}
    spoken_items = {s: sample_spoken(q_split[s], spoken_n[s], rng) for s in SPLITS}
    spoken_split = {it.question: s for s in SPLITS for it in spoken_items[s]}
    # The text LLM is taught, in text, every question it is later asked by voice (its "knowledge"): the
    # spoken validation/test questions move to text_qa's train split, so text_qa's held-out splits are
    # text-only questions and a spoken test question is new to the ears, not to the LLM.
    text_split = {"train": list(q_split["train"]) + [it for s in ("validation", "test") for it in spoken_items[s]],
                  **{s: [it for it in q_split[s] if it.question not in spoken_split] for s in ("validation", "test")}}

    # ---- statements (ASR only) ----
    statements = [(t, tmpl) for t, tmpl in W.all_statements()]
    st_split_all = split_stratified(statements, lambda x: x[1], rng, args.frac_validation, args.frac_test)
    st_n = {"train": args.statements_train, "validation": args.statements_validation, "test": args.statements_test}
    st_split = {}
    for s in SPLITS:
        pool = list(st_split_all[s])
        rng.shuffle(pool)
        # Prefer non-arithmetic sentences first (they carry the world facts).
        pool.sort(key=lambda x: x[1] in ("plus", "minus", "bigger"))
        st_split[s] = pool[: st_n[s]]

    # ---- synthesis jobs ----
    voices = voice_cycle(rng)
    jobs = []  # (relpath, text, voice, rate, pitch)
    spoken_records: Dict[str, List[dict]] = {s: [] for s in SPLITS}
    answer_rel: Dict[str, str] = {}
    sentence_rel: Dict[str, str] = {}
    for s in SPLITS:
        for i, it in enumerate(spoken_items[s]):
            v, r, p = next(voices)
            rid = f"sqa-{s}-{i:05d}"
            qrel = f"audio/questions/{rid}.flac"
            jobs.append((qrel, it.question, v, r, p))
            if it.answer not in answer_rel:
                arel = f"audio/answers/{it.answer.replace(' ', '_')}.flac"
                answer_rel[it.answer] = arel
                jobs.append((arel, it.answer,
                             ASSISTANT_VOICE["voice"], ASSISTANT_VOICE["rate"], ASSISTANT_VOICE["pitch"]))
            sentence = answer_sentence(it)
            if sentence not in sentence_rel:
                srel = f"audio/answer_sentences/{sentence.replace(',', '').replace(' ', '_')}.flac"
                sentence_rel[sentence] = srel
                jobs.append((srel, sentence,
                             ASSISTANT_VOICE["voice"], ASSISTANT_VOICE["rate"], ASSISTANT_VOICE["pitch"]))
            spoken_records[s].append({
                "id": rid, "task": "spoken_qa", "category": it.category, "template": it.template,
                "question_text": it.question, "answer_text": it.answer, "answer_sentence": sentence,
                "question_audio": qrel, "answer_audio": answer_rel[it.answer],
                "answer_sentence_audio": sentence_rel[sentence],
                "voice": v, "rate": r, "pitch": p, "answer_voice": ASSISTANT_VOICE["voice"],
            })
    statement_records: Dict[str, List[dict]] = {s: [] for s in SPLITS}
    for s in SPLITS:
        for i, (text, tmpl) in enumerate(st_split[s]):
            v, r, p = next(voices)
            rid = f"stm-{s}-{i:05d}"
            rel = f"audio/statements/{rid}.flac"
            jobs.append((rel, text, v, r, p))
            statement_records[s].append({"id": rid, "text": text, "audio": rel, "voice": v, "rate": r,
                                         "pitch": p, "template": tmpl})

    durations: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        def work(job):
            rel, text, v, r, p = job
            return rel, write_flac(out / rel, synthesize(text, v, r, p, tmpdir))

        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
            for rel, dur in ex.map(work, jobs):
                durations[rel] = dur

    # ---- metadata ----
    for s in SPLITS:
        for rec in spoken_records[s]:
            rec["question_duration_s"] = durations[rec["question_audio"]]
            rec["answer_duration_s"] = durations[rec["answer_audio"]]
            rec["answer_sentence_duration_s"] = durations[rec["answer_sentence_audio"]]
        write_jsonl(out / "spoken_qa" / f"{s}.jsonl", spoken_records[s])

        asr = []
        for rec in spoken_records[s]:
            asr.append({"id": f"asr-{s}-{len(asr):05d}", "task": "asr", "source": "spoken_qa_question",
                        "text": rec["question_text"], "audio": rec["question_audio"], "voice": rec["voice"],
                        "rate": rec["rate"], "pitch": rec["pitch"], "duration_s": rec["question_duration_s"]})
        for rec in statement_records[s]:
            asr.append({"id": f"asr-{s}-{len(asr):05d}", "task": "asr", "source": "statement",
                        "text": rec["text"], "audio": rec["audio"], "voice": rec["voice"],
                        "rate": rec["rate"], "pitch": rec["pitch"], "duration_s": durations[rec["audio"]]})
        write_jsonl(out / "asr" / f"{s}.jsonl", asr)

        text_items = sorted(text_split[s], key=lambda it: (it.category, it.template, it.question))
        write_jsonl(out / "text_qa" / f"{s}.jsonl", [
            {"id": f"tqa-{s}-{i:05d}", "task": "text_qa", "category": it.category, "template": it.template,
             "question_text": it.question, "answer_text": it.answer, "in_spoken_qa": it.question in spoken_split,
             "spoken_split": spoken_split.get(it.question)}
            for i, it in enumerate(text_items)
        ])

    with open(out / "world.json", "w", encoding="utf-8") as f:
        json.dump(W.world_tables(), f, indent=1)

    counts = {
        "spoken_qa": {s: len(spoken_records[s]) for s in SPLITS},
        "asr": {s: len(spoken_records[s]) + len(statement_records[s]) for s in SPLITS},
        "text_qa": {s: len(text_split[s]) for s in SPLITS},
        "spoken_qa_by_category": {s: dict(sorted(Counter(r["category"] for r in spoken_records[s]).items()))
                                  for s in SPLITS},
        "text_qa_by_category": {s: dict(sorted(Counter(it.category for it in text_split[s]).items()))
                                for s in SPLITS},
        "answer_audio_files": len(answer_rel),
        "answer_sentence_audio_files": len(sentence_rel),
        "audio_files": len(durations),
    }
    speech_s = sum(d for rel, d in durations.items() if rel.startswith(("audio/questions/", "audio/statements/")))
    settings = {
        "seed": args.seed, "world_seed": args.world_seed,
        "spoken_counts": spoken_n, "statement_counts": st_n,
        "frac_validation": args.frac_validation, "frac_test": args.frac_test,
        "question_voices": list(QUESTION_VOICES), "assistant_voice": ASSISTANT_VOICE,
        "question_rate_range": list(QUESTION_RATE_RANGE), "question_pitch_range": list(QUESTION_PITCH_RANGE),
        "spoken_category_mix": SPOKEN_CATEGORY_MIX,
        "sample_rate": SAMPLE_RATE, "audio_format": "FLAC PCM_16 mono",
        "trim_threshold_db": TRIM_THRESHOLD_DB, "pad_start_s": PAD_START_S, "pad_end_s": PAD_END_S,
        "peak_level": PEAK_LEVEL, "flac_compression_level": FLAC_COMPRESSION_LEVEL,
        "resampler": "torchaudio.functional.resample (default sinc)",
    }
    versions = {"espeak_ng": version, "torch": torch.__version__, "soundfile": sf.__version__,
                "libsndfile": sf.__libsndfile_version__, "numpy": np.__version__}
    manifest = {"name": "deeptalk-demo-corpus", "version": 1, "settings": settings, "versions": versions,
                "counts": counts, "total_speech_seconds": round(speech_s, 1),
                "answer_speech_seconds": round(sum(durations[a] for a in answer_rel.values()), 1),
                "answer_sentence_speech_seconds": round(sum(durations[a] for a in sentence_rel.values()), 1),
                "vocabulary_size": len(set(W.vocabulary(args.world_seed))
                                       | {w for t in sentence_rel for w in t.replace(",", "").split()})}
    # (generation time is printed, not stored, so regenerating is byte-for-byte reproducible)
    for _ in range(2):  # second pass makes the recorded size include the manifest/README themselves
        manifest["size_bytes"] = dir_size_bytes(out)
        with open(out / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        (out / "README.md").write_text(render_readme(manifest), encoding="utf-8")
    size = dir_size_bytes(out)
    gen_time = time.time() - t0

    print(json.dumps(counts, indent=1))
    print(f"audio files: {len(durations)}  speech: {speech_s:.0f}s  size: {size / 2**20:.2f} MiB  "
          f"time: {gen_time:.1f}s  ({version})")
    if size > args.max_mb * 2**20:
        print(f"ERROR: corpus is {size / 2**20:.2f} MiB > --max-mb {args.max_mb}; lower the counts.", file=sys.stderr)
        return 1
    return 0


def render_readme(m: dict) -> str:
    s, c, v = m["settings"], m["counts"], m["versions"]
    validation_pct, test_pct = int(s["frac_validation"] * 100), int(s["frac_test"] * 100)
    answer_voice = s["assistant_voice"]
    rows = "\n".join(
        f"| {task} | {c[task]['train']} | {c[task]['validation']} | {c[task]['test']} |"
        for task in ("spoken_qa", "asr", "text_qa")
    )
    world = W.world_tables()
    people = ", ".join(f"{n} ({p['city']}, {p['pet']}, {W.num(p['age'])})" for n, p in world["people"].items())
    return f"""# DeepTalk demo corpus (synthetic, offline)

A tiny **synthetic** English speech corpus shipped inside the `deeptalk` package
so that CPU demos, tests and the quickstart run with no download.

* **What it is for:** smoke tests, CPU demos, the quickstart, checking that a
  training / evaluation pipeline wires speech in and speech out correctly, and
  watching a tiny model learn a tiny world.
* **What it is not:** a benchmark of real speech. All audio is robotic
  `espeak-ng` formant synthesis with a ~{m['vocabulary_size']}-word vocabulary;
  results on it say nothing about natural speech, real ASR or real knowledge.

Load it with:

```python
from deeptalk.data import load_demo_corpus
ds = load_demo_corpus("spoken_qa")          # DatasetDict(train/validation/test)
ex = ds["train"][0]
ex["question_audio"]["array"], ex["question_audio"]["sampling_rate"]  # float32, 16000
ex["answer_text"]
load_demo_corpus("asr"); load_demo_corpus("text_qa")
load_demo_corpus("spoken_qa", decode_audio=False)  # absolute paths only
```

## Contents

| task | train | validation | test |
|---|---|---|---|
{rows}

* `spoken_qa/*.jsonl` - spoken question + one-word text answer + spoken answers:
  the one word (`answer_audio`) and a full sentence (`answer_sentence`,
  `answer_sentence_audio`: "what does the dog say" -> "the dog says woof"; a "no"
  states the true fact: "is the apple blue" -> "no, the apple is red").
  Fields: `id, task, category, template, question_text, answer_text, answer_sentence,
  question_audio, answer_audio, answer_sentence_audio, voice, rate, pitch, answer_voice,
  question_duration_s, answer_duration_s, answer_sentence_duration_s`. Audio paths are
  relative to this folder.
  Category mix per split: {json.dumps(c['spoken_qa_by_category'])}.
* `asr/*.jsonl` - utterance audio + transcript: every spoken question of the
  same split plus plain statements ("anna lives in paris", "three plus four is
  seven"). Fields: `id, task, source, text, audio, voice, rate, pitch, duration_s`.
* `text_qa/*.jsonl` - **every** question of the world as text (a superset of the
  spoken questions; all of those are in its train split, see Splits), for
  teaching a text LLM the world and measuring its held-out text skill.
  Fields: `id, task, category, template, question_text, answer_text, in_spoken_qa, spoken_split`.
  Category mix per split: {json.dumps(c['text_qa_by_category'])}.
* `audio/questions/`, `audio/statements/`: 16 kHz mono FLAC (PCM 16-bit),
  questions/statements spoken by {len(s['question_voices'])} espeak-ng voices with
  random rate (`-s` {s['question_rate_range'][0]}-{s['question_rate_range'][1]}) and pitch
  (`-p` {s['question_pitch_range'][0]}-{s['question_pitch_range'][1]}).
* `audio/answers/`, `audio/answer_sentences/`: all answers in ONE fixed "assistant" voice
  (`{s['assistant_voice']['voice']}`, `-s {s['assistant_voice']['rate']} -p {s['assistant_voice']['pitch']}`).
  Synthesis is deterministic, so each distinct answer word ({c['answer_audio_files']} files,
  {m['answer_speech_seconds']} s) and each distinct answer sentence ({c['answer_sentence_audio_files']} files,
  {m['answer_sentence_speech_seconds']} s) has one file shared by all records with that answer.
* `world.json` - the fact tables; `manifest.json` - settings, versions, counts.

Total: {c['audio_files']} audio files, {m['total_speech_seconds']} s of question/statement speech,
{m['size_bytes'] / 2**20:.2f} MiB on disk.

## The world

Categories: `arithmetic` (plus / minus / times / after / before, numbers spelled
out, `zero`..`twenty`), `fact` (colours of objects; where people live, their pet and
age; animal sounds and legs) and `yes_no` (number comparisons, "is the apple red",
"does anna live in paris", "is anna older than ben", ...). Every text answer is one word;
spoken questions also have a sentence answer that restates the question with the answer.
The rules live in `deeptalk/data/demo_world.py` (`solve()` answers any corpus question).

* objects: {", ".join(f"{o} ({c_})" for o, c_ in world["object_colors"].items())}
* people (city, pet, age): {people}
* animals: {", ".join(f"{a} ({snd})" for a, snd in world["animal_sounds"].items())};
  legs: {", ".join(f"{a} ({W.num(n)})" for a, n in world["animal_legs"].items())}

## Splits

Each unique question *text* is assigned to exactly one split (stratified per
template, {validation_pct}% validation / {test_pct}% test); that one assignment is used by
`spoken_qa` and the question part of `asr`, so **no spoken test question is
heard in training**. `text_qa` is the text LLM's knowledge: its train split
also holds the text of every spoken validation and test question
(`spoken_split` names where it is spoken), so a spoken test question is new to
the ears, not to the LLM, as in the paper's spoken QA benchmarks of facts an LLM
learned from text. `text_qa`'s validation and test splits hold only text
questions that are never spoken (mostly arithmetic and comparisons, which a
model can work out rather than recall): the held-out text skill whose loss
measures forgetting. The same *facts* also appear across splits through other
templates (e.g. "what color is the apple" in train, "what is the color of the
apple" in test). Statements have their own disjoint split.

## Generator settings

* seed: `{s['seed']}`, world seed: `{s['world_seed']}`
* spoken QA counts: {json.dumps(s['spoken_counts'])}; statements: {json.dumps(s['statement_counts'])}
* question voices: {", ".join(f"`{x}`" for x in s['question_voices'])}
* assistant (answer) voice: `{answer_voice['voice']}` rate {answer_voice['rate']} pitch {answer_voice['pitch']}
* post-processing: resample to {s['sample_rate']} Hz with {s['resampler']}, trim edge
  silence below {s['trim_threshold_db']} dB of peak (keeping {s['pad_start_s']} s / {s['pad_end_s']} s),
  peak-normalise to {s['peak_level']}, write {s['audio_format']} with soundfile
* tools: {v['espeak_ng']}; torch {v['torch']}; soundfile {v['soundfile']} (libsndfile {v['libsndfile']})

## Regenerate

```bash
apt-get install -y espeak-ng          # only needed to regenerate, not to use
python scripts/make_demo_corpus.py    # rewrites this folder (seeded, deterministic)
python -m pytest tests/test_demo_corpus.py -q
```

Metadata is identical for a given seed; audio bytes can differ slightly with
other espeak-ng / libsndfile versions. The script fails if the folder exceeds
`--max-mb` (default {MAX_MB:g} MiB) - lower `--spoken-train` etc. if it does.
"""


if __name__ == "__main__":
    sys.exit(main())
