"""`deeptalk` command line.

    deeptalk demo                          # the embedded-defaults job: convert, check, save, reload
    deeptalk convert SRC OUT [--speech-experts JSON_OR_PATH] [--routing-mode MODE]
    deeptalk upgrade OLD NEW               # a folder saved by deeptalk 0.1 -> the current format
    deeptalk assign --model DIR --text-data T.jsonl --speech-data S.jsonl --output DIR
    deeptalk prepare DATA --data-format voiceassistant --model DIR --output PREPARED   # encode once, train many times
    deeptalk train {align,experts,joint,dpo} --recipe tiny_cpu/experts_speech --model DIR --data D.jsonl --output DIR
    deeptalk quickstart                    # the whole recipe offline on tiny models
    deeptalk chat --audio question.wav --out reply.wav      deeptalk evaluate --output results.json
    deeptalk push USER/REPO [--export-only DIR]             deeptalk space DIR [--push USER/SPACE]

SRC is a transformers MoE LLM (a local folder or a Hub id), or `tiny:FAMILY` for a tiny random one
(offline; FAMILY is one of deepseek_v2, qwen3_moe, qwen2_moe, olmoe, mixtral).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path

HOME_VARIABLE = "DEEPTALK_HOME"
DEBUG_VARIABLE = "DEEPTALK_DEBUG"
_ENVIRONMENT = f"""environment:
  {HOME_VARIABLE}    where default outputs go and default models are looked for (unset: ./deeptalk_output,
                   relative to the current directory)
  {DEBUG_VARIABLE}=1 print the full traceback of an error instead of one line
  HF_HUB_OFFLINE=1 never contact the Hugging Face Hub (Hub ids are then read from the local cache only)
"""


class UsageError(Exception):
    """A problem with the command line's input, reported as one line (exit code 2)."""


def deeptalk_home() -> str:
    """The folder the CLI's default paths live in: `$DEEPTALK_HOME`, else `deeptalk_output` in the current directory."""
    return os.environ.get(HOME_VARIABLE) or "deeptalk_output"


def default_model() -> str:
    return os.path.join(deeptalk_home(), "quickstart", "model")


# ---------------------------------------------------------------------------------------------- input checks


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


_positive_int.__name__ = _non_negative_int.__name__ = "int"  # argparse names the type in "invalid int value"
_positive_float.__name__ = "float"


def _looks_like_path(value: str) -> bool:
    """A name that cannot be a Hub repo id (`user/name`) and must be a local path."""
    return (value.startswith((".", "~", "/")) or value.count("/") > 1 or value.endswith("/")
            or (os.sep != "/" and os.sep in value) or bool(os.altsep and os.altsep != "/" and os.altsep in value))


def _offline_mode() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in {"1", "ON", "YES", "TRUE"}


