# Copyright 2026 The deeptalk authors. Apache-2.0.
"""DeepTalk configuration, routing policy names and the speech token layout.

This file is copied next to the weights by the Hub export (``trust_remote_code``), so it imports
only ``torch`` and ``transformers`` (and the standard library).

A DeepTalk config wraps the config of a pre-trained Mixture-of-Experts text LLM (``text_config``)
and adds what DeepTalk needs on top of it:

* ``speech_experts``: the **expert->modality map**. One list per MoE layer (in layer order) of the
  routed experts, by their index *in the source model*, that serve speech. Every other routed
  expert serves text. This is the format of the authors' ``audio_experts_file``
  (arXiv 2506.21864, DeepTalk/DeepOmni). ``None`` means "not assigned yet".
* ``routing_mode``: which experts a token may be routed to (:class:`RoutingMode`).
* ``speech_layout``: the multi-stream token layout (:class:`SpeechTokenLayout`), the one description
  of the speech vocabulary that the processor, the model, the losses and decoding all read.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

FORMAT_VERSION = 2
"""Version of the saved folder layout (``deeptalk_format_version`` in config.json). 1: deeptalk 0.1
(decoder under ``model.language_model``, one embedding table, flat speech fields)."""

TEXT_MODALITY, SPEECH_MODALITY, IGNORED_TOKEN = 0, 1, -1
"""Token modality codes of ``token_modality`` tensors and of the per-modality expert load."""
MODALITY_NAMES = ("text", "speech")


class RoutingMode(str, enum.Enum):
    """Which routed experts a token may choose. The rule itself is ``modeling_deeptalk.allowed_experts``."""

    FREE = "free"
    SPEECH_ONLY = "speech_only"
    TEXT_ONLY = "text_only"
    BY_TOKEN_MODALITY = "by_token_modality"

    @property
    def description(self) -> str:
        return _ROUTING_DESCRIPTIONS[self]

    @property
    def needs_speech_experts(self) -> bool:
        return self in (RoutingMode.SPEECH_ONLY, RoutingMode.BY_TOKEN_MODALITY)

    @classmethod
    def parse(cls, value) -> RoutingMode:
        """The mode named by `value` (a `RoutingMode` or its string), or a ValueError listing the modes."""
        try:
            return cls(value)
        except ValueError:
            choices = "; ".join(f"{m.value!r} ({m.description})" for m in cls)
            raise ValueError(f"Unknown routing mode {value!r}. Choose one of: {choices}.") from None


_ROUTING_DESCRIPTIONS = {
    RoutingMode.FREE: "top-k over all routed experts (the paper's phase 1, phase 3 and inference)",
    RoutingMode.SPEECH_ONLY: "only speech experts can be chosen (the paper's phase 2a: train the speech bank)",
    RoutingMode.TEXT_ONLY: "only text experts can be chosen (the paper's phase 2b: train the text bank)",
    RoutingMode.BY_TOKEN_MODALITY: "each token chooses among its own modality's experts (MoST/MAMoE variant; opt-in)",
}
ROUTING_MODES = {mode.value: mode.description for mode in RoutingMode}


def _qwen_moe_layers(cfg) -> list[int]:
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return [
        i for i in range(cfg.num_hidden_layers) if i not in mlp_only and cfg.num_experts > 0 and (i + 1) % step == 0
    ]


def _full_attention(cfg) -> list[str]:
    return ["full_attention"] * cfg.num_hidden_layers


def _sliding_if_windowed(cfg) -> list[str]:
    kind = "full_attention" if getattr(cfg, "sliding_window", None) is None else "sliding_attention"
    return [kind] * cfg.num_hidden_layers


# Per supported source family (mirroring its transformers decoder): routed experts per layer, which
# decoder layers are MoE, and each layer's attention mask kind.
SUPPORTED_FAMILIES = {
    "deepseek_v2": {
        "num_experts": lambda cfg: cfg.num_experts,
        "moe_layers": lambda cfg: list(range(cfg.first_k_dense_replace or 0, cfg.num_hidden_layers)),
        "layer_types": _full_attention,
    },
    "qwen3_moe": {"num_experts": lambda cfg: cfg.num_experts, "moe_layers": _qwen_moe_layers,
                  "layer_types": _sliding_if_windowed},
    "qwen2_moe": {"num_experts": lambda cfg: cfg.num_experts, "moe_layers": _qwen_moe_layers,
                  "layer_types": lambda cfg: list(cfg.layer_types)},
    "olmoe": {"num_experts": lambda cfg: cfg.num_experts, "moe_layers": lambda cfg: list(range(cfg.num_hidden_layers)),
              "layer_types": _full_attention},
    "mixtral": {"num_experts": lambda cfg: cfg.num_local_experts,
                "moe_layers": lambda cfg: list(range(cfg.num_hidden_layers)), "layer_types": _sliding_if_windowed},
}

AUDIO_SPECIAL_TOKENS = ("<|eoa|>", "<|pad_a|>", "<|boa|>", "<|audio_in|>")
"""Specials of every audio stream, at ids `codebook_size + j` of the stream's block: EOA ends a stream,
PAD_A fills a stream before it starts and after it ends, BOA opens a user audio segment, AUDIO_IN
marks the positions where the audio encoder's features are spliced in."""
VOICE_PREFIX = "<|voice:"

