"""Adaptive modality expert assignment: which routed experts of each MoE layer become speech experts.

The paper (arXiv 2506.21864, §2 "Modality load", Algorithm 1) runs unimodal audio and text data
through the phase-1 model with free routing, measures per MoE layer l and routed expert j the
audio load ρA_{l,j} and the text load ρT_{l,j}, and makes the k experts with the highest

    score_{l,j} = ρA_{l,j} · (1 − ρT_{l,j})

the speech experts of layer l (k = 6 of DeepSeek-V2-Lite's 64 by default; fixed k, no threshold;
every layer independently). The other experts stay text experts.

Steps, each a function of this module:

1. ``measure_modality_load``   -- run the model (eval, ``no_grad``, ``routing_mode="free"``) over
                                  text batches and speech batches; sum the model's ``expert_load``.
2. ``select_speech_experts``   -- the paper's top-k of ρA·(1−ρT) per layer.
   ``random_speech_experts``   -- the seeded random baseline of the paper's ablation.
3. ``assign_speech_experts``   -- move the chosen experts into the speech bank
                                  (``model.set_speech_experts``; free-mode outputs do not change).
4. ``save_load_report``        -- ``modality_load.json`` (counts, ρ, the map) and a heatmap PNG.

**What is counted.** ρA comes from the *speech tokens of the speech data* and ρT from the *text
tokens of the text data*: from a speech batch only the speech-modality slots (``expert_load[:, 1]``)
are added, from a text batch only the text-modality slots (``expert_load[:, 0]``). So the text
prompt or chat template around a spoken question does not leak into ρA, and a stray speech
position in a text batch does not leak into ρT. A token's modality is the model's: speech where an
audio stream of multi-stream ids carries a codec code or where ``audio_input_mask`` splices in audio
features, text elsewhere, padding (``attention_mask == 0``) excluded -- or an explicit
``token_modality`` tensor in the batch (0 text, 1 speech, -1 ignored).

**Normalisation.** The paper's Eq. 2 uses the router's top-k indicator without printing the
denominator. Two readings are offered (``ModalityLoad.load(modality, normalization)``):

* ``"token"`` (default): ρ_{l,j} = count_{l,j} / number of tokens of that modality, i.e. the
  fraction of the modality's tokens whose top-k set contains expert j. ρ ∈ [0, 1]; a layer's row
  sums to top_k.
* ``"slot"``: ρ_{l,j} = count_{l,j} / number of that modality's token slots (tokens × top_k), i.e.
  the share of the modality's routing decisions that went to expert j. A layer's row sums to 1.

The default is ``"token"`` because the score is *not* invariant to rescaling ρT: a positive
per-layer factor on ρA leaves each layer's ranking unchanged, but ``1 − c·ρT`` weighs text load
differently for every c. Only with the per-token reading is ρT a probability in [0, 1], so that
``1 − ρT`` is "the fraction of text tokens that do NOT use expert j" -- the natural meaning of
Eq. 2, and the one under which an expert used by every text token scores 0. With the per-slot
reading ρT ≤ 1/top_k (a token gives an expert at most one of its top_k slots), so ``1 − ρT`` is
close to 1 for every expert and the rule degenerates into "top-k by speech load", nearly ignoring
text load: with top-6 routing, an expert chosen by half of all text tokens has ρT = 0.083 and keeps
92 % of its score, against 50 % under the per-token reading.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.utils import logging

from ..configuration_deeptalk import SPEECH_MODALITY, TEXT_MODALITY

logger = logging.get_logger(__name__)

NORMALIZATIONS = ("token", "slot")
DEFAULT_NORMALIZATION = "token"
STRATEGIES = ("adaptive", "random", "moextend")
REPORT_JSON = "modality_load.json"
REPORT_PNG = "modality_load.png"

# Batch entries that are never model inputs when measuring (labels would only add a loss).
_DROPPED_KEYS = {"labels", "num_items_in_batch", "output_expert_load", "output_router_logits", "routing_mode"}


# --------------------------------------------------------------------------------------------------
# The measured load
# --------------------------------------------------------------------------------------------------
@dataclass
class ModalityLoad:
    """Per-layer expert selections by modality, summed over a measuring run.

    Attributes:
        text_counts: `[num_moe_layers, num_experts]` int64, how many text-token slots of the text
            data chose each expert (source expert order).
        speech_counts: the same for the speech-token slots of the speech data.
        text_tokens: text tokens measured (every token passes every MoE layer once).
        speech_tokens: speech tokens measured.
        top_k: the router's top-k at measuring time (every token fills top_k slots in free mode).
        moe_layer_indices: decoder-layer index of each row (for reports).
        normalization: what `text_load` / `speech_load` return, `"token"` (default) or `"slot"`;
            see the module docstring.
        text_batches, speech_batches: batches measured (bookkeeping).
    """

    text_counts: torch.Tensor
    speech_counts: torch.Tensor
    text_tokens: int
    speech_tokens: int
    top_k: int
    moe_layer_indices: list[int] = field(default_factory=list)
    normalization: str = DEFAULT_NORMALIZATION
    text_batches: int = 0
    speech_batches: int = 0

    def __post_init__(self):
        self.text_counts = torch.as_tensor(self.text_counts).to(torch.int64).cpu()
        self.speech_counts = torch.as_tensor(self.speech_counts).to(torch.int64).cpu()
        if self.text_counts.dim() != 2 or self.text_counts.shape != self.speech_counts.shape:
            raise ValueError(
                f"text_counts {tuple(self.text_counts.shape)} and speech_counts {tuple(self.speech_counts.shape)} "
                "must both be [num_moe_layers, num_experts]."
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r}: choose one of {NORMALIZATIONS}.")
        self.text_tokens, self.speech_tokens = int(self.text_tokens), int(self.speech_tokens)
        self.top_k = int(self.top_k)
        if not self.moe_layer_indices:
            self.moe_layer_indices = list(range(self.num_layers))
        self.moe_layer_indices = [int(i) for i in self.moe_layer_indices]

    # ---- shape -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.text_counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.text_counts.shape[1]

    # ---- ρ -----------------------------------------------------------------------------------
    def load(self, modality: int | str, normalization: str | None = None) -> torch.Tensor:
        """ρ of one modality (`0`/`"text"` or `1`/`"speech"`), `[num_moe_layers, num_experts]` float64.

        `"token"`: count / tokens of that modality -- the fraction of its tokens that use expert j,
        in [0, 1], each row sums to top_k. `"slot"`: count / that modality's slots in the layer --
        each row sums to 1. Raises if the modality was not measured (no tokens).
        """
        modality = {"text": TEXT_MODALITY, "speech": SPEECH_MODALITY}.get(modality, modality)
        normalization = normalization or self.normalization
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r}: choose one of {NORMALIZATIONS}.")
        counts, tokens, name = (
            (self.text_counts, self.text_tokens, "text")
            if modality == TEXT_MODALITY
            else (self.speech_counts, self.speech_tokens, "speech")
        )
        if tokens == 0:
            raise ValueError(
                f"No {name} tokens were measured, so the {name} load is undefined. Give "
                f"measure_modality_load {name} batches whose tokens are {name} tokens (multi-stream ids with "
                "codec codes, audio_input_mask positions, or an explicit token_modality)."
            )
        counts = counts.double()
        if normalization == "token":
            return counts / tokens
        return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)

    @property
    def text_load(self) -> torch.Tensor:
        """ρT `[layers, experts]` in this load's `normalization` (default: fraction of text tokens)."""
        return self.load(TEXT_MODALITY)

    @property
    def speech_load(self) -> torch.Tensor:
        """ρA `[layers, experts]` in this load's `normalization` (default: fraction of speech tokens)."""
        return self.load(SPEECH_MODALITY)

    def score(self, normalization: str | None = None) -> torch.Tensor:
        """The paper's selection score ρA · (1 − ρT), `[layers, experts]` float64."""
        return self.load(SPEECH_MODALITY, normalization) * (1.0 - self.load(TEXT_MODALITY, normalization))

    # ---- combining and (de)serialising -------------------------------------------------------
    def __add__(self, other: ModalityLoad) -> ModalityLoad:
        """Sum two measurements of the same model (e.g. from several data shards or processes)."""
        if not isinstance(other, ModalityLoad):
            return NotImplemented
        if other.text_counts.shape != self.text_counts.shape or other.top_k != self.top_k:
            raise ValueError("Cannot add modality loads of different models (layers, experts or top_k differ).")
        return ModalityLoad(
            text_counts=self.text_counts + other.text_counts,
            speech_counts=self.speech_counts + other.speech_counts,
            text_tokens=self.text_tokens + other.text_tokens,
            speech_tokens=self.speech_tokens + other.speech_tokens,
            top_k=self.top_k,
            moe_layer_indices=self.moe_layer_indices,
            normalization=self.normalization,
            text_batches=self.text_batches + other.text_batches,
            speech_batches=self.speech_batches + other.speech_batches,
        )

    def to_dict(self) -> dict:
        return {
            "text_counts": self.text_counts.tolist(),
            "speech_counts": self.speech_counts.tolist(),
            "text_tokens": self.text_tokens,
            "speech_tokens": self.speech_tokens,
            "top_k": self.top_k,
            "moe_layer_indices": list(self.moe_layer_indices),
            "normalization": self.normalization,
            "text_batches": self.text_batches,
            "speech_batches": self.speech_batches,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ModalityLoad:
        """Inverse of `to_dict`; extra keys (e.g. those of a `modality_load.json` report) are ignored."""
        fields = ("text_counts", "speech_counts", "text_tokens", "speech_tokens", "top_k", "moe_layer_indices",
                  "normalization", "text_batches", "speech_batches")
        missing = [k for k in fields[:5] if k not in data]
        if missing:
            raise ValueError(f"Not a modality load: missing {missing}.")
        return cls(**{k: data[k] for k in fields if k in data})

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text of the load; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> ModalityLoad:
        """From JSON text, or from a file (a `to_json` file or a `modality_load.json` report)."""
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            text_or_path = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text_or_path))


