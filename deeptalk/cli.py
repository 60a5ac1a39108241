"""`deeptalk` command line.

    deeptalk demo                          # the embedded-defaults job: convert, check, save, reload
    deeptalk convert SRC OUT [--speech-experts JSON_OR_PATH] [--routing-mode MODE]
    deeptalk upgrade OLD NEW               # a folder saved by deeptalk 0.1 -> the current format
    deeptalk assign --model DIR --text-data T.jsonl --speech-data S.jsonl --output DIR
    deeptalk train {align,experts,joint,dpo} --recipe tiny_cpu/experts_speech --model DIR --data D.jsonl --output DIR
    deeptalk quickstart                    # the whole recipe offline on tiny models
    deeptalk chat --audio question.wav --out reply.wav      deeptalk evaluate --output results.json
    deeptalk push USER/REPO [--export-only DIR]             deeptalk space DIR [--push USER/SPACE]

SRC is a transformers MoE LLM (a local folder or a Hub id), or `tiny:FAMILY` for a tiny random one
(offline; FAMILY is one of deepseek_v2, qwen3_moe, qwen2_moe, olmoe, mixtral).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_speech_experts(value: str | None) -> list[list[int]] | None:
    """`--speech-experts` accepts inline JSON (`[[3, 17], [5, 9]]`) or a path to a JSON file holding
    one list of source expert indices per MoE layer, in layer order (the authors' format)."""
    if value is None:
        return None
    text = Path(value).read_text() if os.path.isfile(value) else value
    try:
        experts = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(
            f"--speech-experts: {value!r} is neither a JSON file nor inline JSON ({err}). "
            "Expected one list of expert indices per MoE layer, e.g. '[[3, 17], [5, 9]]'."
        ) from None
    if not (isinstance(experts, list) and all(isinstance(layer, list) for layer in experts)):
        raise SystemExit("--speech-experts must be a JSON list of lists (one list of expert indices per MoE layer).")
    return experts


def cmd_convert(args) -> int:
    from .conversion import convert_folder

    overrides = {"routing_mode": args.routing_mode}
    if args.num_speech_experts:
        overrides["num_speech_experts"] = args.num_speech_experts
    model = convert_folder(args.source, args.output, parse_speech_experts(args.speech_experts), dtype=args.dtype,
                           **overrides)
    assigned = "assigned" if model.config.speech_experts else "not assigned yet (run the assignment step)"
    print(f"Converted {args.source} ({model.config.family}) -> {args.output}: "
          f"{len(model.config.moe_layer_indices)} MoE layers x {model.config.num_routed_experts} routed experts; "
          f"speech experts {assigned}; routing mode {model.config.routing_mode}.")
    return 0


def cmd_upgrade(args) -> int:
    from .configuration_deeptalk import FORMAT_VERSION
    from .conversion import upgrade_folder

    folder = upgrade_folder(args.old, args.new, overwrite=args.overwrite)
    print(f"Upgraded {args.old} -> {folder} (format {FORMAT_VERSION}).")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return 0 if run_demo(args.output, families=args.family) else 1


def cmd_train(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    import deeptalk  # noqa: F401  (registers the Auto classes)
    from .trainers.recipes import build_trainer, encode_dataset, load_conversations, load_recipe, parse_overrides

    recipe = load_recipe(args.recipe)
    if recipe["phase"] != args.phase:
        raise ValueError(f"Recipe {args.recipe} is for phase {recipe['phase']!r}, not {args.phase!r}.")
    train_args = {**recipe["args"], **parse_overrides(args.set), "output_dir": args.output}
    if args.phase == "experts" and args.modality:
        train_args["modality"] = args.modality
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if train_args.get("bf16") else None)
    processor = AutoProcessor.from_pretrained(args.model)
    codec = None
    if args.codec:
        from .processing.codecs import load_codec

        codec = load_codec(args.codec)
    dataset = encode_dataset(processor, load_conversations(args.data), codec=codec, max_length=recipe["data"].get("max_length"))
    trainer = build_trainer(args.phase, model, processor, dataset, train_args, codec=codec)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output)
    processor.save_pretrained(args.output)
    print(f"deeptalk train {args.phase}: {trainer.state.global_step} steps on {len(dataset)} conversations -> {args.output}")
    return 0


