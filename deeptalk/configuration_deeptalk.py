# Copyright 2026 The deeptalk authors. Apache-2.0.
"""DeepTalk configuration.

This file is copied next to the weights by the Hub export (``trust_remote_code``), so it imports
only ``transformers`` (and the standard library).

A DeepTalk config wraps the config of a pre-trained Mixture-of-Experts text LLM (``text_config``)
and adds what DeepTalk needs on top of it:

* ``speech_experts``: the **expert→modality map**. One list per MoE layer (in layer order) of the
  routed experts, by their index *in the source model*, that serve speech. Every other routed
  expert serves text. This is the format of the authors' ``audio_experts_file``
  (arXiv 2506.21864, DeepTalk/DeepOmni). ``None`` means "not assigned yet": every routed expert
  is a text expert until the assignment step picks the speech ones.
* ``routing_mode``: which experts a token may be routed to (see ``ROUTING_MODES``).
* the speech vocabulary layout (codec streams, codebook size, special tokens), filled by the
  speech processor.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Which experts a token may be routed to. The rule itself lives in ``modeling_deeptalk.route_tokens``.
ROUTING_MODES = {
    "free": "top-k over all routed experts (the paper's phase 1, phase 3 and inference)",
    "speech_only": "only speech experts can be chosen (the paper's phase 2a: train the speech bank)",
    "text_only": "only text experts can be chosen (the paper's phase 2b: train the text bank)",
    "by_token_modality": "each token chooses among its own modality's experts (the MoST/MAMoE variant; opt-in)",
}

# Token modality codes used by ``token_modality`` tensors and the per-modality expert load.
TEXT_MODALITY, SPEECH_MODALITY, IGNORED_TOKEN = 0, 1, -1
MODALITY_NAMES = ("text", "speech")


def _qwen_moe_layers(cfg) -> list[int]:
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return [
        i
        for i in range(cfg.num_hidden_layers)
        if i not in mlp_only and cfg.num_experts > 0 and (i + 1) % step == 0
    ]


# Per supported source family: how many routed experts it has and which decoder layers are MoE
# (mirroring each family's decoder-layer constructor in transformers).
SUPPORTED_FAMILIES = {
    "deepseek_v2": {
        "num_experts": lambda cfg: cfg.num_experts,
        "moe_layers": lambda cfg: list(range(cfg.first_k_dense_replace or 0, cfg.num_hidden_layers)),
    },
    "qwen3_moe": {"num_experts": lambda cfg: cfg.num_experts, "moe_layers": _qwen_moe_layers},
    "qwen2_moe": {"num_experts": lambda cfg: cfg.num_experts, "moe_layers": _qwen_moe_layers},
    "olmoe": {"num_experts": lambda cfg: cfg.num_experts, "moe_layers": lambda cfg: list(range(cfg.num_hidden_layers))},
    "mixtral": {
        "num_experts": lambda cfg: cfg.num_local_experts,
        "moe_layers": lambda cfg: list(range(cfg.num_hidden_layers)),
    },
}

AUDIO_SPECIAL_TOKENS = ("<|eoa|>", "<|pad_a|>", "<|boa|>", "<|audio_in|>")
"""Specials of every audio stream, at ids `codebook_size + j` of the stream's block: EOA ends a stream,
PAD_A fills a stream before it starts and after it ends, BOA opens a user audio segment, AUDIO_IN
marks the positions where the audio encoder's features are spliced in."""

DEFAULT_NUM_SPEECH_EXPERTS = 6  # the paper: 6 of DeepSeek-V2-Lite's 64 routed experts per layer
DEFAULT_ROUTER_AUX_LOSS_COEF = 0.001  # transformers' Mixtral/Qwen-MoE default; the family's own value wins


def stream_range(text_vocab_size: int, audio_block_size: int, stream: int) -> tuple[int, int]:
    """`[start, end)` of a stream's ids: the text block first, then one block per audio stream."""
    if stream == 0:
        return 0, text_vocab_size
    start = text_vocab_size + (stream - 1) * audio_block_size
    return start, start + audio_block_size


WHISPER_MEL_FRAMES = 3000  # Whisper's 30 s window of 100 Hz log-mel frames