# --------------------------------------------------------------------------------------------------
# 1. Measuring
# --------------------------------------------------------------------------------------------------
def _prepare_batch(batch, device) -> dict:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"A batch must be a dict of model inputs (e.g. from DeepTalkDataCollator) or an input_ids tensor, "
            f"got {type(batch).__name__}."
        )
    # keep tensors only: datasets often carry strings (messages, ids) next to the model inputs
    return {
        k: v.to(device) for k, v in batch.items() if k not in _DROPPED_KEYS and isinstance(v, torch.Tensor)
    }


def _batch_modality(model, inputs: dict) -> torch.Tensor:
    """Each position's modality `[B, T]` (0 text, 1 speech, -1 ignored), as the model derives it."""
    input_ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    modality = model.model.token_modality_from_inputs(
        input_ids, embeds, inputs.get("attention_mask"), inputs.get("token_modality"), inputs.get("audio_input_mask")
    )
    reference = input_ids if input_ids is not None else embeds[..., 0]
    return modality.view(reference.shape[0], -1)


@torch.no_grad()
def measure_modality_load(
    model,
    text_batches: Iterable | None,
    speech_batches: Iterable | None,
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> ModalityLoad:
    """Run `model` over text and speech batches with free routing and sum its per-expert load.

    Args:
        model: a `DeepTalkForCausalLM` (or a wrapper around one); put in eval mode for the run and restored.
        text_batches: iterable of batches (dicts of model kwargs, e.g. from `DeepTalkDataCollator`,
            or bare `input_ids` tensors) of *text* data. Only their text-token slots are counted (ρT).
        speech_batches: iterable of batches of *speech* data. Only their speech-token slots are
            counted (ρA). Speech positions are found as the model finds them (codec codes in an audio
            stream, `audio_input_mask` positions) unless a batch gives `token_modality`.
        max_batches: read at most this many batches from EACH iterable.
        progress: show a progress bar.

    `labels` and other non-tensor entries of a batch are dropped. An explicit `token_modality`
    (`[B, T]`, 0 text / 1 speech / -1 ignored) is honoured; padding from `attention_mask` is always
    excluded. Routing is forced to `free` (what the paper measures).
    """
    from .freezing import unwrap_deeptalk

    call, model = model, unwrap_deeptalk(model)
    config = model.config
    num_layers, num_experts = len(config.moe_layer_indices), config.num_routed_experts
    top_k = int(config.text_config.num_experts_per_tok)
    device = next(model.parameters()).device
    counts = torch.zeros(2, num_layers, num_experts, dtype=torch.int64)
    tokens = [0, 0]
    batches = [0, 0]

    was_training = model.training
    model.eval()
    try:
        for modality, iterable in ((TEXT_MODALITY, text_batches), (SPEECH_MODALITY, speech_batches)):
            if iterable is None:
                continue
            name = "text" if modality == TEXT_MODALITY else "speech"
            total = len(iterable) if hasattr(iterable, "__len__") else None
            if total is not None and max_batches is not None:
                total = min(total, max_batches)
            bar = logging.tqdm(total=total, desc=f"Measuring expert load ({name} data)", disable=not progress)
            try:
                for i, batch in enumerate(iterable):
                    if max_batches is not None and i >= max_batches:
                        break
                    inputs = _prepare_batch(batch, device)
                    inputs["token_modality"] = _batch_modality(model, inputs)
                    kwargs = dict(routing_mode="free", output_expert_load=True, output_router_logits=False,
                                  use_cache=False, logits_to_keep=1)  # the head's output is not needed
                    load = call(**inputs, **kwargs).expert_load  # [layers, 2, experts]
                    if tuple(load.shape) != (num_layers, 2, num_experts):
                        raise RuntimeError(f"expert_load has shape {tuple(load.shape)}, expected "
                                           f"{(num_layers, 2, num_experts)}.")
                    counts[modality] += load[:, modality].round().to(torch.int64).cpu()
                    tokens[modality] += int((inputs["token_modality"] == modality).sum())
                    batches[modality] += 1
                    bar.update(1)
            finally:
                bar.close()
    finally:
        model.train(was_training)

    for modality, name in ((TEXT_MODALITY, "text"), (SPEECH_MODALITY, "speech")):
        given = text_batches if modality == TEXT_MODALITY else speech_batches
        if given is not None and tokens[modality] == 0:
            warnings.warn(
                f"measure_modality_load saw no {name} tokens in the {name} batches ({batches[modality]} batches); "
                f"the {name} load is undefined. Check that the batches mark their {name} positions "
                "(codec codes / audio_input_mask for speech, or an explicit token_modality).",
                stacklevel=2,
            )
    return ModalityLoad(
        text_counts=counts[TEXT_MODALITY],
        speech_counts=counts[SPEECH_MODALITY],
        text_tokens=tokens[TEXT_MODALITY],
        speech_tokens=tokens[SPEECH_MODALITY],
        top_k=top_k,
        moe_layer_indices=list(config.moe_layer_indices),
        text_batches=batches[TEXT_MODALITY],
        speech_batches=batches[SPEECH_MODALITY],
    )


# --------------------------------------------------------------------------------------------------
# 2. Selecting
# --------------------------------------------------------------------------------------------------
def _check_k(num_speech_experts: int, num_experts: int) -> int:
    k = int(num_speech_experts)
    if not 1 <= k < num_experts:
        raise ValueError(
            f"num_speech_experts={num_speech_experts} must be between 1 and {num_experts - 1} "
            f"({num_experts} routed experts per layer; both modalities need one)."
        )
    return k


def select_speech_experts(
    load: ModalityLoad, num_speech_experts: int, normalization: str | None = None
) -> list[list[int]]:
    """The paper's Algorithm 1: per MoE layer, the `num_speech_experts` experts with the highest
    ρA · (1 − ρT); ties go to the lower expert index. Returns one sorted list per MoE layer (source
    expert indices), the format of `config.speech_experts`."""
    k = _check_k(num_speech_experts, load.num_experts)
    score = load.score(normalization)
    selection = []
    for row in score.tolist():
        ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))
        selection.append(sorted(ranked[:k]))
    return selection


