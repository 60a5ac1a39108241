"""What trains in each phase: the paper's phase table, in one place.

| phase      | routing      | trains                                                     | frozen                                  |
|------------|--------------|------------------------------------------------------------|-----------------------------------------|
| align      | free         | audio adapter; audio rows of the embedding table and head | the LLM, Whisper                        |
| experts    | speech_only  | speech bank (+ dense layers, embeddings, router: options) | text bank, MoE-layer attention, adapter, Whisper |
|  (speech)  |              |                                                            |                                         |
| experts    | text_only    | text bank (+ the same options)                             | speech bank, MoE-layer attention, adapter, Whisper |
|  (text)    |              |                                                            |                                         |
| joint      | free         | everything but Whisper and the adapter                    | Whisper, adapter                        |
| dpo        | free         | as joint                                                   | as joint (+ a frozen reference model)   |

Freezing is `requires_grad_(False)`, so transformers' `Trainer` builds its optimizer from the
trainable parameters only: in the experts phase the optimizer holds one bank, not the whole MoE.
Row-wise training of the embedding table (only the new audio rows) is done with a gradient mask,
which keeps the text rows bit-identical as long as the optimizer has no weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

PHASES = ("align", "experts", "joint", "dpo")
MODALITIES = ("speech", "text")
EMBEDDING_CHOICES = ("none", "audio_rows", "all")


@dataclass
class PhasePlan:
    """Which parameter groups a phase trains. Built by `plan_for_phase`; applied by `apply_phase`."""

    phase: str
    routing_mode: str
    banks: tuple[str, ...] = ()  # "text_bank" / "speech_bank"
    router: bool = False
    shared_experts: bool = False
    moe_layer_attention: bool = False  # attention + norms of MoE decoder layers
    dense_layers: bool = False  # the whole of every non-MoE decoder layer (DeepSeek's first layer)
    embeddings: str = "none"  # none | audio_rows | all  (embedding table and, if untied, the head)
    final_norm: bool = False
    audio_adapter: bool = False
    audio_encoder: bool = False
    notes: list[str] = field(default_factory=list)


def plan_for_phase(
    phase: str,
    modality: str | None = None,
    *,
    train_router: bool = False,
    train_embeddings: str | None = None,
    train_dense_layers: bool = True,
    train_moe_attention: bool = False,
    train_shared_experts: bool = False,
) -> PhasePlan:
    """The paper's defaults for `phase`, with the options the paper and the authors' code disagree on.

    Router in the experts phase: the paper says it is frozen, the authors' code leaves it trainable.
    We freeze it by default: a router trained while only one bank can be chosen learns nothing about
    the other bank, and its rows for the trained bank drift in a way that later pulls free-routed
    text tokens towards speech experts. `train_router=True` gives the authors' behaviour.
    """
    if phase not in PHASES:
        raise ValueError(f"Unknown phase {phase!r}; choose one of {PHASES}.")
    if phase == "align":
        return PhasePlan("align", "free", embeddings=train_embeddings or "audio_rows", audio_adapter=True)
    if phase == "experts":
        if modality not in MODALITIES:
            raise ValueError(f"The experts phase trains one modality: modality must be one of {MODALITIES}, got {modality!r}.")
        embeddings = train_embeddings or "all"
        if embeddings not in EMBEDDING_CHOICES:
            raise ValueError(f"train_embeddings={embeddings!r}: choose one of {EMBEDDING_CHOICES}.")
        return PhasePlan(
            "experts",
            f"{modality}_only",
            banks=(f"{modality}_bank",),
            router=train_router,
            shared_experts=train_shared_experts,
            moe_layer_attention=train_moe_attention,
            dense_layers=train_dense_layers,
            embeddings=embeddings,
        )
    return PhasePlan(
        phase,
        "free",
        banks=("text_bank", "speech_bank"),
        router=True,
        shared_experts=True,
        moe_layer_attention=True,
        dense_layers=True,
        embeddings=train_embeddings or "all",
        final_norm=True,
    )


def apply_phase(model, plan: PhasePlan) -> dict[str, int]:
    """Set `requires_grad` on every parameter of a `DeepTalkForCausalLM` (or a PeftModel around one)
    for `plan`. Returns the number of trainable parameters per group (for logs and model cards)."""
    base = _deeptalk_model(model)
    base.requires_grad_(False)
    decoder = base.model.language_model
    counts: dict[str, int] = {}

    def train(group: str, module: nn.Module | None):
        if module is None:
            return
        module.requires_grad_(True)
        counts[group] = counts.get(group, 0) + sum(p.numel() for p in module.parameters())

    moe_layers = set(base.config.moe_layer_indices)
    for index, layer in enumerate(decoder.layers):
        if index not in moe_layers:
            if plan.dense_layers:
                train("dense_layers", layer)
            continue
        block = layer.mlp
        for bank in plan.banks:
            train(bank, getattr(block, bank))
        if plan.router:
            train("router", block.router)
        if plan.shared_experts:
            for name in ("shared_experts", "shared_expert", "shared_expert_gate"):
                train("shared_experts", getattr(block, name, None))
        if plan.moe_layer_attention:
            for name, child in layer.named_children():
                if name != "mlp":
                    train("moe_layer_attention", child)
    if plan.final_norm:
        train("final_norm", decoder.norm)
    if plan.audio_adapter:
        train("audio_adapter", getattr(base.model, "audio_adapter", None))
    if plan.audio_encoder:
        train("audio_encoder", getattr(base.model, "audio_encoder", None))
    counts.update(_train_embeddings(base, plan.embeddings))
    return counts


def _train_embeddings(base, choice: str) -> dict[str, int]:
    tables = [base.get_input_embeddings().weight]
    head = base.get_output_embeddings().weight
    if head is not tables[0]:
        tables.append(head)
    for table in tables:  # drop masks from an earlier phase
        for handle in getattr(table, "_deeptalk_row_masks", []):
            handle.remove()
        table._deeptalk_row_masks = []
    if choice == "none":
        return {}
    for table in tables:
        table.requires_grad_(True)
    if choice == "all":
        return {"embeddings": sum(t.numel() for t in tables)}
    first_audio_row = base.config.text_vocab_size
    if base.config.num_audio_streams == 0:
        raise ValueError("train_embeddings='audio_rows' needs a speech vocabulary: call model.add_speech(...) first.")
    for table in tables:
        mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
        mask[first_audio_row:] = 1
        table._deeptalk_row_masks.append(table.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype)))
    return {"embeddings (audio rows)": sum((t.shape[0] - first_audio_row) * t.shape[1] for t in tables)}


def _deeptalk_model(model):
    """The `DeepTalkForCausalLM` inside `model` (itself, or the base model of a PeftModel)."""
    inner = getattr(type(model), "get_base_model", None)  # a PeftModel forwards moe_blocks: unwrap it first
    if inner is not None:
        return _deeptalk_model(model.get_base_model())
    if hasattr(model, "moe_blocks"):
        return model
    raise TypeError(f"Expected a DeepTalkForCausalLM (or a PeftModel around one), got {type(model).__name__}.")


def trainable_parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