def cmd_assign(args) -> int:
    from transformers import AutoModelForCausalLM, AutoProcessor

    import deeptalk  # noqa: F401
    from .processing.processing_deeptalk import DeepTalkDataCollator
    from .trainers.assignment import assign_speech_experts, measure_modality_load, save_load_report
    from .trainers.recipes import load_conversations

    model = AutoModelForCausalLM.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    collate = DeepTalkDataCollator(processor)

    def batches(path):
        rows = load_conversations(path)
        for start in range(0, len(rows), args.batch_size):
            yield {k: v for k, v in collate(rows[start : start + args.batch_size]).items() if k != "labels"}

    if args.strategy == "random":
        load = None
    else:
        load = measure_modality_load(model, batches(args.text_data), batches(args.speech_data))
    if args.num_speech_experts:
        model.config.num_speech_experts = args.num_speech_experts
    speech_experts = assign_speech_experts(model, load, strategy=args.strategy, seed=args.seed)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    if load is not None:
        save_load_report(load, speech_experts, args.output, strategy=args.strategy, seed=args.seed)
    print(f"deeptalk assign: {args.strategy} speech experts per MoE layer -> {args.output}")
    for layer, experts in zip(model.config.moe_layer_indices, speech_experts):
        print(f"  layer {layer}: {experts}")
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(output_dir=args.output, seed=args.seed, base_model=args.base_model, codec=args.codec,
                                  audio_encoder=args.audio_encoder, audio_adapter_stride=args.audio_adapter_stride)
    if args.fast:  # a smoke run: a few steps per phase
        settings.text_pretrain_steps, settings.align_steps, settings.speech_steps = 20, 4, 4
        settings.text_steps, settings.joint_steps = 4, 4
    run_quickstart(settings)
    return 0


def _load_model_processor_codec(model_dir: str, codec_dir: str | None):
    import os

    from transformers import AutoModelForCausalLM, AutoProcessor

    import deeptalk  # noqa: F401
    from .processing.codecs import load_codec

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    beside_model = os.path.join(model_dir, "codec")  # where `deeptalk quickstart` puts it
    if codec_dir:
        codec = load_codec(codec_dir)
    elif os.path.isdir(beside_model):
        codec = load_codec(beside_model)
    else:
        codec = None
    return model, processor, codec


