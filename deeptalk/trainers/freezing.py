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

Freezing is `requires_grad_(False)` on separate parameters, so transformers' `Trainer` builds its
optimizer from the trainable parameters only (in the experts phase it holds one bank, not the whole
MoE) and freezing survives any engine that shards or flattens parameters (DDP, DeepSpeed ZeRO, FSDP):
the banks are separate parameters, and so are the text rows (`weight`) and audio rows (`audio_weight`)
of the embedding table and the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """Set `requires_grad` on every parameter of a `DeepTalkForCausalLM` (or a wrapper around one)
    for `plan`. Returns the number of trainable parameters per group (for logs and model cards)."""
    base = unwrap_deeptalk(model)
    base.requires_grad_(False)
    decoder = base.model
    counts: dict[str, int] = {}

    def train(group: str, module_or_param):
        if module_or_param is None:
            return
        module_or_param.requires_grad_(True)
        params = [module_or_param] if isinstance(module_or_param, nn.Parameter) else list(module_or_param.parameters())
        counts[group] = counts.get(group, 0) + sum(parameter_numel(p) for p in params)

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
        train("audio_adapter", getattr(decoder, "audio_adapter", None))
    if plan.audio_encoder:
        train("audio_encoder", getattr(decoder, "audio_encoder", None))
    _train_embeddings(base, plan.embeddings, train)
    return counts


def _train_embeddings(base, choice: str, train):
    """The embedding table and (if untied) the head: all rows, or only the audio rows (`audio_weight`)."""
    if choice not in EMBEDDING_CHOICES:
        raise ValueError(f"train_embeddings={choice!r}: choose one of {EMBEDDING_CHOICES}.")
    if choice == "none":
        return
    tables = [base.get_input_embeddings()]
    if base.get_output_embeddings().weight is not tables[0].weight:
        tables.append(base.get_output_embeddings())
    if choice == "all":
        for table in tables:
            train("embeddings", table)
        return
    if base.config.num_audio_streams == 0:
        raise ValueError("train_embeddings='audio_rows' needs a speech vocabulary: call model.add_speech(...) first.")
    for table in tables:
        train("embeddings (audio rows)", table.audio_weight)


def unwrap_deeptalk(model):
    """The `DeepTalkForCausalLM` inside `model`: itself, or inside a PEFT model, a DDP / DeepSpeed /
    FSDP wrapper (`.module`) or a compiled module (`._orig_mod`). TypeError for anything else."""
    seen = model
    for _ in range(8):
        if hasattr(type(seen), "moe_blocks") and hasattr(seen, "config") and getattr(seen.config, "model_type", None) == "deeptalk":
            return seen
        if hasattr(type(seen), "get_base_model"):  # peft.PeftModel
            seen = seen.get_base_model()
        elif isinstance(getattr(seen, "module", None), nn.Module):  # DDP, DeepSpeedEngine, FSDP
            seen = seen.module
        elif isinstance(getattr(seen, "_orig_mod", None), nn.Module):  # torch.compile
            seen = seen._orig_mod
        else:
            break
    raise TypeError(f"Expected a DeepTalkForCausalLM (or a PEFT / DDP / DeepSpeed / FSDP wrapper around one), got {type(model).__name__}.")


def parameter_numel(p) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 holds only this rank's partition of it."""
    return int(getattr(p, "ds_numel", p.numel()))


def trainable_parameter_count(model) -> int:
    return sum(parameter_numel(p) for p in model.parameters() if p.requires_grad)