def random_speech_experts(config, num_speech_experts: int | None = None, seed: int = 0) -> list[list[int]]:
    """The random modality-specific baseline: `num_speech_experts` experts per MoE layer drawn
    uniformly without replacement, independently per layer, reproducibly from `seed`.

    `config` is a `DeepTalkConfig` or a model carrying one; `num_speech_experts` defaults to
    `config.num_speech_experts`."""
    config = getattr(config, "config", config)
    num_experts = config.num_routed_experts
    k = _check_k(config.num_speech_experts if num_speech_experts is None else num_speech_experts, num_experts)
    generator = torch.Generator().manual_seed(int(seed))
    return [sorted(torch.randperm(num_experts, generator=generator)[:k].tolist()) for _ in config.moe_layer_indices]


def assign_speech_experts(
    model,
    load: ModalityLoad | None = None,
    num_speech_experts: int | None = None,
    strategy: str = "adaptive",
    seed: int = 0,
) -> list[list[int]]:
    """Choose the speech experts and move them into each MoE block's speech bank.

    `strategy="adaptive"` uses `select_speech_experts(load, ...)` (needs `load`); `"random"` uses
    `random_speech_experts(model.config, ..., seed)`; `"moextend"` adds that many NEW experts per
    layer as the speech bank (`model.add_new_speech_experts`, the paper's MoExtend baseline).
    `num_speech_experts` defaults to `model.config.num_speech_experts` (6, the paper's value, unless set). Calls
    `model.set_speech_experts`, which updates `config.speech_experts` / `num_speech_experts`, keeps
    every expert's weights and so leaves free-mode outputs unchanged; bank parameters are replaced,
    so build optimizers afterwards. Returns the map (one sorted list per MoE layer).
    """
    config = model.config
    if num_speech_experts is None:
        num_speech_experts = config.num_speech_experts
    if strategy == "adaptive":
        if load is None:
            raise ValueError("strategy='adaptive' needs a ModalityLoad (see measure_modality_load).")
        expected = (len(config.moe_layer_indices), config.num_routed_experts)
        if tuple(load.text_counts.shape) != expected:
            raise ValueError(
                f"The modality load is {tuple(load.text_counts.shape)} (layers, experts) but the model has "
                f"{expected}: it was measured on another model."
            )
        speech_experts = select_speech_experts(load, num_speech_experts)
    elif strategy == "random":
        speech_experts = random_speech_experts(config, num_speech_experts, seed)
    elif strategy == "moextend":  # the paper's MoExtend baseline: new experts, not re-purposed ones
        model.add_new_speech_experts(num_speech_experts, seed=seed)
        return model.config.speech_experts
    else:
        raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}.")
    model.set_speech_experts(speech_experts)
    logger.info(f"Assigned {num_speech_experts} speech experts per MoE layer ({strategy}).")
    return speech_experts