def _go_offline() -> None:
    """Switch this process to offline mode, so that cached Hub files load without minutes of retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


_reachability: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub (or the HTTPS proxy) opens within `timeout` seconds."""
    import socket
    import threading
    from urllib.parse import urlsplit

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    proxy = next((os.environ[k] for k in proxies if os.environ.get(k)), None)
    target = proxy if proxy else hub_endpoint()
    if target in _reachability:
        return _reachability[target]
    parts = urlsplit(target if "://" in target else "http://" + target)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome = []

    def connect():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    _reachability[target] = bool(outcome and outcome[0])
    return _reachability[target]


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def check_source(value: str, option: str, *, default: str | None = None, need_config: bool = True) -> str:
    """Check a model/codec argument before anything loads: an existing local folder (with `config.json`
    when `need_config`), or a Hub id that can be fetched (network up, or already in the local cache).
    Returns the value to load; raises UsageError with one line that says what is wrong and what to do."""
    path = os.path.expanduser(value)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{option} {value} is a file; give a folder or a Hub id.")
        if need_config and not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{option} {value} has no config.json: it is not a saved model folder.")
        return path
    if default is not None and value == default:
        raise UsageError(f"no model at {value}: run `deeptalk quickstart` first or pass {option} DIR "
                         f"(default models are looked for under ${HOME_VARIABLE}, else ./deeptalk_output).")
    if _looks_like_path(value):
        raise UsageError(f"{option} {value}: no such folder.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(f"{option} {value}: no such folder, and not a Hub repo id (user/name).") from None
    local_hint = f"pass {option} DIR with a local copy (`hf download {value} --local-dir DIR` where there is network)"
    return _reachable_hub_id(value, option, "no such folder", f"the Hub repo {value!r}", _in_hub_cache, local_hint)


def _reachable_hub_id(value: str, option: str, missing: str, what: str, in_cache, local_hint: str) -> str:
    """A Hub id usable now: with network, or cached when offline (set, or switched to without network);
    else a one-line error saying how to point at local files."""
    if _offline_mode():
        if in_cache(value):
            return value
        raise UsageError(f"{option} {value}: {missing}, and offline mode (HF_HUB_OFFLINE=1) with no cached copy of "
                         f"{what}: {local_hint}.")
    if not hub_reachable():
        _go_offline()
        if in_cache(value):
            print(f"deeptalk: no network to reach {hub_endpoint()}: using the cached copy of {value}.", file=sys.stderr)
            return value
        raise UsageError(f"{option} {value}: {missing}, and no network to reach {hub_endpoint()} for {what}: "
                         f"{local_hint}.")
    return value


def check_model(value: str, option: str = "--model", *, default: str | None = None, as_saved: bool = False) -> str:
    """`check_source` for a saved DeepTalk model; a local folder is also checked file by file (config, format,
    weights complete, processor present) so a damaged folder fails here with the file named. `as_saved`: the model
    runs as it is (chat, evaluate), so its processor must fit it (the same speech layout)."""
    from .folder_checks import check_model_folder

    path = check_source(value, option, default=default)
    if os.path.isdir(path):
        check_model_folder(path, need_processor=True, processor_must_fit=as_saved, option=option)
    return path


def check_upload_possible(what: str, alternative: str) -> None:
    if _offline_mode():
        raise UsageError(f"{what} uploads to the Hub, but offline mode is on (HF_HUB_OFFLINE=1): unset it, "
                         f"or {alternative}.")
    if not hub_reachable():
        raise UsageError(f"{what} uploads to the Hub, but there is no network to reach {hub_endpoint()}: "
                         f"{alternative}.")


def check_input_file(value: str | None, option: str) -> None:
    path = os.path.expanduser(value) if value is not None else None
    if path is not None and not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "no such file"
        raise UsageError(f"{option} {value}: {what}.")


def _check_parent_writable(path: Path, option: str, shown: str, *, create: bool) -> None:
    """The folder `path` goes into must exist and be writable (with `create`, its nearest existing ancestor)."""
    from deeptalk.saving import nearest_writable_folder

    if not create and not path.parent.is_dir():
        raise UsageError(f"{option} {shown}: the folder {path.parent} does not exist.")
    try:
        nearest_writable_folder(str(path.parent))
    except NotADirectoryError as err:
        raise UsageError(f"{option} {shown}: {err.filename} is not a folder.") from None
    except OSError as err:
        raise UsageError(f"{option} {shown}: cannot write into {err.filename} ({err.strerror}).") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {shown}: the file exists and is not writable.")


def check_audio_output(value: str, option: str = "--out") -> None:
    """A file name soundfile can write (known audio extension) in an existing, writable folder."""
    import soundfile

    path = Path(value).expanduser().absolute()
    if path.is_dir():
        raise UsageError(f"{option} {value} is a folder; give a file name such as {os.path.join(value, 'reply.wav')}.")
    writable = sorted(f.lower() for f in soundfile.available_formats() if soundfile.default_subtype(f))
    extension = path.suffix[1:]
    if extension.upper() not in {f.upper() for f in writable}:
        said = f"extension .{extension} is not an audio format" if extension else "has no extension"
        raise UsageError(f"{option} {value}: {said}; use e.g. reply.wav (soundfile writes: {', '.join(writable)}).")
    _check_parent_writable(path, option, value, create=False)


def check_output_file(value: str, option: str) -> None:
    """A file path whose folder exists or can be created, and is writable."""
    path = Path(value).expanduser().absolute()
    if path.is_dir():
        example = os.path.join(value, "results.json")
        raise UsageError(f"{option} {value} is a folder; give a file name such as {example}.")
    _check_parent_writable(path, option, value, create=True)


def check_output_folder(value: str, option: str, *, inputs: dict[str, str] | None = None) -> None:
    """An output folder that is not a file, not one of the inputs, and can be created."""
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {value} is a file; give a folder.")
    for other_option, other in (inputs or {}).items():
        other_path = os.path.expanduser(other or "")
        if other and os.path.exists(other_path) and path.exists() and os.path.samefile(path, other_path):
            raise UsageError(f"{option} {value} is the input given to {other_option}: write to another folder.")
    _check_parent_writable(path, option, value, create=True)


def check_training_output(output: str, model_dir: str, resume: str | None, overwrite: bool) -> str | None:
    """Validate `deeptalk train --output` (and `--resume-from-checkpoint`) before anything loads; returns the
    checkpoint to resume from. A folder resumed from is not "non-empty": its checkpoints are kept."""
    from .saving import checkpoint_is_complete, latest_complete_checkpoint

    if resume == "latest":
        resume, skipped = latest_complete_checkpoint(output)
        for partial in skipped:
            print(f"deeptalk train: skipping {partial}: an incomplete checkpoint (its save was interrupted)",
                  file=sys.stderr)
        if resume is None:
            raise UsageError(f"--resume-from-checkpoint latest: {output} holds no complete checkpoint-N folder; "
                             "start without --resume-from-checkpoint.")
    elif resume is not None:
        if not os.path.isdir(resume):
            raise UsageError(f"--resume-from-checkpoint {resume}: no such folder (give a checkpoint-N folder, or "
                             "`latest` for the newest complete one in --output).")
        if not checkpoint_is_complete(resume):
            raise UsageError(f"--resume-from-checkpoint {resume}: an incomplete checkpoint (no valid "
                             "trainer_state.json: its save was interrupted); resume from an earlier one, "
                             "or pass `latest`.")
    check_new_folder(output, "--output", overwrite or resume is not None, inputs={"--model": model_dir})
    return resume


def check_new_folder(value: str, option: str, overwrite: bool, *, inputs: dict[str, str] | None = None) -> None:
    """An output folder as `check_output_folder`, that is also new or empty unless `--overwrite` was given."""
    from .saving import check_output_path

    check_output_folder(value, option, inputs=inputs)
    try:
        check_output_path(value, overwrite=overwrite, forbid=list((inputs or {}).values()), what=option)
    except ValueError as err:
        raise UsageError(str(err).replace("overwrite=True (--overwrite)", "--overwrite")) from None


def save_training_output(trainer, output: str, processor, codec=None, codec_dir: str | None = None) -> None:
    """The final model, processor (and codec: `codec` saved with its weights, else a copy of `codec_dir`) are saved
    beside the run's checkpoints and published in one step (`deeptalk.saving.publish_staged`): a kill leaves the
    previous model or none that loads, never a mix."""
    from .saving import clear_staging, publish_staged, staging_folder

    staging = staging_folder(output)
    if trainer.is_world_process_zero():
        clear_staging(output)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)  # on every process: ZeRO-3 and FSDP gather the weights collectively
    if trainer.is_world_process_zero():
        processor.save_pretrained(staging)
        if codec is not None:
            codec.save_pretrained(os.path.join(staging, "codec"))
        elif codec_dir is not None:
            shutil.copytree(codec_dir, os.path.join(staging, "codec"))
        publish_staged(output)
    trainer.accelerator.wait_for_everyone()


def parse_speech_experts(value: str | None) -> list[list[int]] | None:
    """`--speech-experts` accepts inline JSON (`[[3, 17], [5, 9]]`) or a path to a JSON file holding
    one list of source expert indices per MoE layer, in layer order (the authors' format)."""
    if value is None:
        return None
    text = Path(value).read_text() if os.path.isfile(value) else value
    try:
        experts = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"--speech-experts: {value!r} is neither a JSON file nor inline JSON ({err}). "
            "Expected one list of expert indices per MoE layer, e.g. '[[3, 17], [5, 9]]'."
        ) from None
    if not (isinstance(experts, list) and all(isinstance(layer, list) for layer in experts)):
        raise UsageError("--speech-experts must be a JSON list of lists (one list of expert indices per MoE layer).")
    return experts


DATA_FORMAT_CHOICES = ("messages", "asr", "voiceassistant", "spoken_qa")  # deeptalk.data.formats.DATA_FORMATS
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")
_DATASET_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _dataset_in_cache(repo_id: str) -> bool:
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    prepared = Path(datasets_cache) / repo_id.replace("/", "___")
    return (snapshots.is_dir() and any(snapshots.iterdir())) or prepared.is_dir()


