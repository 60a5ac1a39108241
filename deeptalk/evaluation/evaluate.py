"""`deeptalk evaluate`: the paper's metrics for a DeepTalk model, written as JSON.

Offline it scores the shipped demo corpus's test split: text QA accuracy (text ability), spoken
question -> text answer accuracy (the paper's S2T), ASR WER/CER through the model's own ASR path,
audio-token accuracy on held-out spoken answers (when a codec is available to encode them), and the
relative text drop against a base model. The same functions take other record lists.
"""

from __future__ import annotations

import json
import os


def evaluate_on_demo_corpus(model, processor, *, base_model=None, codec=None, limit: int | None = None) -> dict:
    from ..data import load_demo_corpus
    from .metrics import asr_error_rates, dataset_audio_token_accuracy, relative_drop, spoken_qa_text_accuracy, text_qa_accuracy

    def records(task):
        rows = [dict(r) for r in load_demo_corpus(task, decode_audio=False)["test"]]
        return rows[:limit] if limit else rows

    results = {"dataset": "deeptalk demo corpus (test split)", "text_qa_accuracy": text_qa_accuracy(model, processor, records("text_qa"))}
    if base_model is not None:
        results["base_text_qa_accuracy"] = text_qa_accuracy(base_model, processor, records("text_qa"))
        base = results["base_text_qa_accuracy"]
        results["text_relative_drop"] = relative_drop(base, results["text_qa_accuracy"]) if base else None
    if getattr(model.config, "audio_config", None) is not None:
        results["spoken_qa_text_accuracy"] = spoken_qa_text_accuracy(model, processor, records("spoken_qa"))
        results["asr"] = asr_error_rates(model, processor, records("asr"))
    if codec is not None and model.config.num_audio_streams:
        from ..recipes.demo_data import build_demo_data

        data = build_demo_data(processor, codec, splits=("test",), tasks=("spoken_qa_speech",), limit=limit)
        results["audio_token_accuracy"] = dataset_audio_token_accuracy(model, processor, data.spoken_qa_speech["test"])
    return results


def write_results(results: dict, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