# --------------------------------------------------------------------------------------------------
# 3. Reporting
# --------------------------------------------------------------------------------------------------
def save_load_report(
    load: ModalityLoad,
    speech_experts: list[list[int]] | None,
    out_dir: str | os.PathLike,
    *,
    strategy: str | None = None,
    seed: int | None = None,
) -> dict:
    """Write `modality_load.json` and `modality_load.png` into `out_dir` (e.g. next to the model).

    The JSON holds the raw counts and token totals (so `ModalityLoad.from_json` reloads it), ρA, ρT
    and the score in both normalisations, and the chosen map. The PNG shows ρA, ρT and the score
    as heatmaps (rows = MoE layers, columns = experts) with the chosen speech experts boxed; it
    needs matplotlib and is skipped with a warning without it. Returns `{"json": path, "png": path
    or None}`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = load.to_dict()
    for normalization in NORMALIZATIONS:
        entry = {}
        for key, value in (
            ("text_load", lambda n: load.load(TEXT_MODALITY, n)),
            ("speech_load", lambda n: load.load(SPEECH_MODALITY, n)),
            ("score", load.score),
        ):
            try:
                entry[key] = [[round(x, 8) for x in row] for row in value(normalization).tolist()]
            except ValueError:  # a modality without tokens
                entry[key] = None
        report[normalization] = entry
    report["speech_experts"] = speech_experts
    report["strategy"] = strategy
    report["seed"] = seed
    json_path = out_dir / REPORT_JSON
    json_path.write_text(json.dumps(report, indent=1))

    png_path = out_dir / REPORT_PNG
    try:
        _plot(load, speech_experts, png_path)
    except ImportError:
        warnings.warn("matplotlib is not installed: modality_load.png was not written (pip install matplotlib).",
                      stacklevel=2)
        png_path = None
    return {"json": json_path, "png": png_path}


def _plot(load: ModalityLoad, speech_experts, path: Path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's state
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    panels = []
    for title, compute in (
        (f"ρA speech load ({load.normalization})", lambda: load.speech_load),
        (f"ρT text load ({load.normalization})", lambda: load.text_load),
        ("score ρA·(1−ρT)", lambda: load.score()),
    ):
        try:
            panels.append((title, compute().numpy()))
        except ValueError:
            panels.append((title + " — not measured", None))
    layers, experts = load.num_layers, load.num_experts
    width = min(40.0, max(3.0, 0.18 * experts + 1.5))
    height = min(30.0, max(2.5, 0.28 * layers + 1.5))
    fig = Figure(figsize=(3 * width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, squeeze=True)
    for ax, (title, values) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert (source index)")
        ax.set_ylabel("decoder layer")
        ax.set_yticks(range(layers), [str(i) for i in load.moe_layer_indices], fontsize=6)
        if values is None:
            ax.set_xlim(-0.5, experts - 0.5)
            ax.set_ylim(layers - 0.5, -0.5)
            continue
        image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=ax, fraction=0.05)
        for layer, chosen in enumerate(speech_experts or []):
            for expert in chosen:
                ax.add_patch(Rectangle((expert - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    fig.suptitle("Modality load per MoE layer (red boxes: speech experts)", fontsize=10)
    fig.savefig(path, dpi=100)


__all__ = [
    "ModalityLoad",
    "assign_speech_experts",
    "measure_modality_load",
    "random_speech_experts",
    "save_load_report",
    "select_speech_experts",
]