def check_data_source(value: str, option: str = "--data") -> str:
    """Check a dataset argument before anything loads: a data file (JSON Lines, json, parquet, arrow, csv), a
    folder (prepared by `deeptalk prepare`, written by `save_to_disk`, or holding data files), a glob that matches
    files, or a Hub dataset id that can be fetched. Returns the value to load; raises UsageError otherwise."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        if Path(path).suffix not in _DATA_SUFFIXES:
            raise UsageError(f"{option} {value}: not a data file; give a {', '.join(_DATA_SUFFIXES)} file, a folder, "
                             "a glob of files or a Hub dataset id.")
        return path
    if os.path.isdir(path):
        return path
    if glob.has_magic(path):
        if not any(os.path.isfile(p) for p in glob.glob(path, recursive=True)):
            raise UsageError(f"{option} {value}: the pattern matches no file.")
        return path
    if _looks_like_path(value) or Path(value).suffix in _DATA_SUFFIXES or not _DATASET_ID.match(value):
        raise UsageError(f"{option} {value}: no such file or folder.")
    local_hint = (f"download it where there is network (`hf download {value} --repo-type dataset --local-dir DIR`) "
                  f"and pass its files, e.g. {option} 'DIR/data/train-*.parquet'")
    return _reachable_hub_id(value, option, "no such file or folder", f"the Hub dataset {value!r}",
                             _dataset_in_cache, local_hint)


def parse_data_specs(values: list[str], option: str = "--data") -> list[tuple[str, float | None]]:
    """`--data SOURCE[:WEIGHT]` values -> checked (source, weight) pairs; weights are given to all or to none."""
    from .data.training import parse_data_spec

    specs = []
    for value in values:
        try:
            source, weight = parse_data_spec(value)
        except ValueError as err:
            raise UsageError(f"{option} {err}") from None
        specs.append((check_data_source(source, option), weight))
    weighted = [w is not None for _, w in specs]
    if any(weighted) and not all(weighted):
        raise UsageError(f"give a weight to every {option} (SOURCE:WEIGHT, e.g. {option} text.parquet:0.3) or to none.")
    return specs


def parse_columns(values: list[str] | None) -> dict[str, str]:
    """`--columns NAME=COLUMN ...` -> {schema name: the dataset's column}."""
    columns = {}
    for value in values or []:
        name, sep, column = value.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise UsageError(f"--columns {value!r} is not NAME=COLUMN (e.g. --columns audio=wav text=sentence).")
        columns[name.strip()] = column.strip()
    return columns


def _per_source(values: list[str] | None, count: int, option: str, default: str) -> list[str]:
    values = values or [default]
    if len(values) not in (1, count):
        raise UsageError(f"{len(values)} {option} values for {count} --data sources: give one for all, or one per "
                         "--data in the same order.")
    return values * count if len(values) == 1 else values


def _check_format_options(formats: list[str], columns: dict[str, str], question_modality, answer_modality) -> None:
    """The schema options, checked before anything loads (the loaders check them again, with the data)."""
    from .data.formats import _check_options
    from .data.training import check_columns

    try:
        for data_format in formats:
            if question_modality is not None or answer_modality is not None:
                _check_options(data_format, question_modality or "audio", answer_modality)
        check_columns(columns, formats)
    except ValueError as err:
        raise UsageError(f"{err}") from None


def _format_options(args) -> dict:
    return {k: v for k, v in (("question_modality", args.question_modality),
                              ("answer_modality", args.answer_modality)) if v is not None}


def save_codec_beside(output: str, *, codec=None, codec_dir: str | None = None) -> str | None:
    """Put the codec a model's speech codes belong to in `output/codec` (what `deeptalk chat` loads): `codec` saved
    with its weights, else a copy of `codec_dir`. Returns the folder written, or None when there is no codec."""
    target = os.path.join(output, "codec")
    if codec is None and not codec_dir:
        return None
    if codec_dir and os.path.isdir(target) and os.path.samefile(codec_dir, target):
        return target
    scratch = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    if codec is not None:
        codec.save_pretrained(scratch)
    else:
        shutil.copytree(codec_dir, scratch)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


# ---------------------------------------------------------------------------------------------- commands


def cmd_convert(args) -> int:
    source = args.source
    tiny = source.startswith("tiny:")
    if not tiny:
        source = check_source(source, "SRC")
    check_output_folder(args.output, "OUT", inputs={"SRC": source})
    speech_experts = parse_speech_experts(args.speech_experts)
    if tiny:
        from .tiny import TINY_FAMILIES

        family = source.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise UsageError(f"{source}: unknown tiny family {family!r}; one of {', '.join(TINY_FAMILIES)}.")
    from .conversion import convert_folder

    overrides = {"routing_mode": args.routing_mode}
    if args.num_speech_experts is not None:
        overrides["num_speech_experts"] = args.num_speech_experts
    model = convert_folder(source, args.output, speech_experts, dtype=args.dtype, overwrite=args.overwrite, **overrides)
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
    check_output_folder(args.output, "--output")
    from .demo import run_demo

    return 0 if run_demo(args.output, families=args.family) else 1


def _codec_layout(codec_dir: str) -> dict:
    with open(os.path.join(codec_dir, "codec_config.json"), encoding="utf-8") as f:
        return json.load(f).get("layout") or {}


def _same_codec_layout(a: dict, b: dict) -> bool:
    keys = ("num_streams", "codebook_size", "sampling_rate")
    return all(a.get(k) == b.get(k) for k in keys)


def _codec_summary(layout: dict) -> str:
    return (f"{layout.get('codec_name')} ({layout.get('num_streams')} streams x {layout.get('codebook_size')} codes, "
            f"{layout.get('sampling_rate')} Hz)")


def cmd_prepare(args) -> int:
    if (args.model is None) == (args.processor is None):
        raise UsageError("give the processor as --model DIR (a model folder with its processor) or as --processor DIR, "
                         "one of the two.")
    if args.model:
        processor_dir = check_model(args.model)
    else:
        processor_dir = check_source(args.processor, "--processor", need_config=False)
        if os.path.isdir(processor_dir) and not os.path.isfile(os.path.join(processor_dir, "processor_config.json")):
            raise UsageError(f"--processor {args.processor} has no processor_config.json: give a folder written by "
                             "DeepTalkProcessor.save_pretrained (a model folder holds one).")
    codec_dir = check_source(args.codec, "--codec", need_config=False) if args.codec else None
    source = check_data_source(args.data, "DATA")
    columns = parse_columns(args.columns)
    _check_format_options([args.data_format], columns, args.question_modality, args.answer_modality)
    check_output_folder(args.output, "--output", inputs={"DATA": source})

    from transformers import AutoProcessor

    from .data import load_conversation_dataset, prepare_dataset, prepared_summary

    processor = AutoProcessor.from_pretrained(processor_dir)
    codec = None
    if codec_dir:
        from .processing.codecs import load_codec

        codec = load_codec(codec_dir)
    dataset = load_conversation_dataset(source, data_format=args.data_format, split=args.split,
                                        streaming=args.streaming, columns=columns, num_proc=args.num_proc,
                                        **_format_options(args))
    prepare_dataset(dataset, processor, output_dir=args.output, codec=codec, num_proc=args.num_proc,
                    shard_size=args.shard_size, max_length=args.max_length, skip_invalid=args.skip_invalid,
                    source=args.data, data_format=args.data_format, overwrite=args.overwrite)
    summary = prepared_summary(args.output)
    dropped = f"{summary['too_long']} too long and {summary['invalid']} invalid dropped"
    codec_note = ""
    if summary["codec"]:
        codec_note = f"; speech codes of {summary['codec']} (in {os.path.join(args.output, 'codec')})"
    print(f"deeptalk prepare: {summary['num_rows']} of {summary['source_rows']} rows ({dropped}) in "
          f"{summary['shards']} shards -> {args.output}{codec_note}")
    return 0


def cmd_train(args) -> int:
    model_dir = check_model(args.model)
    codec_dir = check_source(args.codec, "--codec", need_config=False) if args.codec else None
    resume = check_training_output(args.output, model_dir, args.resume_from_checkpoint, args.overwrite)
    specs = parse_data_specs(args.data)
    columns = parse_columns(args.columns)
    formats = _per_source(args.data_format, len(specs), "--data-format", "messages")
    splits = _per_source(args.split, len(specs), "--split", "train")
    if args.phase == "dpo":
        (source, weight), *more = specs
        if more or weight is not None or args.streaming or not os.path.isfile(source) or args.data_format \
                or Path(source).suffix not in (".jsonl", ".json"):
            raise UsageError("the dpo phase reads preference pairs ({'prompt', 'chosen', 'rejected'} rows) from one "
                             "JSON Lines file: --data PAIRS.jsonl, without weights, --data-format or --streaming.")
    else:
        from .data.training import is_prepared_source

        _check_format_options([f for (s, _), f in zip(specs, formats) if not is_prepared_source(s)], columns,
                              args.question_modality, args.answer_modality)

    from .trainers.recipes import build_phase_config, build_trainer, load_recipe, parse_overrides

    recipe = load_recipe(args.recipe)
    if recipe["phase"] != args.phase:
        raise UsageError(f"Recipe {args.recipe} is for phase {recipe['phase']!r}, not {args.phase!r}.")
    train_args = {**recipe["args"], **parse_overrides(args.set, phase=args.phase), "output_dir": args.output}
    if args.phase == "experts" and args.modality:
        train_args["modality"] = args.modality
    if args.streaming and not (train_args.get("max_steps") or 0) > 0:
        raise UsageError("--streaming reads the data as a stream with no length: set max_steps in the recipe or with "
                         "--set max_steps=N.")

    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    config = build_phase_config(args.phase, train_args)  # sets up the processes of a multi-process launch
    processor = AutoProcessor.from_pretrained(model_dir)
    codec = None
    if codec_dir:
        from .processing.codecs import load_codec

        codec = load_codec(codec_dir)
    max_length = recipe["data"].get("max_length")
    # the data is read (and, unless streamed, encoded: once, by the main process) before the model loads, so
    # that bad data fails fast
    with config.main_process_first(desc="encoding the training data"):
        if args.phase == "dpo":
            from .trainers.recipes import encode_dataset, load_conversations

            dataset = encode_dataset(processor, load_conversations(specs[0][0]), codec=codec, max_length=max_length)
            rows, prepared_codecs = len(dataset), []
        else:
            from .data.training import load_training_data

            data = load_training_data(specs, processor, data_format=formats, split=splits, streaming=args.streaming,
                                      columns=columns, codec=codec, max_length=max_length, num_proc=args.num_proc,
                                      seed=config.seed, **_format_options(args))
            dataset, rows, prepared_codecs = data.dataset, data.num_rows, data.codec_dirs
    layouts = [_codec_layout(d) for d in prepared_codecs]
    if codec is not None:
        layouts.insert(0, {**codec.layout(), "codec_name": codec.codec_name})
    for layout in layouts[1:]:
        if not _same_codec_layout(layouts[0], layout):
            raise UsageError(f"the data's speech codes come from different codecs: {_codec_summary(layouts[0])} and "
                             f"{_codec_summary(layout)}; train on data of one codec (and --codec, if given, that one).")
    beside_model = os.path.join(model_dir, "codec")
    carried_codec = prepared_codecs[0] if prepared_codecs else beside_model if os.path.isdir(beside_model) else None

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if train_args.get("bf16") else None)
    trainer = build_trainer(args.phase, model, processor, dataset, config, codec=codec)
    trainer.train(resume_from_checkpoint=resume)
    # the codec the speech codes belong to travels with the model, so `deeptalk chat` on it can speak
    save_training_output(trainer, args.output, processor, codec=codec,
                         codec_dir=None if codec is not None else carried_codec)
    if trainer.is_world_process_zero():  # one completion line under a multi-process launch
        sources = f"{len(specs)} source{'s' * (len(specs) > 1)}"
        what = f"{rows} conversations" if rows is not None else f"streamed data ({sources})"
        has_codec = codec is not None or carried_codec is not None
        codec_note = f" (codec in {os.path.join(args.output, 'codec')})" if has_codec else ""
        print(f"deeptalk train {args.phase}: {trainer.state.global_step} steps on {what} -> {args.output}{codec_note}")
    return 0


