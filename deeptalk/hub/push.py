"""Export a DeepTalk model for the Hub and push it.

`export_for_hub` writes everything a model repo needs into a folder: safetensors weights, config
with the expert map and `auto_map`, the processor (with its own `auto_map`), the codec (`codec/`), the
modality-load report, and a model card rendered from `model_card.md` with huggingface_hub's
`ModelCard` / `ModelCardData`. Saving copies the remote-code files next to them (configuration,
modeling, processing, generation and codec), so with `trust_remote_code=True` the repo answers a spoken
question with text and speech where deeptalk is not installed. `push_to_hub` uploads that folder with
`huggingface_hub`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..saving import atomic_directory

TEMPLATE = Path(__file__).with_name("model_card.md")
EVAL_METRICS = {  # evaluate-JSON key ("asr.wer" = results["asr"]["wer"]) -> (metric type, dataset key, task type)
    "text_qa_accuracy": ("accuracy", "text_qa", "question-answering"),
    "text_relative_drop": ("relative_drop", "text_qa", "question-answering"),
    "spoken_qa_text_accuracy": ("accuracy", "spoken_qa", "automatic-speech-recognition"),
    "spoken_qa_speech_accuracy": ("accuracy", "spoken_qa", "audio-to-audio"),
    "audio_token_accuracy": ("accuracy", "spoken_qa_speech", "text-to-speech"),
    "tts_wer": ("wer", "spoken_qa", "text-to-speech"),
    "asr.wer": ("wer", "asr", "automatic-speech-recognition"),
    "asr.cer": ("cer", "asr", "automatic-speech-recognition"),
}


def _metric_value(eval_results: dict, key: str):
    """`eval_results[key]`, following "a.b" into nested dicts; None when absent or not a finite number
    (a skipped metric, or NaN audio-token accuracy without audio labels, has no place in the card)."""
    value = eval_results
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def eval_results_for_card(eval_results: dict | None) -> list[EvalResult]:
    """The `EVAL_METRICS` found in `deeptalk evaluate`'s JSON as `huggingface_hub.EvalResult`s (the card's
    model-index), named by their JSON key with "." -> "_" (e.g. `asr_wer`)."""
    results = []
    for key, (metric, dataset, task) in EVAL_METRICS.items():
        value = _metric_value(eval_results or {}, key)
        if value is not None:
            results.append(EvalResult(task_type=task, dataset_type=f"deeptalk/{dataset}", dataset_name=eval_results.get(
                "dataset", "deeptalk demo corpus"), metric_type=metric, metric_value=value,
                metric_name=key.replace(".", "_")))
    return results


def _evaluation_section(eval_results: dict) -> str:
    """The card's evaluation list: one line per JSON key; nested dicts (ASR rates, example counts, skip
    reasons) on one line each."""
    def show(value):
        return f"{value:.3f}" if isinstance(value, float) else f"({value})" if isinstance(value, str) else str(value)

    lines = [f"- **{k}**: {v}" for k, v in eval_results.items() if not isinstance(v, dict)]
    lines += [f"- **{k}**: " + ", ".join(f"{m} {show(x)}" for m, x in v.items()) for k, v in eval_results.items()
              if isinstance(v, dict) and v]
    return "\n".join(lines)


def render_model_card(model, *, repo_id: str | None = None, base_model: str | None = None, license: str = "apache-2.0",
                      datasets: list[str] | None = None, eval_results: dict | None = None,
                      phases: list[dict] | None = None, codec_name: str | None = None,
                      load_heatmap: str | None = None) -> ModelCard:
    """The model card: metadata (base model, pipeline tag, tags, datasets, license, eval results)
    plus the expert map, the heatmap and a section per training phase."""
    config = model.config
    results = eval_results_for_card(eval_results)
    card_data = ModelCardData(
        base_model=base_model or config.text_config.name_or_path or None,
        library_name="transformers",
        # what a stock pipeline serves from the repo (text prompts); speech goes through model.generate_speech
        pipeline_tag="text-generation",
        license=license,
        tags=["deeptalk", "speech", "moe", "modality-specific-experts", "custom_code"],
        datasets=datasets,
        model_name=repo_id.split("/")[-1] if repo_id else "DeepTalk model",
        eval_results=results or None,
    )
    phase_text = "\n".join(p.get("card", "") for p in phases or []) or None
    evaluation = _evaluation_section(eval_results) if eval_results else None
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        repo_id=repo_id,
        family=config.family,
        num_moe_layers=len(config.moe_layer_indices),
        num_routed_experts=config.num_routed_experts,
        top_k=config.text_config.num_experts_per_tok,
        num_speech_experts=config.num_speech_experts if config.speech_experts else None,
        speech_experts=json.dumps(config.speech_experts) if config.speech_experts else None,
        audio_encoder=(
            f"Whisper encoder (d_model {config.audio_config.d_model}), {config.audio_adapter} adapter, stride "
            f"{config.audio_adapter_stride}" if config.audio_config is not None else None
        ),
        codec=codec_name,
        num_audio_streams=config.num_audio_streams or None,
        training_phases=phase_text,
        evaluation=evaluation,
        load_heatmap=load_heatmap,
    )


def _phases_of(model) -> list[dict]:
    path = os.path.join(str(getattr(model, "name_or_path", "") or ""), "deeptalk_phases.json")
    return json.load(open(path)) if os.path.isfile(path) else []


def export_for_hub(model, processor, folder: str | os.PathLike, *, codec=None, repo_id: str | None = None,
                   base_model: str | None = None, eval_results: dict | None = None, load_report_dir: str | None = None,
                   overwrite: bool = False, **card_kwargs) -> Path:
    """Write a Hub-ready model repository into `folder` (new or empty; any with `overwrite=True`, replaced once the
    new one is complete, so a kill leaves the previous folder or none) and return its path."""
    phases = card_kwargs.pop("phases", None) or _phases_of(model)
    with atomic_directory(folder, overwrite=overwrite, what="the export folder") as staging:
        _write_repository(model, processor, Path(staging), codec=codec, repo_id=repo_id, base_model=base_model,
                          eval_results=eval_results, load_report_dir=load_report_dir, phases=phases, **card_kwargs)
    return Path(folder)


def _write_repository(model, processor, folder: Path, *, codec, repo_id, base_model, eval_results, load_report_dir,
                      phases, **card_kwargs) -> None:
    model.save_pretrained(folder)  # safetensors, config with auto_map, the model's remote-code files
    processor.save_pretrained(folder)  # tokenizer, feature extractor, chat template, processing_deeptalk.py
    if codec is not None:
        codec.save_pretrained(folder / "codec")
    heatmap = None
    for name in ("modality_load.json", "modality_load.png"):
        source = Path(load_report_dir or "") / name
        if load_report_dir and source.is_file():
            shutil.copy(source, folder / name)
            heatmap = name if name.endswith(".png") else heatmap
    if phases:
        (folder / "deeptalk_phases.json").write_text(json.dumps(phases, indent=2))
    if eval_results:
        (folder / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
    card = render_model_card(model, repo_id=repo_id, base_model=base_model, eval_results=eval_results, phases=phases,
                             codec_name=getattr(codec, "codec_name", None), load_heatmap=heatmap, **card_kwargs)
    card.save(folder / "README.md")


def push_to_hub(model, processor, repo_id: str, *, codec=None, private: bool = False, token: str | None = None,
                commit_message: str = "Upload DeepTalk model", folder: str | os.PathLike | None = None,
                **export_kwargs) -> str:
    """Export (into `folder` or a temporary one) and upload to `repo_id` with huggingface_hub.
    Returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as scratch:
        target = export_for_hub(model, processor, folder or Path(scratch) / "repository", codec=codec, repo_id=repo_id,
                                **export_kwargs)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(target), commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