def num_audio_positions(num_mel_frames: int, adapter_stride: int, pad_to_30s: bool = False) -> int:
    """Whisper's conv stem halves the 100 Hz mel frames (kernel 3, stride 2, padding 1), then the
    adapter stacks `adapter_stride` encoder frames per LLM position (the last group zero-padded)."""
    if pad_to_30s:
        num_mel_frames = WHISPER_MEL_FRAMES
    encoder_frames = (num_mel_frames - 1) // 2 + 1
    return -(-encoder_frames // adapter_stride)


class DeepTalkConfig(PreTrainedConfig):
    r"""Configuration of a [`DeepTalkForCausalLM`]: a pre-trained MoE LLM whose routed experts are split
    into a text bank and a speech bank.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the source MoE decoder. Supported families: `deepseek_v2` (the paper's
            DeepSeek-V2-Lite), `qwen3_moe`, `qwen2_moe`, `olmoe`, `mixtral`. Defaults to a
            `DeepseekV2Config()`.
        speech_experts (`list[list[int]]`, *optional*):
            One list per MoE layer, in layer order, of the *source* indices of the routed experts that
            serve speech. `None` = not assigned yet (all routed experts are text experts).
        num_speech_experts (`int`, *optional*):
            Speech experts per MoE layer. Taken from `speech_experts` when given, else 6 (the paper).
            Used by the assignment step; must match the map's list lengths.
        routing_mode (`str`, *optional*, defaults to `"free"`):
            One of `free`, `speech_only`, `text_only`, `by_token_modality` (see `ROUTING_MODES`).
            In `speech_only` mode with fewer speech experts than the family's top-k, every speech
            expert is chosen for every token (the paper: 6 speech experts meet top-6).
        num_audio_streams (`int`, *optional*, defaults to 0):
            Audio codec streams per decoder step (paper: 7 SNAC streams). 0 = text-only model.
        audio_codebook_size (`int`, *optional*, defaults to 0):
            Entries per audio codebook (paper: 4096).
        audio_stream_delays (`list[int]`, *optional*):
            Delay in decoder steps of each audio stream (paper: stream i is delayed by i + 1).
        audio_special_tokens (`list[str]`, *optional*):
            Names of the special tokens of every audio stream (BOA, EOA, PAD_A, ...).
        text_vocab_size (`int`, *optional*):
            Size of the text stream's block of the (extended) vocabulary; audio blocks follow it.
            Defaults to `text_config.vocab_size`.
        audio_config (`dict` or `WhisperConfig`, *optional*):
            Config of the Whisper audio encoder (paper: whisper-medium). `None` = no speech input.
        audio_adapter_stride (`int`, *optional*, defaults to 4):
            Whisper frames (50 Hz) stacked into one LLM position by the adapter. The authors' code
            feeds every 50 Hz frame (stride 1); the paper text says the adapter downsamples. 4 gives
            12.5 positions per second -- about the codec's frame rate -- and a quarter of the prefill
            cost; set 1 for the authors' layout.
        audio_pad_to_30s (`bool`, *optional*, defaults to `False`):
            Pad every clip to Whisper's 30 s window as Whisper was trained. `False` encodes only the
            real length (much faster on short questions).
        stream_embedding_mean (`str`, *optional*, defaults to `"non_pad"`):
            How a position's stream embeddings are averaged. `"all"`: the mean of all 1 + N streams,
            as in the authors' code. `"non_pad"`: audio streams holding PAD_A are left out, so a
            text-only position embeds exactly as in the source LLM -- the point of DeepTalk is to keep
            the text model intact, and this keeps text inputs identical whether given as plain ids or
            in the multi-stream layout.
        num_added_experts (`int`, *optional*, defaults to 0):
            Routed experts added on top of the source's per MoE layer (the MoExtend baseline the paper
            compares against; `DeepTalkForCausalLM.add_new_speech_experts`). They take source indices
            after the source's own experts and form the speech bank.
        output_router_logits (`bool`, *optional*):
            Return router logits and the load-balancing `aux_loss`. Stored on `text_config`, where
            TRL's trainers read and write it.
        router_aux_loss_coef (`float`, *optional*):
            Weight of `aux_loss` in the training loss. Stored on `text_config` (TRL reads it there);
            defaults to the family's value, else 0.001.
    """

    model_type = "deeptalk"
    sub_configs = {"text_config": AutoConfig, "audio_config": AutoConfig}

    def __init__(
        self,
        text_config: dict | PreTrainedConfig | None = None,
        speech_experts: list[list[int]] | None = None,
        num_speech_experts: int | None = None,
        routing_mode: str = "free",
        num_audio_streams: int = 0,
        audio_codebook_size: int = 0,
        audio_stream_delays: list[int] | None = None,
        audio_special_tokens: list[str] | None = None,
        text_vocab_size: int | None = None,
        audio_config: dict | PreTrainedConfig | None = None,
        audio_adapter_stride: int = 4,
        audio_pad_to_30s: bool = False,
        stream_embedding_mean: str = "non_pad",
        num_added_experts: int = 0,
        output_router_logits: bool | None = None,
        router_aux_loss_coef: float | None = None,
        **kwargs,
    ):
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

        self.speech_experts = None if speech_experts is None else [[int(e) for e in layer] for layer in speech_experts]
        if num_speech_experts is None:
            num_speech_experts = len(self.speech_experts[0]) if self.speech_experts else DEFAULT_NUM_SPEECH_EXPERTS
        self.num_speech_experts = int(num_speech_experts)
        self.routing_mode = routing_mode

        self.num_audio_streams = int(num_audio_streams)
        self.audio_codebook_size = int(audio_codebook_size)
        self.audio_stream_delays = (
            list(audio_stream_delays) if audio_stream_delays is not None else [i + 1 for i in range(num_audio_streams)]
        )
        self.audio_special_tokens = (
            list(audio_special_tokens) if audio_special_tokens is not None else list(AUDIO_SPECIAL_TOKENS)
        )
        # Size of the text stream's block of the vocabulary; audio blocks follow it.
        self.text_vocab_size = int(text_vocab_size) if text_vocab_size is not None else text_config.vocab_size
        if isinstance(audio_config, dict):
            audio_config = CONFIG_MAPPING[audio_config.get("model_type", "whisper")](
                **{k: v for k, v in audio_config.items() if k != "model_type"}
            )
        self.audio_config = audio_config
        self.audio_adapter_stride = int(audio_adapter_stride)
        self.audio_pad_to_30s = bool(audio_pad_to_30s)
        self.stream_embedding_mean = stream_embedding_mean
        self.num_added_experts = int(num_added_experts)

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

    def expert_modality(self, moe_layer: int) -> list[int]:
        """Modality of each routed expert of one MoE layer, in source order (0 = text, 1 = speech)."""
        modality = [TEXT_MODALITY] * self.num_routed_experts
        if self.speech_experts is not None:
            for expert in self.speech_experts[moe_layer]:
                modality[expert] = SPEECH_MODALITY
        return modality

    # ---- the multi-stream vocabulary -------------------------------------------------------
    @property
    def num_streams(self) -> int:
        """Token streams per decoder step: 1 text stream + `num_audio_streams`."""
        return 1 + self.num_audio_streams

    @property
    def audio_block_size(self) -> int:
        return self.audio_codebook_size + len(self.audio_special_tokens)

    def stream_range(self, stream: int) -> tuple[int, int]:
        """`[start, end)` of `stream`'s ids in the extended vocabulary (0 = text, 1..N = audio)."""
        return stream_range(self.text_vocab_size, self.audio_block_size, stream)

    def audio_special_id(self, name: str, audio_stream: int) -> int:
        """Global id of audio special `name` (e.g. "<|pad_a|>") in audio stream `audio_stream` (0-based)."""
        start, _ = self.stream_range(audio_stream + 1)
        return start + self.audio_codebook_size + self.audio_special_tokens.index(name)

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
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(
                f"Unknown routing_mode {self.routing_mode!r}. Choose one of: "
                + "; ".join(f"{k!r} ({v})" for k, v in ROUTING_MODES.items())
            )
        num_experts, moe_layers = self.num_routed_experts, self.moe_layer_indices
        if self.num_added_experts < 0:
            raise ValueError(f"num_added_experts={self.num_added_experts} must be >= 0.")
        if self.stream_embedding_mean not in ("all", "non_pad"):
            raise ValueError(f"stream_embedding_mean={self.stream_embedding_mean!r}: choose 'all' or 'non_pad'.")
        if self.audio_adapter_stride < 1:
            raise ValueError(f"audio_adapter_stride={self.audio_adapter_stride} must be >= 1.")
        if self.num_audio_streams and self.audio_codebook_size < 1:
            raise ValueError("num_audio_streams > 0 needs audio_codebook_size > 0 (the codec's codebook size).")
        if self.num_audio_streams < 0 or len(self.audio_stream_delays) != self.num_audio_streams:
            raise ValueError(
                f"audio_stream_delays has {len(self.audio_stream_delays)} entries for num_audio_streams="
                f"{self.num_audio_streams}: give one delay per audio stream."
            )
        if not 1 <= self.num_speech_experts < num_experts:
            raise ValueError(
                f"num_speech_experts={self.num_speech_experts} must be between 1 and {num_experts - 1} "
                f"(the source has {num_experts} routed experts per layer and both modalities need one)."
            )
        if self.speech_experts is None:
            if self.routing_mode in ("speech_only", "by_token_modality"):
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
                raise ValueError(
                    f"{where} names experts {bad} outside the source's range 0..{num_experts - 1}."
                )


__all__ = ["DeepTalkConfig", "ROUTING_MODES", "SUPPORTED_FAMILIES"]