def cmd_chat(args) -> int:
    import soundfile

    from .generation import AudioChunk, ChatReply, SpeechChat, SpeechDecodingConfig, TextDelta

    if (args.audio is None) == (args.text is None):
        raise ValueError("Give the question as --audio FILE or as --text '...', one of the two.")
    model, processor, codec = _load_model_processor_codec(args.model, args.codec)
    config = SpeechDecodingConfig(strategy=args.strategy, max_steps=args.max_steps, audio_top_k=args.audio_top_k,
                                  text_repetition_penalty=args.repetition_penalty, seed=args.seed, voice=args.voice,
                                  cache_implementation=args.cache)
    chat = SpeechChat(model, processor, codec, config, chunk_frames=args.chunk_frames)
    for event in chat.stream(audio=args.audio, text=args.text):
        if isinstance(event, TextDelta):  # the text as it is decoded
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, AudioChunk) and event.index == 0:
            print(f"\n[first audio chunk after {event.elapsed_s * 1000:.0f} ms]", file=sys.stderr)
        elif isinstance(event, ChatReply):
            reply = event
    print()
    if reply.waveform is not None and reply.waveform.size:
        soundfile.write(args.out, reply.waveform, reply.sampling_rate)
        spoken = f"{reply.codes.shape[1]} codec frames ({reply.waveform.size / reply.sampling_rate:.2f} s) -> {args.out}"
    else:
        spoken = "no speech frames generated" if codec is not None else "no codec found (pass --codec) so no WAV"
    t = reply.timings
    latency = ", ".join(f"{name} {t[name] * 1000:.0f} ms" for name in ("features", "prefill", "first_text", "first_audio_chunk", "total") if name in t)
    print(f"[{reply.steps} decode steps ({args.strategy}); {latency}; {spoken}]", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from transformers import AutoModelForCausalLM

    from .evaluation.evaluate import evaluate_on_demo_corpus, write_results

    model, processor, codec = _load_model_processor_codec(args.model, args.codec)
    base = AutoModelForCausalLM.from_pretrained(args.base_model).eval() if args.base_model else None
    results = evaluate_on_demo_corpus(model, processor, base_model=base, codec=codec, limit=args.limit, asr=args.asr,
                                      speech_answers=not args.no_speech_answers, max_speech_steps=args.max_speech_steps,
                                      max_new_tokens=args.max_new_tokens,
                                      decoding={"strategy": args.strategy, "voice": args.voice})
    write_results(results, args.output)
    print(json.dumps(results, indent=2))
    for metric, warning in results.get("warnings", {}).items():
        print(f"deeptalk evaluate: warning: {metric}: {warning}", file=sys.stderr)
    return 0


def cmd_push(args) -> int:
    from .hub import export_for_hub, push_to_hub

    model, processor, codec = _load_model_processor_codec(args.model, args.codec)
    eval_results = json.load(open(args.eval_results)) if args.eval_results else None
    kwargs = dict(codec=codec, base_model=args.base_model, eval_results=eval_results, load_report_dir=args.load_report)
    if args.export_only:
        folder = export_for_hub(model, processor, args.export_only, repo_id=args.repo_id, **kwargs)
        print(f"Exported a Hub-ready repository for {args.repo_id} into {folder} (nothing uploaded).")
        return 0
    url = push_to_hub(model, processor, args.repo_id, private=args.private, **kwargs)
    print(f"Pushed {args.model} to {args.repo_id}: {url}")
    return 0


def cmd_space(args) -> int:
    from .hub import create_space

    folder = create_space(args.folder, args.model, max_steps=args.max_steps, strategy=args.strategy,
                          example_audio=args.example or (), bundle_model=args.bundle_model,
                          deeptalk_requirement=args.deeptalk_requirement, push=bool(args.push), repo_id=args.push)
    where = f"and pushed to the Space {args.push}" if args.push else f"run it with: cd {folder} && python app.py"
    print(f"Wrote a gradio Space for {args.model} into {folder}; {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeptalk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert tiny MoE LLMs of every family, check equality, save and reload")
    demo.add_argument("--output", default="deeptalk_output/demo", help="where to write the converted models")
    demo.add_argument("--family", action="append", help="limit to these families (repeatable)")
    demo.set_defaults(func=cmd_demo)

    quick = sub.add_parser("quickstart", help="the whole recipe offline on tiny models: train, assign, evaluate, speak")
    quick.add_argument("--output", default="deeptalk_output/quickstart")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--fast", action="store_true", help="a few steps per phase (smoke test)")
    quick.add_argument("--audio-adapter-stride", type=int, default=4, help="Whisper frames per LLM position (authors: 1)")
    quick.add_argument("--base-model", help="a transformers MoE LLM (Hub id or folder) instead of the tiny one (GPU)")
    quick.add_argument("--codec", help="a codec (folder or Hub id, e.g. hubertsiuzdak/snac_24khz) instead of MelVQ")
    quick.add_argument("--audio-encoder", help="a Whisper checkpoint (e.g. openai/whisper-medium) for the encoder")
    quick.set_defaults(func=cmd_quickstart)

    chat = sub.add_parser("chat", help="ask a spoken (or text) question, get text and a WAV")
    chat.add_argument("--model", default="deeptalk_output/quickstart/model")
    chat.add_argument("--audio", help="question audio file (any rate; mixed to mono)")
    chat.add_argument("--text", help="question as text")
    chat.add_argument("--out", default="reply.wav")
    chat.add_argument("--codec", help="codec folder (default: <model>/codec)")
    chat.add_argument("--max-steps", type=int, default=200)
    chat.add_argument("--strategy", default="single_pass", choices=["single_pass", "batch_parallel"],
                      help="single_pass: one sequence; batch_parallel: the authors' text-only copy supplies the text")
    chat.add_argument("--audio-top-k", type=int, default=10, help="sample audio among the top k codes (1 = greedy)")
    chat.add_argument("--repetition-penalty", type=float, default=1.2, help="text repetition penalty (1.0 = off)")
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--voice", help="voice token name, for models trained with voices")
    chat.add_argument("--chunk-frames", type=int, default=8, help="codec frames per streamed audio chunk")
    chat.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="KV cache implementation")
    chat.set_defaults(func=cmd_chat)

    evaluate = sub.add_parser("evaluate", help="text QA, spoken QA, ASR and audio-token metrics -> JSON")
    evaluate.add_argument("--model", default="deeptalk_output/quickstart/model")
    evaluate.add_argument("--base-model", help="the original LLM, for the relative text drop")
    evaluate.add_argument("--codec", help="codec folder (default: <model>/codec)")
    evaluate.add_argument("--output", default="deeptalk_output/evaluation.json")
    evaluate.add_argument("--limit", type=int, help="score only the first N test records per task")
    evaluate.add_argument("--asr", help="ASR for the spoken answers: 'own' (default, the model's ASR path) or a "
                                        "transformers ASR checkpoint (Hub id or folder, e.g. openai/whisper-large-v3)")
    evaluate.add_argument("--max-speech-steps", type=int, default=200, help="decode steps per spoken answer")
    evaluate.add_argument("--max-new-tokens", type=int, default=8, help="tokens per greedy text answer")
    evaluate.add_argument("--no-speech-answers", action="store_true", help="skip speech->speech accuracy and TTS WER")
    evaluate.add_argument("--strategy", default="single_pass", choices=["single_pass", "batch_parallel"],
                          help="decoding of the spoken answers")
    evaluate.add_argument("--voice", help="voice token for the spoken answers (default: the model's first voice, if any)")
    evaluate.set_defaults(func=cmd_evaluate)

    push = sub.add_parser("push", help="export to a Hub-ready folder and upload it (huggingface_hub)")
    push.add_argument("repo_id")
    push.add_argument("--model", default="deeptalk_output/quickstart/model")
    push.add_argument("--codec", help="codec folder (default: <model>/codec)")
    push.add_argument("--base-model", help="base model id for the card")
    push.add_argument("--eval-results", help="JSON from `deeptalk evaluate`, rendered as the card's eval_results")
    push.add_argument("--load-report", help="folder holding modality_load.json/.png (e.g. deeptalk_output/quickstart)")
    push.add_argument("--private", action="store_true")
    push.add_argument("--export-only", metavar="FOLDER", help="write the repository folder and stop before uploading")
    push.set_defaults(func=cmd_push)

    space = sub.add_parser("space", help="write a gradio Space (spoken chat + expert view) for a model, optionally push it")
    space.add_argument("folder", help="where to write the Space")
    space.add_argument("--model", default="deeptalk_output/quickstart/model", help="model repo id or folder")
    space.add_argument("--max-steps", type=int, default=200)
    space.add_argument("--strategy", default="single_pass", choices=["single_pass", "batch_parallel"])
    space.add_argument("--example", action="append", help="a spoken question offered as an example (repeatable)")
    space.add_argument("--bundle-model", action="store_true", help="copy a local model folder into the Space")
    space.add_argument("--deeptalk-requirement", help="pip requirement for deeptalk (default: bundle the package)")
    space.add_argument("--push", metavar="REPO_ID", help="upload the Space to this repo id (huggingface_hub)")
    space.set_defaults(func=cmd_space)

    convert = sub.add_parser("convert", help="convert a transformers MoE LLM into a DeepTalk model")
    convert.add_argument("source", help="folder, Hub id, or tiny:FAMILY")
    convert.add_argument("output", help="output folder (Hub-ready: weights, config, remote code)")
    convert.add_argument("--speech-experts", help="JSON (inline or file): one list of source expert indices per MoE layer")
    convert.add_argument("--num-speech-experts", type=int, help="speech experts per layer when assigning later (default 6)")
    convert.add_argument("--routing-mode", default="free", help="free | speech_only | text_only | by_token_modality")
    convert.add_argument("--dtype", help="load the source in this dtype, e.g. bfloat16 (default: as saved)")
    convert.set_defaults(func=cmd_convert)

    upgrade = sub.add_parser("upgrade", help="rewrite a folder saved by deeptalk 0.1 in the current format")
    upgrade.add_argument("old", help="the old model folder (left untouched)")
    upgrade.add_argument("new", help="the new folder (new or empty)")
    upgrade.add_argument("--overwrite", action="store_true", help="replace NEW if it holds something")
    upgrade.set_defaults(func=cmd_upgrade)

    train = sub.add_parser("train", help="run one training phase from a recipe")
    train.add_argument("phase", choices=["align", "experts", "joint", "dpo"])
    train.add_argument("--recipe", required=True, help="YAML path or shipped name, e.g. tiny_cpu/experts_speech")
    train.add_argument("--model", required=True, help="DeepTalk model folder (with its processor)")
    train.add_argument("--data", required=True, help="conversations, JSON Lines of {'messages': [...]}")
    train.add_argument("--output", required=True)
    train.add_argument("--modality", choices=["speech", "text"], help="experts phase: override the recipe's modality")
    train.add_argument("--codec", help="codec folder for assistant answers given as audio files")
    train.add_argument("--resume-from-checkpoint", default=None)
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe args")
    train.set_defaults(func=cmd_train)

    assign = sub.add_parser("assign", help="assign speech experts from modality load (or at random)")
    assign.add_argument("--model", required=True)
    assign.add_argument("--text-data", help="text-only conversations (JSON Lines)")
    assign.add_argument("--speech-data", help="spoken conversations (JSON Lines)")
    assign.add_argument("--output", required=True)
    assign.add_argument("--num-speech-experts", type=int)
    assign.add_argument("--strategy", choices=["adaptive", "random", "moextend"], default="adaptive")
    assign.add_argument("--seed", type=int, default=0)
    assign.add_argument("--batch-size", type=int, default=8)
    assign.set_defaults(func=cmd_assign)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # input problems: print the message, not a traceback
        print(f"deeptalk {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
