# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Single-pass vs batch-parallel decoding on a trained model: quality and compute.

The paper decodes batch-parallel (a text-only copy supplies the text stream; Mini-Omni's trick) and
its reviewers objected to the extra compute and asked for results without it. This script answers
both questions on a model trained by `deeptalk quickstart`, on the shipped corpus's spoken test
questions, for each strategy:

* text accuracy of the answer's *text stream* (the words shown next to the speech),
* speech -> speech accuracy: the spoken answer, decoded by the codec and transcribed by the model's
  own ASR path, against the reference answer,
* TTS WER: the transcript of the spoken answer against the answer's own text (speech/text agreement),
* compute: decoder rows run per answer (batch-parallel runs two while the text lasts) and wall time.

    python benchmarks/decoding_strategies.py --model deeptalk_output/quickstart/model [--seeds 0 1 2]

Sampling follows the authors (text greedy, repetition penalty 1.2; audio top-k 10), seeded per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(model_dir: str, seeds: list[int], limit: int | None, max_steps: int) -> dict:
    import torch
    from _common import machine_info
    from transformers import AutoModelForCausalLM, AutoProcessor

    import deeptalk  # noqa: F401
    from deeptalk.data import load_demo_corpus
    from deeptalk.evaluation import answer_accuracy
    from deeptalk.evaluation.speech import spoken_qa_speech_scores
    from deeptalk.generation import DecodeResult, SpeechDecodingConfig, decode_steps
    from deeptalk.processing.codecs import load_codec
    from deeptalk.recipes.demo_data import spoken_question_conversation

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    codec = load_codec(os.path.join(model_dir, "codec"))
    records = [dict(r) for r in load_demo_corpus("spoken_qa", decode_audio=False)["test"]]
    records = records[:limit] if limit else records
    references = [r["answer_text"] for r in records]
    rows = {}
    for strategy in ("single_pass", "batch_parallel"):
        per_seed = []
        for seed in seeds:
            decoding = {"strategy": strategy, "seed": seed}
            started = time.perf_counter()
            scores = spoken_qa_speech_scores(model, processor, codec, records, max_steps=max_steps, decoding=decoding,
                                             return_predictions=True)
            seconds = time.perf_counter() - started
            forward_rows, steps = 0, 0
            for record in records:  # compute per answer (a second, instrumented pass; cheap at this size)
                result = DecodeResult()
                conversation = spoken_question_conversation(record["question_audio"])
                config = SpeechDecodingConfig(max_steps=max_steps, **decoding)
                steps += sum(1 for _ in decode_steps(model, processor, conversation, config, result))
                forward_rows += result.forward_rows
            per_seed.append({
                "text_stream_accuracy": answer_accuracy(scores["text_answers"], references),
                "speech_to_speech_accuracy": scores["accuracy"],
                "tts_wer": scores["tts_wer"],
                "decoder_rows_per_answer": forward_rows / len(records),
                "steps_per_answer": steps / len(records),
                "seconds_per_answer_with_asr": seconds / len(records),
            })
        rows[strategy] = {key: sum(s[key] for s in per_seed if s[key] is not None)
                          / max(1, sum(s[key] is not None for s in per_seed))
                          for key in per_seed[0]}
        rows[strategy]["per_seed"] = per_seed
    return {"machine": machine_info(1), "model": model_dir, "num_questions": len(records), "seeds": seeds,
            "max_steps": max_steps, "strategies": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deeptalk_output/quickstart/model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--limit", type=int, help="first N spoken test questions only")
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--json", default="benchmarks/results/decoding_strategies.json")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.model):
        print(f"No model at {args.model}: run `deeptalk quickstart` first (or pass --model).", file=sys.stderr)
        return 2
    report = run(args.model, args.seeds, args.limit, args.max_steps)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    keys = ["text_stream_accuracy", "speech_to_speech_accuracy", "tts_wer", "decoder_rows_per_answer",
            "steps_per_answer", "seconds_per_answer_with_asr"]
    print(f"{report['num_questions']} spoken test questions, seeds {args.seeds}, model {args.model}")
    print("strategy        " + "  ".join(f"{k:>28}" for k in keys))
    for strategy, row in report["strategies"].items():
        print(f"{strategy:<15} " + "  ".join(f"{row[k]:>28.3f}" for k in keys))
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