def cmd_assign(args) -> int:
    model_dir = check_model(args.model)
    codec_dir = check_source(args.codec, "--codec", need_config=False) if args.codec else None
    if args.strategy != "random":
        data = {"--text-data": args.text_data, "--speech-data": args.speech_data}
        for option, value in data.items():
            if value is None:
                raise UsageError(f"--strategy {args.strategy} measures the modality load: pass {option} FILE.jsonl "
                                 "(or use --strategy random).")
        for option, value in data.items():
            check_input_file(value, option)
    check_new_folder(args.output, "--output", args.overwrite, inputs={"--model": model_dir})

    from transformers import AutoModelForCausalLM, AutoProcessor

    from .processing.processing_deeptalk import DeepTalkDataCollator
    from .saving import atomic_directory
    from .trainers.assignment import assign_speech_experts, measure_modality_load, save_load_report
    from .trainers.recipes import load_conversations

    if args.strategy != "random":  # malformed files fail before the model loads
        text_rows, speech_rows = load_conversations(args.text_data), load_conversations(args.speech_data)
    beside_model = os.path.join(model_dir, "codec")
    codec = None
    if codec_dir or (args.strategy != "random" and os.path.isdir(beside_model)):
        from .processing.codecs import load_codec

        codec = load_codec(codec_dir or beside_model)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    collate = DeepTalkDataCollator(processor, codec=codec)

    def batches(rows):
        for start in range(0, len(rows), args.batch_size):
            yield {k: v for k, v in collate(rows[start : start + args.batch_size]).items() if k != "labels"}

    if args.strategy == "random":
        load = None
    else:
        load = measure_modality_load(model, batches(text_rows), batches(speech_rows))
    if args.num_speech_experts is not None:
        model.config.num_speech_experts = args.num_speech_experts
    speech_experts = assign_speech_experts(model, load, strategy=args.strategy, seed=args.seed)
    with atomic_directory(args.output, overwrite=args.overwrite, forbid=[model_dir], what="--output") as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        # the codec the speech answers were encoded with travels with the model (given, or the model's own)
        save_codec_beside(staging, codec=codec if codec_dir else None,
                          codec_dir=None if codec_dir else beside_model if os.path.isdir(beside_model) else None)
        if load is not None:
            save_load_report(load, speech_experts, staging, strategy=args.strategy, seed=args.seed)
    print(f"deeptalk assign: {args.strategy} speech experts per MoE layer -> {args.output}")
    for layer, experts in zip(model.config.moe_layer_indices, speech_experts, strict=True):
        print(f"  layer {layer}: {experts}")
    return 0