AUDIO_ADAPTERS = ("stack", "ctc")  # see DeepTalkConfig.audio_adapter
DEFAULT_NUM_SPEECH_EXPERTS = 6  # the paper: 6 of DeepSeek-V2-Lite's 64 routed experts per layer
DEFAULT_ROUTER_AUX_LOSS_COEF = 0.001  # transformers' Mixtral/Qwen-MoE default; the family's own value wins
WHISPER_MEL_FRAMES = 3000  # Whisper's 30 s window of 100 Hz log-mel frames


def voice_token(voice: str) -> str:
    """The audio special token of a voice (speaker) name: `<|voice:NAME|>`."""
    if not isinstance(voice, str) or not voice or any(c in voice for c in "<|>") or voice != voice.strip():
        raise ValueError(f"A voice name is a plain non-empty word such as 'assistant' or 'f10', got {voice!r}.")
    return f"{VOICE_PREFIX}{voice}|>"


def num_audio_positions(num_mel_frames: int, adapter_stride: int, pad_to_30s: bool = False) -> int:
    """Whisper's conv stem halves the 100 Hz mel frames (kernel 3, stride 2, padding 1), then the
    adapter stacks `adapter_stride` encoder frames per LLM position (the last group zero-padded)."""
    if pad_to_30s:
        num_mel_frames = WHISPER_MEL_FRAMES
    encoder_frames = (num_mel_frames - 1) // 2 + 1
    return -(-encoder_frames // adapter_stride)


@dataclass
class SpeechTokenLayout:
    """The multi-stream token layout: 1 text stream + N audio streams per decoder step.

    All ids are *global* ids of one extended vocabulary: text ids first (`[0, text_vocab_size)`), then
    one block of `codebook_size + len(audio_special_tokens)` ids per audio stream, so one embedding
    table and one output head serve every stream. An assistant turn with text ids `x` and codes
    `c [N, F]` is laid out with stream i delayed by `delays[i]` (paper: `i + 1`)::

        step        0      1      2   ...  d_i+f  ...  d_i+F  ...
        text        x0     x1     x2  ...  EOT  PAD_T  PAD_T  ...   text runs ahead, then pads
        audio i   PAD_A  PAD_A   ...       c[i,f] ...   EOA  PAD_A  stream i starts at step d_i

    `build_delayed_layout` and `undelay_layout` are exact inverses.
    """

    text_vocab_size: int
    num_audio_streams: int
    codebook_size: int
    eot_id: int
    pad_t_id: int
    delays: list[int] = field(default_factory=list)
    audio_special_tokens: list[str] = field(default_factory=lambda: list(AUDIO_SPECIAL_TOKENS))

    def __post_init__(self):
        for name in ("text_vocab_size", "num_audio_streams", "codebook_size", "eot_id", "pad_t_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"speech layout: {name} must be an integer, got {value!r}.")
        if self.num_audio_streams < 1 or self.codebook_size < 1:
            raise ValueError(
                f"speech layout: num_audio_streams={self.num_audio_streams} and codebook_size={self.codebook_size} "
                "must be >= 1 (take them from the codec: codec.num_streams, codec.codebook_size)."
            )
        self.delays = list(self.delays) or [i + 1 for i in range(self.num_audio_streams)]
        self.audio_special_tokens = list(self.audio_special_tokens)
        if len(self.delays) != self.num_audio_streams:
            raise ValueError(
                f"{len(self.delays)} delays for {self.num_audio_streams} audio streams: give one delay per stream."
            )
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.delays):
            raise ValueError(f"Stream delays must be integers >= 0, got {self.delays}.")
        for name, value in (("eot_id", self.eot_id), ("pad_t_id", self.pad_t_id)):
            if not 0 <= value < self.text_vocab_size:
                raise ValueError(f"{name}={value} is not a text id (text vocabulary has {self.text_vocab_size}).")
        missing = [t for t in AUDIO_SPECIAL_TOKENS if t not in self.audio_special_tokens]
        if missing:
            raise ValueError(f"audio_special_tokens must include {missing}.")
        if len(set(self.audio_special_tokens)) != len(self.audio_special_tokens):
            raise ValueError(f"audio_special_tokens repeats a token: {self.audio_special_tokens}.")

    # ---- vocabulary --------------------------------------------------------------------------
    @property
    def num_streams(self) -> int:
        return 1 + self.num_audio_streams

    @property
    def audio_block_size(self) -> int:
        return self.codebook_size + len(self.audio_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.num_audio_streams * self.audio_block_size

    def stream_range(self, stream: int) -> tuple[int, int]:
        """`[start, end)` of `stream`'s ids (0 = text, 1..N = audio streams)."""
        if stream == 0:
            return 0, self.text_vocab_size
        start = self.text_vocab_size + (stream - 1) * self.audio_block_size
        return start, start + self.audio_block_size

    def stream_offset(self, stream: int) -> int:
        """First global id of `stream`."""
        return self.stream_range(stream)[0]

    def audio_special_id(self, name: str, audio_stream: int) -> int:
        """Global id of special `name` in audio stream `audio_stream` (0-based among audio streams)."""
        return self.stream_offset(audio_stream + 1) + self.codebook_size + self.audio_special_tokens.index(name)

    def audio_special_ids(self, name: str) -> torch.Tensor:
        """`[N]` global ids of special `name`, one per audio stream."""
        return torch.tensor([self.audio_special_id(name, i) for i in range(self.num_audio_streams)])

    def pad_column(self) -> torch.Tensor:
        """`[1 + N]` ids of a step that carries nothing: PAD_T, then PAD_A in every audio stream."""
        return torch.tensor([self.pad_t_id, *self.audio_special_ids("<|pad_a|>").tolist()])

    @property
    def voices(self) -> list[str]:
        """Names of the voice (speaker) tokens `<|voice:NAME|>` among the audio specials."""
        return [t[len(VOICE_PREFIX) : -2] for t in self.audio_special_tokens if t.startswith(VOICE_PREFIX)]

    def voice_ids(self, voice: str) -> list[int]:
        """Global ids of `voice`'s token, one per audio stream; ValueError naming the known voices."""
        name = voice_token(voice)
        if name not in self.audio_special_tokens:
            raise ValueError(
                f"Unknown voice {voice!r}: this layout's voices are {self.voices or 'none'}. Build the processor with "
                "`DeepTalkProcessor.from_codec_layout(..., voices=[...])` and the model with "
                "`add_speech(processor.layout)`, or leave the voice out."
            )
        return [self.audio_special_id(name, i) for i in range(self.num_audio_streams)]

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- layout ------------------------------------------------------------------------------
    def build_delayed_layout(self, text_ids, codes, voice: str | None = None) -> torch.Tensor:
        """`[1 + N, T]` global ids of one assistant turn from text ids `[L]` and codes `[N, F]`.

        Codes are codebook indices in `[0, codebook_size)`; out-of-range codes raise ValueError.
        `voice` puts that voice's token at step 0 of every delayed audio stream (the authors' speaker
        token at the answer start): a condition the model reads, never a label.
        """
        voice_ids = self.voice_ids(voice) if voice is not None else None
        if voice_ids is not None and not any(self.delays):
            raise ValueError("A voice token sits before the audio starts: it needs stream delays > 0.")
        text_ids = torch.as_tensor(text_ids, dtype=torch.long).reshape(-1)
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 2 or codes.shape[0] != self.num_audio_streams:
            raise ValueError(
                f"codes must be [num_audio_streams={self.num_audio_streams}, frames], got {tuple(codes.shape)}."
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got min {int(codes.min())}, max {int(codes.max())}: "
                "they are not this codec's codes (wrong codec, or already offset into the vocabulary?)."
            )
        if text_ids.numel() and (text_ids.min() < 0 or text_ids.max() >= self.text_vocab_size):
            raise ValueError(f"text ids must lie in [0, {self.text_vocab_size}).")
        frames = codes.shape[1]
        length = max(text_ids.numel() + 1, max(self.delays, default=0) + frames + 1)
        layout = torch.empty(self.num_streams, length, dtype=torch.long)
        layout[0] = self.pad_t_id
        layout[0, : text_ids.numel()] = text_ids
        layout[0, text_ids.numel()] = self.eot_id
        for i, delay in enumerate(self.delays):
            layout[i + 1] = self.audio_special_id("<|pad_a|>", i)
            if voice_ids is not None and delay > 0:
                layout[i + 1, 0] = voice_ids[i]
            layout[i + 1, delay : delay + frames] = codes[i] + self.stream_offset(i + 1)
            layout[i + 1, delay + frames] = self.audio_special_id("<|eoa|>", i)
        return layout

    def undelay_layout(self, layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `build_delayed_layout`: `(text_ids [L], codes [N, F])`.

        Text ends at the first EOT; stream i's codes start at its delay and end at its EOA (or the
        end of the layout when generation stopped early). Streams are cut to the shortest one so
        the result is a rectangular code matrix.
        """
        layout = torch.as_tensor(layout, dtype=torch.long)
        if layout.dim() != 2 or layout.shape[0] != self.num_streams:
            raise ValueError(f"layout must be [{self.num_streams}, steps], got {tuple(layout.shape)}.")
        text = layout[0]
        eot = (text == self.eot_id).nonzero()
        text_ids = text[: int(eot[0]) if len(eot) else len(text)]
        text_ids = text_ids[text_ids != self.pad_t_id]
        streams = []
        for i, delay in enumerate(self.delays):
            row = layout[i + 1, delay:] - self.stream_offset(i + 1)
            end = ((row < 0) | (row >= self.codebook_size)).nonzero()
            streams.append(row[: int(end[0]) if len(end) else len(row)])
        frames = min((len(s) for s in streams), default=0)
        codes = torch.stack([s[:frames] for s in streams]) if streams else torch.empty(0, 0, dtype=torch.long)
        return text_ids, codes


def check_speech_experts(speech_experts) -> list[list[int]] | None:
    """The expert map as plain integer lists, or a ValueError naming the bad entry.

    Only integers are accepted: booleans, floats (even 2.0), strings, dicts and nulls are refused
    rather than coerced, because a coerced map silently routes to the wrong experts.
    """
    if speech_experts is None:
        return None
    if isinstance(speech_experts, (str, bytes, dict)) or not isinstance(speech_experts, (list, tuple)):
        raise ValueError(
            f"speech_experts must be a list with one list of expert indices per MoE layer, e.g. [[3, 17], [5, 9]]; "
            f"got {type(speech_experts).__name__}."
        )
    checked = []
    for i, layer in enumerate(speech_experts):
        if isinstance(layer, (str, bytes, dict)) or not isinstance(layer, (list, tuple)):
            raise ValueError(f"speech_experts[{i}] must be a list of expert indices, got {layer!r}.")
        for j, expert in enumerate(layer):
            if isinstance(expert, bool) or not isinstance(expert, int):
                raise ValueError(
                    f"speech_experts[{i}][{j}] = {expert!r} is not an expert index: use whole numbers such as 3 "
                    "(booleans, decimals, strings and nested lists are not accepted)."
                )
        checked.append([int(e) for e in layer])
    return checked


class DeepTalkConfig(PreTrainedConfig):
    r"""Configuration of a [`DeepTalkForCausalLM`]: a pre-trained MoE LLM whose routed experts are split
    into a text bank and a speech bank.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the source MoE decoder. Supported families: `deepseek_v2` (the paper's
            DeepSeek-V2-Lite), `qwen3_moe`, `qwen2_moe`, `olmoe`, `mixtral`. Defaults to a
            `DeepseekV2Config()`. Its `vocab_size` is the whole (extended) vocabulary.
        speech_experts (`list[list[int]]`, *optional*):
            One list per MoE layer, in layer order, of the *source* indices of the routed experts that
            serve speech. `None` = not assigned yet (all routed experts are text experts).
        num_speech_experts (`int`, *optional*):
            Speech experts per MoE layer. Taken from `speech_experts` when given, else 6 (the paper).
        routing_mode (`str`, *optional*, defaults to `"free"`):
            One of `free`, `speech_only`, `text_only`, `by_token_modality` (see `RoutingMode`).
        speech_layout (`dict`, *optional*):
            The multi-stream layout (`SpeechTokenLayout` fields: `text_vocab_size`, `num_audio_streams`,
            `codebook_size`, `delays`, `audio_special_tokens`, `eot_id`, `pad_t_id`). `None` = a text-only
            model. Set by `DeepTalkForCausalLM.add_speech(processor.layout)`.
        audio_config (`dict` or `WhisperConfig`, *optional*):
            Config of the Whisper audio encoder (paper: whisper-medium). `None` = no speech input.
        audio_adapter_stride (`int`, *optional*, defaults to 4):
            Whisper frames (50 Hz) stacked into one LLM position by the adapter. The authors' code
            feeds every 50 Hz frame (stride 1); the paper text says the adapter downsamples. 4 gives
            12.5 positions per second, about the codec's frame rate.
        audio_pad_to_30s (`bool`, *optional*, defaults to `False`):
            Pad every clip to Whisper's 30 s window as Whisper was trained; `False` encodes only the
            real length (much cheaper on short questions).
        audio_adapter (`str`, *optional*, defaults to `"stack"`):
            What a clip's LLM positions carry. `"stack"`: every position the adapter's projection of its
            stacked frames (the paper's MLP adapter). `"ctc"`: the adapter also has a CTC head over the text
            vocabulary (plus a blank); a position where greedy CTC emits a token carries that token's text
            embedding, as if it had been typed (gradient straight-through the head's posterior), and the
            emitted positions move to the end of the clip's span, the ones before keeping the placeholder
            (CTC compression). A frozen LLM reads the question as text; the span keeps the processor's fixed
            length, so prompts are unchanged.
        audio_ctc_hide_placeholders (`bool`, *optional*, defaults to `True`):
            With `audio_adapter="ctc"`, the span's positions no emitted token landed on are left out of
            attention and of the position count, so the LLM reads the heard words as it reads a typed
            prompt. The hidden positions are kept on the KV cache object, so later steps skip them too;
            callers embedding prompts themselves use `model.model.embed_prompt` for the matching mask.
        audio_ctc_hide_span_markers (`bool`, *optional*, defaults to `True`):
            With `audio_adapter="ctc"` and hidden placeholders, hide the clip's `<|boa|>` / `<|eoa|>` marker
            positions too, so a heard question reaches the LLM exactly as the same words typed would (markers
            the original LLM never saw otherwise change its answer to a correctly heard question). The markers
            are read from the first audio stream, so this needs multi-stream `input_ids` (as the processor builds).
        audio_adapter_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the adapter's stacked frames while training (a few hours of speech are memorised
            quickly: the CTC head learns the training clips, not the words).
        audio_ctc_loss_weight (`float`, *optional*, defaults to 1.0):
            With `audio_adapter="ctc"`, weight of the CTC loss on the clips' transcripts
            (`audio_transcript_ids`) added to the language-modelling loss.
        stream_embedding_mean (`str`, *optional*, defaults to `"non_pad"`):
            `"all"`: a position embeds as the mean of all 1 + N stream embeddings (the authors' code).
            `"non_pad"`: audio streams holding PAD_A are left out, so a text-only position embeds exactly
            as in the source LLM.
        num_added_experts (`int`, *optional*, defaults to 0):
            Routed experts added per MoE layer (the MoExtend baseline); they take source indices after
            the source's own experts and form the speech bank.
        output_router_logits (`bool`, *optional*), router_aux_loss_coef (`float`, *optional*):
            Return router logits and the load-balancing `aux_loss`, and its weight in the loss. Stored on
            `text_config`, where TRL's trainers read and write them.
    """

    model_type = "deeptalk"
    sub_configs = {"text_config": AutoConfig, "audio_config": AutoConfig}

    def __init__(
        self,
        text_config: dict | PreTrainedConfig | None = None,
        speech_experts: list[list[int]] | None = None,
        num_speech_experts: int | None = None,
        routing_mode: str = "free",
        speech_layout: dict | SpeechTokenLayout | None = None,
        audio_config: dict | PreTrainedConfig | None = None,
        audio_adapter_stride: int = 4,
        audio_pad_to_30s: bool = False,
        audio_adapter: str = "stack",
        audio_ctc_hide_placeholders: bool = True,
        audio_ctc_hide_span_markers: bool = True,
        audio_adapter_dropout: float = 0.0,
        audio_ctc_loss_weight: float = 1.0,
        stream_embedding_mean: str = "non_pad",
        num_added_experts: int = 0,
        output_router_logits: bool | None = None,
        router_aux_loss_coef: float | None = None,
        deeptalk_format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        if deeptalk_format_version != FORMAT_VERSION or "num_audio_streams" in kwargs:
            raise ValueError(
                f"This DeepTalk config is in format {1 if 'num_audio_streams' in kwargs else deeptalk_format_version}, "
                f"this release reads format {FORMAT_VERSION}. Convert the folder once with "
                "`deeptalk upgrade OLD_DIR NEW_DIR` (pip install deeptalk)."
            )
        if text_config is None:
            text_config = CONFIG_MAPPING["deepseek_v2"]()
        elif isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", None)
            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"text_config has model_type={model_type!r}, which transformers does not know. "
                    f"Pass the config of a MoE LLM of one of: {sorted(SUPPORTED_FAMILIES)}."
                )
            text_config = CONFIG_MAPPING[model_type](**text_config)
        self.text_config = text_config

        # Router-loss switches live on the text config: TRL's trainers read and write them there
        # (`model.config.get_text_config()`), so one copy keeps trainer and model in agreement.
        if output_router_logits is not None or not hasattr(text_config, "output_router_logits"):
            text_config.output_router_logits = bool(output_router_logits)
        if router_aux_loss_coef is not None or getattr(text_config, "router_aux_loss_coef", None) is None:
            text_config.router_aux_loss_coef = (
                DEFAULT_ROUTER_AUX_LOSS_COEF if router_aux_loss_coef is None else float(router_aux_loss_coef)
            )

        self.speech_experts = check_speech_experts(speech_experts)
        if num_speech_experts is None:
            num_speech_experts = len(self.speech_experts[0]) if self.speech_experts else DEFAULT_NUM_SPEECH_EXPERTS
        if isinstance(num_speech_experts, bool) or not isinstance(num_speech_experts, int):
            raise ValueError(f"num_speech_experts must be a whole number, got {num_speech_experts!r}.")
        self.num_speech_experts = num_speech_experts
        self.routing_mode = RoutingMode.parse(routing_mode).value
        if isinstance(speech_layout, SpeechTokenLayout):
            speech_layout = speech_layout.to_dict()
        self.speech_layout = None if speech_layout is None else SpeechTokenLayout(**speech_layout).to_dict()
        if isinstance(audio_config, dict):
            audio_config = CONFIG_MAPPING[audio_config.get("model_type", "whisper")](
                **{k: v for k, v in audio_config.items() if k != "model_type"}
            )
        self.audio_config = audio_config
        self.audio_adapter_stride = int(audio_adapter_stride)
        self.audio_pad_to_30s = bool(audio_pad_to_30s)
        self.audio_adapter = audio_adapter
        self.audio_ctc_hide_placeholders = bool(audio_ctc_hide_placeholders)
        self.audio_ctc_hide_span_markers = bool(audio_ctc_hide_span_markers)
        self.audio_adapter_dropout = float(audio_adapter_dropout)
        self.audio_ctc_loss_weight = float(audio_ctc_loss_weight)
        self.stream_embedding_mean = stream_embedding_mean
        self.num_added_experts = int(num_added_experts)
        self.deeptalk_format_version = FORMAT_VERSION

        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_deeptalk()

    # ---- router-loss switches (proxied to text_config, see __init__) -------------------------
    @property
    def output_router_logits(self) -> bool:
        return bool(getattr(self.text_config, "output_router_logits", False))

    @output_router_logits.setter
    def output_router_logits(self, value: bool):
        self.text_config.output_router_logits = bool(value)

    @property
    def router_aux_loss_coef(self) -> float:
        return float(getattr(self.text_config, "router_aux_loss_coef", DEFAULT_ROUTER_AUX_LOSS_COEF))

    @router_aux_loss_coef.setter
    def router_aux_loss_coef(self, value: float):
        self.text_config.router_aux_loss_coef = float(value)

    # A causal LM's config answers `vocab_size` (tools and transformers' tests read it at the top level);
    # it is the whole extended vocabulary, held by the text config like the router-loss switches.
    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int):
        self.text_config.vocab_size = value

    # `model.config.use_cache = False` (Trainer with gradient checkpointing, generation tests) must reach the
    # decoder, which reads it from the text config.
    @property
    def use_cache(self) -> bool:
        return bool(getattr(self.text_config, "use_cache", True))

    @use_cache.setter
    def use_cache(self, value: bool):
        self.text_config.use_cache = bool(value)

    # ---- the source family -------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.text_config.model_type

    @property
    def num_source_experts(self) -> int:
        """Routed experts per MoE layer in the source model."""
        return SUPPORTED_FAMILIES[self.family]["num_experts"](self.text_config)

    @property
    def num_routed_experts(self) -> int:
        """Routed experts per MoE layer (text + speech): the source's plus any added ones."""
        return self.num_source_experts + self.num_added_experts

    @property
    def moe_layer_indices(self) -> list[int]:
        """Decoder-layer indices of the MoE layers; `speech_experts[i]` belongs to `moe_layer_indices[i]`."""
        return SUPPORTED_FAMILIES[self.family]["moe_layers"](self.text_config)

    @property
    def decoder_layer_types(self) -> list[str]:
        """Attention mask kind of every decoder layer (`full_attention` / `sliding_attention`)."""
        return SUPPORTED_FAMILIES[self.family]["layer_types"](self.text_config)

    def expert_modality(self, moe_layer: int) -> list[int]:
        """Modality of each routed expert of one MoE layer, in source order (0 = text, 1 = speech)."""
        modality = [TEXT_MODALITY] * self.num_routed_experts
        if self.speech_experts is not None:
            for expert in self.speech_experts[moe_layer]:
                modality[expert] = SPEECH_MODALITY
        return modality

    # ---- the multi-stream vocabulary (read from the one layout) ------------------------------
    @property
    def layout(self) -> SpeechTokenLayout | None:
        """The speech token layout as an object (`None` for a text-only model)."""
        return None if self.speech_layout is None else SpeechTokenLayout(**self.speech_layout)

    @property
    def num_audio_streams(self) -> int:
        return 0 if self.speech_layout is None else self.speech_layout["num_audio_streams"]

    @property
    def num_streams(self) -> int:
        """Token streams per decoder step: 1 text stream + `num_audio_streams`."""
        return 1 + self.num_audio_streams

    @property
    def text_vocab_size(self) -> int:
        """Size of the text block of the vocabulary (the whole vocabulary for a text-only model)."""
        return self.text_config.vocab_size if self.speech_layout is None else self.speech_layout["text_vocab_size"]

    def stream_range(self, stream: int) -> tuple[int, int]:
        """`[start, end)` of `stream`'s ids in the extended vocabulary (0 = text, 1..N = audio)."""
        if self.speech_layout is None:
            if stream != 0:
                raise ValueError("This model has no audio streams (add_speech first).")
            return 0, self.text_vocab_size
        return self.layout.stream_range(stream)

    def num_audio_positions(self, num_mel_frames: int) -> int:
        """LLM positions the adapter produces for `num_mel_frames` 100 Hz log-mel frames."""
        return num_audio_positions(num_mel_frames, self.audio_adapter_stride, self.audio_pad_to_30s)

    # ---- validation --------------------------------------------------------------------------
    def validate_deeptalk(self):
        """Reject inconsistent settings with a message naming the problem and the fix."""
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"DeepTalk cannot wrap a {self.family!r} model: supported MoE families are "
                f"{sorted(SUPPORTED_FAMILIES)}."
            )
        num_experts, moe_layers = self.num_routed_experts, self.moe_layer_indices
        if self.num_added_experts < 0:
            raise ValueError(f"num_added_experts={self.num_added_experts} must be >= 0.")
        if self.stream_embedding_mean not in ("all", "non_pad"):
            raise ValueError(f"stream_embedding_mean={self.stream_embedding_mean!r}: choose 'all' or 'non_pad'.")
        if self.audio_adapter_stride < 1:
            raise ValueError(f"audio_adapter_stride={self.audio_adapter_stride} must be >= 1.")
        if not 0.0 <= self.audio_adapter_dropout < 1.0:
            raise ValueError(f"audio_adapter_dropout={self.audio_adapter_dropout} must be in [0, 1).")
        if self.audio_adapter not in AUDIO_ADAPTERS:
            raise ValueError(f"audio_adapter={self.audio_adapter!r}: choose one of {AUDIO_ADAPTERS}.")
        if self.speech_layout is not None:
            layout = self.layout
            if layout.vocab_size != self.text_config.vocab_size:
                raise ValueError(
                    f"The speech layout spans {layout.vocab_size} ids but text_config.vocab_size is "
                    f"{self.text_config.vocab_size}: build the model with add_speech(layout)."
                )
        if not 1 <= self.num_speech_experts < num_experts:
            raise ValueError(
                f"num_speech_experts={self.num_speech_experts} must be between 1 and {num_experts - 1} "
                f"(the source has {num_experts} routed experts per layer and both modalities need one)."
            )
        if self.speech_experts is None:
            if RoutingMode(self.routing_mode).needs_speech_experts:
                raise ValueError(
                    f"routing_mode={self.routing_mode!r} needs speech experts, but none are assigned. "
                    "Pass speech_experts=[[...], ...] (one list per MoE layer) or run the assignment step "
                    "(`deeptalk assign`) first."
                )
            return
        if len(self.speech_experts) != len(moe_layers):
            raise ValueError(
                f"speech_experts has {len(self.speech_experts)} lists but the {self.family} source has "
                f"{len(moe_layers)} MoE layers (decoder layers {moe_layers}): give one list per MoE layer, "
                "in layer order."
            )
        for i, layer in enumerate(self.speech_experts):
            where = f"speech_experts[{i}] (decoder layer {moe_layers[i]})"
            if len(layer) != self.num_speech_experts:
                raise ValueError(
                    f"{where} lists {len(layer)} experts but num_speech_experts={self.num_speech_experts}: "
                    "every MoE layer needs the same number of speech experts."
                )
            if len(set(layer)) != len(layer):
                raise ValueError(f"{where} repeats an expert: {layer}. Each expert can be listed once.")
            bad = [e for e in layer if not 0 <= e < num_experts]
            if bad:
                raise ValueError(f"{where} names experts {bad} outside the source's range 0..{num_experts - 1}.")


__all__ = ["DeepTalkConfig", "RoutingMode", "ROUTING_MODES", "SUPPORTED_FAMILIES", "SpeechTokenLayout"]
