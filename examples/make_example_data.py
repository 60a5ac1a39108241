#!/usr/bin/env python
"""Write `examples/data/`: small JSON Lines files for the README's training commands, cut from the shipped
demo corpus, with the audio they use copied next to them (paths relative to the files).

    python examples/make_example_data.py            # rewrites examples/data/

* `text.jsonl`   text chat: `{"messages": [user text, assistant text]}`           (phases 2b, 3; assignment)
* `asr.jsonl`    speech recognition: user "transcribe" + audio -> transcript          (phase 1)
* `speech.jsonl` spoken question -> text + spoken answer (an audio file)             (phases 2a, 3; assignment)
* `pairs.jsonl`  speech DPO: `{"prompt": [...], "chosen": {...}, "rejected": {...}}` (phase 4)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from deeptalk.data import read_demo_records
from deeptalk.recipes.demo_data import ASR_INSTRUCTION

HERE = Path(__file__).resolve().parent


def _audio(source: str, data_dir: Path) -> str:
    """Copy a corpus audio file under `data_dir/audio/` (same sub-folder) and return its relative path."""
    relative = Path("audio") / Path(source).parent.name / Path(source).name
    (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, data_dir / relative)
    return relative.as_posix()


def _spoken_answer(record: dict, data_dir: Path) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": record["answer_text"]},
                                             {"type": "audio", "audio": _audio(record["answer_audio"], data_dir)}]}


def build(data_dir: Path, *, text_rows: int = 16, asr_rows: int = 12, speech_rows: int = 12, pair_rows: int = 6):
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    rows: dict[str, list[dict]] = {"text": [], "asr": [], "speech": [], "pairs": []}

    for record in read_demo_records("text_qa", "train")[:text_rows]:
        rows["text"].append({"messages": [{"role": "user", "content": record["question_text"]},
                                          {"role": "assistant", "content": record["answer_text"]}]})
    for record in read_demo_records("asr", "train")[:asr_rows]:
        user = [{"type": "text", "text": ASR_INSTRUCTION},
                {"type": "audio", "audio": _audio(record["audio"], data_dir)}]
        rows["asr"].append({"messages": [{"role": "user", "content": user},
                                         {"role": "assistant", "content": record["text"]}]})
    spoken = read_demo_records("spoken_qa", "train")
    for record in spoken[:speech_rows]:
        question = {"role": "user", "content": [{"type": "audio", "audio": _audio(record["question_audio"], data_dir)}]}
        rows["speech"].append({"messages": [question, _spoken_answer(record, data_dir)]})
    # preference pairs: the right spoken answer against another answer of the same category
    for record in spoken[speech_rows: speech_rows + pair_rows]:
        wrong = next(r for r in spoken
                     if r["category"] == record["category"] and r["answer_text"] != record["answer_text"])
        question = {"role": "user", "content": [{"type": "audio", "audio": _audio(record["question_audio"], data_dir)}]}
        rows["pairs"].append({"prompt": [question], "chosen": _spoken_answer(record, data_dir),
                              "rejected": _spoken_answer(wrong, data_dir)})

    for name, items in rows.items():
        with open(data_dir / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=HERE / "data", help="folder to (re)write")
    args = parser.parse_args()
    rows = build(args.output)
    print(f"wrote {', '.join(f'{len(v)} {k}' for k, v in rows.items())} rows into {args.output}")


if __name__ == "__main__":
    main()