def cmd_quickstart(args) -> int:
    base_model = check_source(args.base_model, "--base-model") if args.base_model else None
    codec = check_source(args.codec, "--codec", need_config=False) if args.codec else None
    check_output_folder(args.output, "--output")
    from .conversion.whisper_ct2 import SHIPPED_WHISPER_MODELS
    from .quickstart import QuickstartSettings, run_quickstart

    audio_encoder = args.audio_encoder
    if audio_encoder not in ("auto", "random", *SHIPPED_WHISPER_MODELS):
        audio_encoder = check_source(audio_encoder, "--audio-encoder")
    if args.align_loss == "ctc" and args.audio_adapter != "ctc":
        raise UsageError(f"--align-loss ctc trains the CTC adapter's head, but --audio-adapter is "
                         f"{args.audio_adapter}: use --audio-adapter ctc, or drop --align-loss.")
    settings = QuickstartSettings(output_dir=args.output, seed=args.seed, base_model=base_model, codec=codec,
                                  audio_encoder=audio_encoder, audio_adapter_stride=args.audio_adapter_stride,
                                  audio_adapter=args.audio_adapter, align_loss_type=args.align_loss,
                                  num_threads=args.threads)
    if args.fast:  # a smoke run: a few steps per phase
        settings.text_pretrain_steps, settings.align_steps, settings.speech_steps = 20, 4, 4
        settings.text_steps, settings.joint_steps, settings.judge_spoken_answers = 4, 4, False
    run_quickstart(settings)
    return 0


def _check_model_and_codec(args) -> tuple[str, str | None]:
    model_dir = check_model(args.model, default=default_model(), as_saved=True)
    codec_dir = check_source(args.codec, "--codec", need_config=False) if args.codec else None
    return model_dir, codec_dir


def _load_model_processor_codec(model_dir: str, codec_dir: str | None):
    from transformers import AutoModelForCausalLM, AutoProcessor

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
    if (args.audio is None) == (args.text is None):
        raise UsageError("give the question as --audio FILE or as --text '...', one of the two.")
    check_input_file(args.audio, "--audio")
    check_audio_output(args.out, "--out")
    model_dir, codec_dir = _check_model_and_codec(args)

    import soundfile

    from .generation import AudioChunk, ChatReply, SpeechChat, SpeechDecodingConfig, TextDelta

    model, processor, codec = _load_model_processor_codec(model_dir, codec_dir)
    config = SpeechDecodingConfig(strategy=args.strategy, max_steps=args.max_steps, audio_top_k=args.audio_top_k,
                                  text_repetition_penalty=args.repetition_penalty, seed=args.seed, voice=args.voice,
                                  cache_implementation=args.cache)
    chat = SpeechChat(model, processor, codec, config, chunk_frames=args.chunk_frames)
    if args.audio is not None and model.config.audio_config is not None and model.config.audio_adapter == "ctc":
        from .evaluation.metrics import heard_transcripts

        # what the LLM will read in place of the audio: tells a mishearing from a wrong answer
        print(f"[heard: {heard_transcripts(model, processor, [args.audio])[0]!r}]", file=sys.stderr)
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
        seconds = reply.waveform.size / reply.sampling_rate
        spoken = f"{reply.codes.shape[1]} codec frames ({seconds:.2f} s) -> {args.out}"
    else:
        spoken = "no speech frames generated" if codec is not None else "no codec found (pass --codec) so no WAV"
    t = reply.timings
    stages = ("features", "prefill", "first_text", "first_audio_chunk", "total")
    latency = ", ".join(f"{name} {t[name] * 1000:.0f} ms" for name in stages if name in t)
    print(f"[{reply.steps} decode steps ({args.strategy}); {latency}; {spoken}]", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    return _evaluate_datasets(args) if args.data else _evaluate_demo_corpus(args)


def _fixed_threads(args):
    """`--threads` torch threads for the evaluation (after the inputs are checked: this imports torch). Greedy
    Whisper judging flips on borderline clips with the thread count (docs/quickstart_results.md)."""
    from .quickstart import torch_threads

    return torch_threads(args.threads)


def _evaluate_demo_corpus(args) -> int:
    check_output_file(args.output, "--output")
    model_dir, codec_dir = _check_model_and_codec(args)
    base_dir = check_source(args.base_model, "--base-model") if args.base_model else None
    asr = args.asr
    if asr not in ("auto", "judge", "own"):
        asr = check_source(asr, "--asr")

    import torch
    from transformers import AutoModelForCausalLM

    from .evaluation.evaluate import evaluate_on_demo_corpus, write_results

    with _fixed_threads(args):
        model, processor, codec = _load_model_processor_codec(model_dir, codec_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval() if base_dir else None
        results = evaluate_on_demo_corpus(model, processor, base_model=base, codec=codec, limit=args.limit, asr=asr,
                                          speech_answers=not args.no_speech_answers,
                                          max_speech_steps=args.max_speech_steps, max_new_tokens=args.max_new_tokens,
                                          decoding={"strategy": args.strategy, "voice": args.voice})
        results = {**results, "num_threads": torch.get_num_threads()}
    results = write_results(results, args.output)
    print(json.dumps(results, indent=2, allow_nan=False))
    for metric, warning in results.get("warnings", {}).items():
        print(f"deeptalk evaluate: warning: {metric}: {warning}", file=sys.stderr)
    return 0


def _evaluate_datasets(args) -> int:
    """`deeptalk evaluate --data ...`: speech->text and speech->speech accuracy per spoken QA dataset."""
    check_output_file(args.output, "--output")
    if args.base_model:
        raise UsageError("--base-model scores the demo corpus's text QA; with --data (spoken QA datasets) it is not "
                         "used.")
    model_dir, codec_dir = _check_model_and_codec(args)
    sources = [check_data_source(value, "--data") for value in args.data]
    splits = _per_source(args.split, len(sources), "--split", "test")
    columns = parse_columns(args.columns)
    _check_format_options([args.data_format], columns, None, None)
    asr = args.asr
    if asr is not None and asr not in ("auto", "judge", "own") and not asr.startswith("whisper"):
        asr = check_source(asr, "--asr")

    from transformers import AutoModelForCausalLM, AutoProcessor

    from .evaluation.benchmarks import evaluate_spoken_qa_datasets, write_benchmark_table

    with _fixed_threads(args):
        if args.no_speech_answers:  # no codec needed (nor loaded: a recorded codec may have no weights here)
            model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            processor, codec = AutoProcessor.from_pretrained(model_dir), None
        else:
            model, processor, codec = _load_model_processor_codec(model_dir, codec_dir)
        row = evaluate_spoken_qa_datasets(model, processor, sources, codec=codec, splits=splits, columns=columns,
                                          limit=args.limit, asr=asr, match=args.match,
                                          speech_answers=not args.no_speech_answers,
                                          max_speech_steps=args.max_speech_steps, max_new_tokens=args.max_new_tokens,
                                          decoding={"strategy": args.strategy, "voice": args.voice},
                                          model_name=args.model)
    table = write_benchmark_table(row, args.output)
    print(table["markdown"])
    for name, reason in row.get("skipped", {}).items():
        print(f"deeptalk evaluate: {name} skipped: {reason}", file=sys.stderr)
    print(f"deeptalk evaluate: {len(table['rows'])} model row(s) -> {args.output} and {table['markdown_path']}",
          file=sys.stderr)
    return 0


def cmd_push(args) -> int:
    if not args.export_only:
        check_upload_possible("push", "use --export-only FOLDER to write the repository without uploading")
    else:
        check_new_folder(args.export_only, "--export-only", args.overwrite)
    model_dir, codec_dir = _check_model_and_codec(args)
    check_input_file(args.eval_results, "--eval-results")
    if args.load_report is not None and not os.path.isdir(args.load_report):
        raise UsageError(f"--load-report {args.load_report}: no such folder.")
    eval_results = None
    if args.eval_results:
        try:
            eval_results = json.loads(Path(args.eval_results).read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"--eval-results {args.eval_results} is not JSON ({err}).") from None

    from .hub import export_for_hub, push_to_hub

    model, processor, codec = _load_model_processor_codec(model_dir, codec_dir)
    kwargs = {"codec": codec, "base_model": args.base_model, "eval_results": eval_results,
              "load_report_dir": args.load_report}
    if args.export_only:
        folder = export_for_hub(model, processor, args.export_only, repo_id=args.repo_id, overwrite=args.overwrite,
                                **kwargs)
        print(f"Exported a Hub-ready repository for {args.repo_id} into {folder} (nothing uploaded).")
        return 0
    url = push_to_hub(model, processor, args.repo_id, private=args.private, **kwargs)
    print(f"Pushed {args.model} to {args.repo_id}: {url}")
    return 0


def cmd_space(args) -> int:
    if args.push:
        check_upload_possible("space --push", "drop --push and upload the written folder later")
    model = args.model
    local = os.path.expanduser(model)
    if os.path.exists(local) or _looks_like_path(model) or args.bundle_model or model == default_model():
        model = check_source(model, "--model", default=default_model())  # a Hub id is only referenced, not loaded
    for example in args.example or ():
        check_input_file(example, "--example")
    check_new_folder(args.folder, "FOLDER", args.overwrite)

    from .hub import create_space

    folder = create_space(args.folder, model, max_steps=args.max_steps, strategy=args.strategy,
                          example_audio=args.example or (), bundle_model=args.bundle_model,
                          deeptalk_requirement=args.deeptalk_requirement, push=bool(args.push), repo_id=args.push,
                          overwrite=args.overwrite)
    where = f"and pushed to the Space {args.push}" if args.push else f"run it with: cd {folder} && python app.py"
    print(f"Wrote a gradio Space for {args.model} into {folder}; {where}")
    return 0


# ---------------------------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each option's default (options without one say nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default is argparse.SUPPRESS or default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    home, model = deeptalk_home(), default_model()
    parser = argparse.ArgumentParser(prog="deeptalk", description=__doc__, epilog=_ENVIRONMENT,
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, **kwargs):
        return sub.add_parser(name, help=help, description=help, epilog=_ENVIRONMENT, formatter_class=_HelpFormatter,
                              **kwargs)

    columns_help = "the schema's column names mapped onto the data's, e.g. --columns audio=wav text=sentence"
    model_help = f"DeepTalk model folder (or Hub id), saved with its processor; the default is under ${HOME_VARIABLE}"
    codec_help = "codec folder or Hub id (default: <model>/codec)"
    strategies = ["single_pass", "batch_parallel"]

    demo = command("demo", "convert tiny MoE LLMs of every family, check equality, save and reload")
    demo.add_argument("--output", default=os.path.join(home, "demo"), help="where to write the converted models")
    demo.add_argument("--family", action="append", help="limit to these families (repeatable)")
    demo.set_defaults(func=cmd_demo)

    quick = command("quickstart", "the whole recipe offline on tiny models: train, assign, evaluate, speak")
    quick.add_argument("--output", default=os.path.join(home, "quickstart"), help="where every phase's output goes")
    quick.add_argument("--seed", type=_non_negative_int, default=0, help="random seed of every phase")
    quick.add_argument("--fast", action="store_true", help="a few steps per phase (smoke test)")
    quick.add_argument("--audio-adapter-stride", type=_positive_int, default=4,
                       help="Whisper frames per LLM position (authors: 1)")
    quick.add_argument("--audio-adapter", choices=("ctc", "stack"), default="ctc",
                       help="ctc: the adapter types the words it hears into the LLM's text embeddings (a CTC head "
                            "trained on the transcripts); stack: the paper's MLP adapter")
    quick.add_argument("--align-loss", choices=("lm", "ctc"), default="lm",
                       help="phase 1's loss. lm: the LLM's loss on transcripts and spoken questions' answers, plus "
                            "the CTC head's; ctc: the CTC head's alone, without running the LLM (about 45 s faster, "
                            "the final model keeps less text at two seeds of three: docs/quickstart_results.md)")
    quick.add_argument("--base-model", help="a transformers MoE LLM (Hub id or folder) instead of the tiny one (GPU)")
    quick.add_argument("--codec", help="a codec (folder or Hub id, e.g. hubertsiuzdak/snac_24khz) instead of MelVQ")
    quick.add_argument("--audio-encoder", default="auto",
                       help="auto: the pretrained Whisper tiny.en (frozen) when the whisper extra is installed, else "
                            "random; random: a tiny encoder trained from scratch; or a Whisper checkpoint (shipped "
                            "name, CTranslate2 or transformers folder, Hub id such as openai/whisper-medium)")
    quick.add_argument("--threads", type=_positive_int, default=1,
                       help="torch threads for the run, whatever OMP_NUM_THREADS says (1 is fastest on 2 cores)")
    quick.set_defaults(func=cmd_quickstart)

    chat = command("chat", "ask a spoken (or text) question, get text and a WAV")
    chat.add_argument("--model", default=model, help=model_help)
    chat.add_argument("--audio", help="question audio file (any rate; mixed to mono)")
    chat.add_argument("--text", help="question as text")
    chat.add_argument("--out", default="reply.wav", help="where to write the spoken answer (an audio file name)")
    chat.add_argument("--codec", help=codec_help)
    chat.add_argument("--max-steps", type=_positive_int, default=200, help="decode steps at most")
    chat.add_argument("--strategy", default="single_pass", choices=strategies,
                      help="single_pass: one sequence; batch_parallel: the authors' text-only copy supplies the text")
    chat.add_argument("--audio-top-k", type=_positive_int, default=10,
                      help="sample audio among the top k codes (1 = greedy)")
    chat.add_argument("--repetition-penalty", type=_positive_float, default=1.2,
                      help="text repetition penalty (1.0 = off)")
    chat.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed")
    chat.add_argument("--voice", help="voice token name, for models trained with voices")
    chat.add_argument("--chunk-frames", type=_positive_int, default=8, help="codec frames per streamed audio chunk")
    chat.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="KV cache implementation")
    chat.set_defaults(func=cmd_chat)

    evaluate = command("evaluate", "text QA, spoken QA, ASR and audio-token metrics -> JSON")
    evaluate.add_argument("--model", default=model, help=model_help)
    evaluate.add_argument("--base-model", help="the original LLM (folder or Hub id), for the relative text drop")
    evaluate.add_argument("--codec", help=codec_help)
    evaluate.add_argument("--output", default=os.path.join(home, "evaluation.json"), help="where to write the JSON")
    evaluate.add_argument("--limit", type=_positive_int,
                          help="score only the first N test records per task (default: all)")
    evaluate.add_argument("--asr", default="auto",
                          help="ASR for the spoken answers: auto (the pretrained Whisper judge when the whisper extra "
                               "is installed, else own), judge, own (the model's ASR path) or a transformers ASR "
                               "checkpoint (Hub id or folder, e.g. openai/whisper-large-v3)")
    evaluate.add_argument("--max-speech-steps", type=_positive_int, default=200, help="decode steps per spoken answer")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=8, help="tokens per greedy text answer")
    evaluate.add_argument("--no-speech-answers", action="store_true", help="skip speech->speech accuracy and TTS WER")
    evaluate.add_argument("--threads", type=_positive_int, default=1,
                          help="torch threads, whatever OMP_NUM_THREADS says: the figures depend on it (the "
                               "quickstart's are at 1)")
    evaluate.add_argument("--strategy", default="single_pass", choices=strategies,
                          help="decoding of the spoken answers")
    evaluate.add_argument("--voice",
                          help="voice token for the spoken answers (default: the model's first voice, if any)")
    evaluate.add_argument("--data", action="append", metavar="SOURCE",
                          help="score spoken QA datasets instead of the demo corpus (repeatable: one table column pair "
                               "each): files, globs, folders or Hub ids in the spoken_qa schema (question, answers, "
                               "audio); writes the paper's table (S2T and S2S accuracy per dataset and their average) "
                               "as --output and a .md beside it; an existing table there gains this model's row. The "
                               "spoken answers are transcribed by --asr ('own', a checkpoint, or whisper[:NAME] for "
                               "deeptalk's WhisperJudge)")
    evaluate.add_argument("--data-format", default="spoken_qa", choices=["spoken_qa"], help="schema of the --data")
    evaluate.add_argument("--split", action="append", help="split of the --data (one for all or one per --data; "
                                                           "default: test)")
    evaluate.add_argument("--columns", nargs="+", action="extend", metavar="NAME=COLUMN", help=columns_help)
    evaluate.add_argument("--match", default="contains", choices=["contains", "exact"],
                          help="with --data: an answer is right when a reference answer appears in it (contains) or "
                               "equals it (exact), both after Whisper's English normalisation")
    evaluate.set_defaults(func=cmd_evaluate)

    push = command("push", "export to a Hub-ready folder and upload it (huggingface_hub)")
    push.add_argument("repo_id", help="the Hub model repo to upload to (user/name)")
    push.add_argument("--model", default=model, help=model_help)
    push.add_argument("--codec", help=codec_help)
    push.add_argument("--base-model", help="base model id for the card")
    push.add_argument("--eval-results", help="JSON from `deeptalk evaluate`, rendered as the card's eval_results")
    push.add_argument("--load-report", help="folder holding modality_load.json/.png (e.g. the quickstart's output)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--export-only", metavar="FOLDER", help="write the repository folder and stop before uploading")
    push.add_argument("--overwrite", action="store_true", help="replace a non-empty --export-only FOLDER")
    push.set_defaults(func=cmd_push)

    space = command("space", "write a gradio Space (spoken chat + expert view) for a model, optionally push it")
    space.add_argument("folder", help="where to write the Space")
    space.add_argument("--model", default=model, help="model folder or Hub id (a Hub id is referenced, not downloaded)")
    space.add_argument("--max-steps", type=_positive_int, default=200, help="decode steps at most per answer")
    space.add_argument("--strategy", default="single_pass", choices=strategies, help="decoding of the spoken answers")
    space.add_argument("--example", action="append", help="a spoken question offered as an example (repeatable)")
    space.add_argument("--bundle-model", action="store_true", help="copy a local model folder into the Space")
    space.add_argument("--deeptalk-requirement", help="pip requirement for deeptalk (default: bundle the package)")
    space.add_argument("--push", metavar="REPO_ID", help="upload the Space to this repo id (huggingface_hub)")
    space.add_argument("--overwrite", action="store_true", help="replace FOLDER if it holds something")
    space.set_defaults(func=cmd_space)

    convert = command("convert", "convert a transformers MoE LLM into a DeepTalk model")
    convert.add_argument("source", metavar="SRC", help="folder, Hub id, or tiny:FAMILY")
    convert.add_argument("output", metavar="OUT", help="output folder (Hub-ready: weights, config, remote code)")
    convert.add_argument("--speech-experts",
                         help="JSON (inline or file): one list of source expert indices per MoE layer")
    convert.add_argument("--num-speech-experts", type=_positive_int,
                         help="speech experts per layer when assigning later (default: the config's, 6)")
    convert.add_argument("--routing-mode", default="free",
                         choices=["free", "speech_only", "text_only", "by_token_modality"],
                         help="which experts tokens may be routed to")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         help="load the source in this dtype (default: as saved)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace OUT if it holds something (the old folder stays whole until the new one is)")
    convert.set_defaults(func=cmd_convert)

    upgrade = command("upgrade", "rewrite a folder saved by deeptalk 0.1 in the current format")
    upgrade.add_argument("old", metavar="OLD", help="the old model folder (left untouched)")
    upgrade.add_argument("new", metavar="NEW", help="the new folder (new or empty)")
    upgrade.add_argument("--overwrite", action="store_true", help="replace NEW if it holds something")
    upgrade.set_defaults(func=cmd_upgrade)

    data_help = ("training data, repeatable: a JSON Lines file of {'messages': [...]}, a folder written by "
                 "`deeptalk prepare`, a save_to_disk folder, parquet/arrow/json/csv files, a glob or folder of them, "
                 "or a Hub dataset id. SOURCE:WEIGHT (e.g. --data speech.parquet:0.7 --data text.jsonl:0.3) "
                 "interleaves "
                 "the sources with those probabilities (every one seen whole); without weights they are concatenated")
    schemas = ("messages (chat), asr (audio, text), voiceassistant (question, question_audio, answer, answer_snac: "
               "VoiceAssistant-400K), spoken_qa (question, answers, audio)")
    formats_help = ("schema of the --data sources (one for all, or one per --data in order; prepared folders ignore "
                    f"it): {schemas}")

    def add_format_options(sub_parser):
        sub_parser.add_argument("--columns", nargs="+", action="extend", metavar="NAME=COLUMN", help=columns_help)
        sub_parser.add_argument("--question-modality", choices=["audio", "text"],
                                help="voiceassistant / spoken_qa: spoken questions (default) or their text")
        sub_parser.add_argument("--answer-modality", choices=["speech", "text"],
                                help="voiceassistant: text + speech codes (default) or text answers only")

    prepare = command("prepare", "encode a dataset once into training-ready Arrow shards (resumable), "
                                 "for `deeptalk train --data`")
    prepare.add_argument("data", metavar="DATA", help="the dataset: JSON Lines, parquet/arrow/json/csv files, a glob "
                                                      "or folder of them, a save_to_disk folder or a Hub dataset id")
    prepare.add_argument("--data-format", required=True, choices=DATA_FORMAT_CHOICES, help=f"schema of DATA: {schemas}")
    prepare.add_argument("--output", required=True, help="the prepared folder (an interrupted run resumes in it)")
    prepare.add_argument("--model", help="the model whose processor lays the rows out (a DeepTalk model folder)")
    prepare.add_argument("--processor", help="a processor folder instead of --model")
    prepare.add_argument("--codec", help="codec (folder or Hub id) that encodes speech answers given as audio; it is "
                                         "recorded with the rows (voiceassistant data records SNAC 24 kHz by default)")
    prepare.add_argument("--split", default="train", help="the split to read (files are named by it)")
    prepare.add_argument("--streaming", action="store_true", help="read the source as a stream (nothing cached twice)")
    prepare.add_argument("--num-proc", type=_positive_int, default=1, help="processes that encode rows")
    prepare.add_argument("--shard-size", type=_positive_int, default=10_000,
                         help="source rows per shard (the unit of resumption)")
    prepare.add_argument("--max-length", type=_positive_int, help="drop rows longer than this many steps")
    prepare.add_argument("--skip-invalid", action="store_true", help="drop (and count) rows that cannot be encoded")
    prepare.add_argument("--overwrite", action="store_true", help="start again in an --output prepared otherwise")
    add_format_options(prepare)
    prepare.set_defaults(func=cmd_prepare)

    train = command("train", "run one training phase from a recipe")
    train.add_argument("phase", choices=["align", "experts", "joint", "dpo"], help="the phase to run")
    train.add_argument("--recipe", required=True, help="YAML path or shipped name, e.g. tiny_cpu/experts_speech")
    train.add_argument("--model", required=True, help="DeepTalk model folder (with its processor)")
    train.add_argument("--data", required=True, action="append", metavar="SOURCE[:WEIGHT]",
                       help=data_help + "; the dpo phase reads one JSON Lines file of {'prompt', 'chosen', 'rejected'}")
    train.add_argument("--data-format", action="append", choices=DATA_FORMAT_CHOICES,
                       help=formats_help + " (default: messages)")
    train.add_argument("--split", action="append", help="split of the --data sources (one for all, or one per --data; "
                                                        "default: train)")
    train.add_argument("--streaming", action="store_true",
                       help="read the data as streams, each process its own part, round and round until max_steps "
                            "(needs max_steps); resuming skips what was read")
    train.add_argument("--num-proc", type=_positive_int, help="processes that encode conversations (not streamed)")
    add_format_options(train)
    train.add_argument("--output", required=True,
                       help="where to write the trained model (with its processor and codec)")
    train.add_argument("--modality", choices=["speech", "text"], help="experts phase: override the recipe's modality")
    train.add_argument("--codec",
                       help="codec folder for assistant answers given as audio files (saved in <output>/codec)")
    train.add_argument("--resume-from-checkpoint", metavar="CHECKPOINT",
                       help="a checkpoint-N folder to resume from, or `latest`: the newest complete one in --output")
    train.add_argument("--overwrite", action="store_true",
                       help="train into a non-empty --output (its model files are replaced when the new ones are "
                            "complete; other entries stay)")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="override recipe args (fields of the phase's config, e.g. max_steps=10 save_strategy=no)")
    train.set_defaults(func=cmd_train)

    assign = command("assign", "assign speech experts from modality load (or at random)")
    assign.add_argument("--model", required=True, help="DeepTalk model folder (with its processor)")
    assign.add_argument("--text-data", help="text-only conversations (JSON Lines)")
    assign.add_argument("--speech-data", help="spoken conversations (JSON Lines)")
    assign.add_argument("--output", required=True, help="where to write the model with its speech experts")
    assign.add_argument("--num-speech-experts", type=_positive_int,
                        help="speech experts per MoE layer (default: the model's)")
    assign.add_argument("--strategy", choices=["adaptive", "random", "moextend"], default="adaptive",
                        help="adaptive: the experts speech loads most; random; moextend: new experts")
    assign.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random strategy")
    assign.add_argument("--overwrite", action="store_true", help="replace --output if it holds something")
    assign.add_argument("--batch-size", type=_positive_int, default=8, help="conversations per load-measuring batch")
    assign.add_argument("--codec", help="codec (folder or Hub id) for spoken answers given as audio files (default: "
                                        "<model>/codec); saved in <output>/codec")
    assign.set_defaults(func=cmd_assign)
    return parser


# ---------------------------------------------------------------------------------------------- main


def _is_user_error(err: BaseException) -> bool:
    """Errors that describe bad input or a missing resource (said in one line), as opposed to bugs."""
    if isinstance(err, (UsageError, ValueError, OSError)):
        return True
    return type(err).__module__.split(".")[0] == "yaml"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = (os.environ.get(DEBUG_VARIABLE) or "").lower() in {"1", "true", "yes", "on"}
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"deeptalk {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not _is_user_error(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, UsageError):
            message += f" ({DEBUG_VARIABLE}=1 shows the traceback)"
        print(f"deeptalk {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
