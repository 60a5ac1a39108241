# Copyright 2026 The deeptalk authors. Apache-2.0.
"""DeepTalk: a pre-trained MoE LLM whose routed experts are split into a text bank and a speech bank.

Paper: "DeepTalk: Towards Seamless and Smart Speech Interaction with Adaptive Modality-Specific MoE"
(arXiv 2506.21864; v3 is titled "DeepOmni").

This file is copied next to the weights by the Hub export (``trust_remote_code``): it imports only
torch, transformers and ``configuration_deeptalk``.

How it is built (read top to bottom):

1. ``route_tokens``          -- THE routing rule: which experts each token goes to, for every mode.
2. ``DeepTalkExperts``       -- one modality's bank of routed experts, fused like transformers' experts,
                                so the transformers experts kernels (``grouped_mm``, ``batched_mm``,
                                eager) run it unchanged.
3. ``DeepTalkSparseMoeBlock``-- one router over all experts in the *source* order (so DeepSeek's
                                group-limited top-k keeps its groups), a text bank, a speech bank and
                                the source's shared experts, untouched.
4. ``DeepTalkModel``         -- the source family's own transformers decoder (attention, caches,
                                rotary, MLA) with every MoE block swapped for a DeepTalk block.
5. ``DeepTalkForCausalLM``   -- LM head, loss, ``generate()``, and ``from_text_moe`` (conversion).

Invariant (tested for every family): in ``free`` mode a converted model computes the same logits as
its source, whatever the speech map.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging

from .configuration_deeptalk import (
    IGNORED_TOKEN,
    ROUTING_MODES,
    SPEECH_MODALITY,
    TEXT_MODALITY,
    DeepTalkConfig,
)

# Names of the shared (always-on) expert modules in the source families' MoE blocks. They are moved
# into the DeepTalk block as they are, so their weights keep their names.
SHARED_EXPERT_MODULES = ("shared_experts", "shared_expert", "shared_expert_gate")


# --------------------------------------------------------------------------------------------------
# 1. The routing rule
# --------------------------------------------------------------------------------------------------
@dataclass
class RouterSpec:
    """The routing semantics of the source family, as transformers implements them.

    All supported families score experts with a softmax over router logits. They differ in whether
    the top-k weights are renormalised (`norm_topk_prob`), scaled (`routed_scaling_factor`,
    DeepSeek) and whether top-k is group-limited (DeepSeek's `group_limited_greedy`).
    """

    top_k: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    topk_group: int = 1
    group_limited: bool = False
    grouped_experts: int | None = None  # experts the groups cover (the source's); added ones stay free
    jitter_noise: float = 0.0

    @classmethod
    def from_text_config(cls, text_config) -> RouterSpec:
        family = text_config.model_type
        if family == "mixtral":  # Mixtral always renormalises its top-k weights
            return cls(
                top_k=text_config.num_experts_per_tok,
                norm_topk_prob=True,
                jitter_noise=getattr(text_config, "router_jitter_noise", 0.0) or 0.0,
            )
        if family == "deepseek_v2":  # transformers' DeepseekV2TopkRouter: no renormalisation, scaled
            return cls(
                top_k=text_config.num_experts_per_tok,
                routed_scaling_factor=text_config.routed_scaling_factor,
                group_limited=text_config.topk_method == "group_limited_greedy",
                num_groups=text_config.n_group or 1,
                topk_group=text_config.topk_group or 1,
                grouped_experts=text_config.num_experts,
            )
        return cls(top_k=text_config.num_experts_per_tok, norm_topk_prob=bool(text_config.norm_topk_prob))


@dataclass
class RoutingDecision:
    """What the router decided for a flat batch of tokens.

    `expert_index` holds *source* expert indices, `-1` for a slot that could not be filled (a
    restricted mode allowing fewer experts than top-k); such slots have weight 0.
    `probs` are the softmax scores over the allowed experts (input of the load-balancing loss).
    """

    expert_weight: torch.Tensor  # [tokens, top_k], float32
    expert_index: torch.Tensor  # [tokens, top_k], long, -1 = empty slot
    probs: torch.Tensor  # [tokens, num_experts], float32


def route_tokens(router_logits: torch.Tensor, allowed: torch.Tensor | None, spec: RouterSpec) -> RoutingDecision:
    """THE DeepTalk routing rule -- every mode goes through here.

    1. Disallowed experts' logits become -inf **before** the softmax, as in the authors' code, so the
       weights renormalise over the allowed set (`allowed=None` means all experts: `free` mode).
    2. The family's top-k: group-limited greedy (DeepSeek) in `free` mode, plain greedy otherwise.
       In restricted modes the group limit is not applied: DeepSeek's groups bound cross-device
       traffic over the full expert set and could leave a token with no allowed expert.
    3. Slots that land on a disallowed expert (the allowed set is smaller than top-k, e.g. the
       paper's 6 speech experts with top-6 routing) are emptied: index -1, weight 0. So in
       `speech_only` mode with k speech experts <= top-k, every speech expert is chosen.
    4. The family's `norm_topk_prob` renormalisation and `routed_scaling_factor`.
    """
    logits = router_logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = logits.softmax(dim=-1)

    choice_scores = probs
    if spec.group_limited and allowed is None:
        num_tokens, num_experts = probs.shape
        grouped = spec.grouped_experts or num_experts  # experts added later (MoExtend) are in no group
        group_scores = probs[:, :grouped].reshape(num_tokens, spec.num_groups, -1).max(dim=-1).values
        group_index = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, grouped // spec.num_groups).reshape(num_tokens, -1)
        expert_mask = F.pad(expert_mask, (0, num_experts - grouped), value=1.0)
        choice_scores = probs.masked_fill(~expert_mask.bool(), 0.0)

    expert_weight, expert_index = torch.topk(choice_scores, spec.top_k, dim=-1)
    if allowed is not None:
        filled = allowed.expand_as(probs).gather(1, expert_index)
        expert_index = expert_index.masked_fill(~filled, -1)
        expert_weight = expert_weight.masked_fill(~filled, 0.0)
    if spec.norm_topk_prob:
        expert_weight = expert_weight / expert_weight.sum(dim=-1, keepdim=True)
    if spec.routed_scaling_factor != 1.0:
        expert_weight = expert_weight * spec.routed_scaling_factor
    return RoutingDecision(expert_weight=expert_weight, expert_index=expert_index, probs=probs)


def load_balancing_loss(decision: RoutingDecision, num_allowed: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balance loss over one set of allowed experts (one bank, or all of them).

    `num_allowed * sum_e f_e * P_e`, with `f_e` the fraction of token slots sent to expert e and
    `P_e` its mean routing probability -- transformers' `load_balancing_loss_func` for one layer.
    Perfectly uniform routing gives `min(top_k, num_allowed)`, e.g. 2.0 for top-2.
    """
    probs, index = decision.probs, decision.expert_index
    if rows is not None:
        probs, index = probs[rows], index[rows]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    slots = F.one_hot(index.clamp(min=0), probs.shape[-1]).float() * (index >= 0).unsqueeze(-1).float()
    fraction = slots.sum(dim=1).mean(dim=0)
    return num_allowed * (fraction * probs.mean(dim=0)).sum()


# --------------------------------------------------------------------------------------------------
# 2. One modality's bank of experts
# --------------------------------------------------------------------------------------------------
@use_experts_implementation
class DeepTalkExperts(nn.Module):
    """A bank of routed experts for one modality, stored fused like transformers' MoE experts.

    `gate_up_proj` is `[num_experts, 2 * intermediate, hidden]` and `down_proj` is
    `[num_experts, hidden, intermediate]`, so the transformers experts kernels (selected by
    `experts_implementation`) run it, PEFT can target it with `target_parameters`, and one modality
    is frozen by `requires_grad_(False)` on its bank. `forward` below is the eager reference.
    """

    def __init__(self, config, num_experts: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, config.hidden_size, intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]
        std = getattr(config, "initializer_range", 0.02)
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final_hidden_states = torch.zeros_like(hidden_states)
        for expert_idx in top_k_index.unique().tolist():
            slot, token_idx = torch.where((top_k_index == expert_idx).T)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out = out * top_k_weights[token_idx, slot, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states


class DeepTalkRouter(nn.Module):
    """One linear router over all routed experts, in the source model's expert order (kept in fp32)."""

    def __init__(self, hidden_size: int, num_experts: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=std)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.to(self.weight.dtype), self.weight)


# --------------------------------------------------------------------------------------------------
# 3. The modality-aware MoE block
# --------------------------------------------------------------------------------------------------
class RoutingState:
    """Per-forward routing inputs and records, shared by a model and its MoE blocks.

    The source family's decoder layers call `mlp(hidden_states)` with nothing else, so the routing
    mode and each token's modality reach the blocks through this object, set by `DeepTalkModel`
    before it runs the decoder. Inputs stay set after the forward so that gradient-checkpointing
    recomputation routes exactly as the forward did; records are only taken during the forward.
    """

    def __init__(self):
        self.mode = "free"
        self.token_modality: torch.Tensor | None = None  # [tokens], flat like the blocks' input
        self.recording = False
        self.want_router_logits = False
        self.want_expert_load = False
        self.router_logits: list[torch.Tensor] = []
        self.aux_losses: list[torch.Tensor] = []
        self.expert_load: list[torch.Tensor] = []

    def begin(self, mode, token_modality, want_router_logits, want_expert_load):
        self.mode, self.token_modality = mode, token_modality
        self.want_router_logits, self.want_expert_load = want_router_logits, want_expert_load
        self.router_logits, self.aux_losses, self.expert_load = [], [], []
        self.recording = True

    def end(self):
        self.recording = False

    def __deepcopy__(self, memo):
        # The records of the last forward hold non-leaf tensors (deepcopy refuses those): a copied
        # model gets the routing inputs only, shared by all its blocks through `memo`.
        state = RoutingState()
        state.mode = self.mode
        state.token_modality = None if self.token_modality is None else self.token_modality.detach().clone()
        return state


class DeepTalkSparseMoeBlock(nn.Module):
    """Router + text bank + speech bank + the source's shared experts, for one MoE layer."""

    def __init__(self, config: DeepTalkConfig, moe_layer: int, source_block: nn.Module, routing_state: RoutingState):
        super().__init__()
        text_config = config.text_config
        self.moe_layer = moe_layer
        self.num_experts = config.num_routed_experts
        self.spec = RouterSpec.from_text_config(text_config)
        self.routing_state = routing_state
        self.intermediate_size = source_block.experts.intermediate_dim
        self.bank_config = text_config  # what the experts kernels read (`_experts_implementation`, act)
        std = getattr(text_config, "initializer_range", 0.02)
        self.router = DeepTalkRouter(text_config.hidden_size, self.num_experts, std)
        for name in SHARED_EXPERT_MODULES:  # moved over untouched
            if hasattr(source_block, name):
                setattr(self, name, getattr(source_block, name))
        self._build_banks(config.expert_modality(moe_layer))

    # ---- expert placement ----------------------------------------------------------------------
    def _build_banks(self, expert_modality: list[int], device=None):
        """Create the banks for a modality map (source index -> modality), randomly initialised, or
        on `device="meta"` when their weights are about to be filled in."""
        text_config = self.bank_config
        self.expert_modality = list(expert_modality)
        self.bank_members = {
            modality: [e for e, m in enumerate(expert_modality) if m == modality]
            for modality in (TEXT_MODALITY, SPEECH_MODALITY)
        }
        # source index -> index inside its bank
        self.local_index = [0] * self.num_experts
        for members in self.bank_members.values():
            for local, expert in enumerate(members):
                self.local_index[expert] = local
        with torch.device(device or self.router.weight.device):
            self.text_bank = DeepTalkExperts(text_config, len(self.bank_members[TEXT_MODALITY]), self.intermediate_size)
            self.speech_bank = DeepTalkExperts(
                text_config, len(self.bank_members[SPEECH_MODALITY]), self.intermediate_size
            )
        self._index_cache: dict = {}
        self._packed_cache = None  # see _packed_banks; it views the old banks' storage

    def banks(self):
        return {TEXT_MODALITY: self.text_bank, SPEECH_MODALITY: self.speech_bank}

    @torch.no_grad()
    def source_order_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both banks gathered back into the source layout `[E, 2I, H]`, `[E, H, I]`."""
        ref = self.text_bank.gate_up_proj
        gate_up = ref.new_empty(self.num_experts, *ref.shape[1:])
        down = ref.new_empty(self.num_experts, *self.text_bank.down_proj.shape[1:])
        for modality, bank in self.banks().items():
            members = torch.tensor(self.bank_members[modality], dtype=torch.long, device=ref.device)
            if len(members):
                gate_up.index_copy_(0, members, bank.gate_up_proj.detach())
                down.index_copy_(0, members, bank.down_proj.detach())
        return gate_up, down

    @torch.no_grad()
    def load_source_experts(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, expert_modality=None):
        """Fill the banks from source-layout fused experts, optionally re-placing experts first."""
        if expert_modality is not None:
            self._build_banks(expert_modality, device="meta")  # no throwaway random init
        for bank_name, (gate_up, down) in self.split_source_experts(gate_up_proj, down_proj).items():
            bank = getattr(self, bank_name)
            bank.gate_up_proj = nn.Parameter(gate_up.contiguous())
            bank.down_proj = nn.Parameter(down.contiguous())
        self._packed_cache = None

    def split_source_experts(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> dict:
        """Source-order fused expert weights -> `{"text_bank": (gate_up, down), "speech_bank": ...}`,
        each in its bank's order (the one place the expert map splits weights)."""
        split = {}
        for modality, bank_name in ((TEXT_MODALITY, "text_bank"), (SPEECH_MODALITY, "speech_bank")):
            members = torch.tensor(self.bank_members[modality], dtype=torch.long, device=gate_up_proj.device)
            split[bank_name] = (gate_up_proj.index_select(0, members), down_proj.index_select(0, members))
        return split

    def _placement(self, device):
        """Per-device tensors, by source index: is the expert a speech expert; its index inside its
        bank; its index in the packed text-then-speech layout (see `_packed_banks`)."""
        if device not in self._index_cache:
            num_text = len(self.bank_members[TEXT_MODALITY])
            packed = [local + (num_text if m == SPEECH_MODALITY else 0) for local, m in zip(self.local_index, self.expert_modality)]
            self._index_cache[device] = (
                torch.tensor(self.expert_modality, dtype=torch.long, device=device) == SPEECH_MODALITY,
                torch.tensor(self.local_index, dtype=torch.long, device=device),
                torch.tensor(packed, dtype=torch.long, device=device),
            )
        return self._index_cache[device]

    # ---- forward -------------------------------------------------------------------------------
    def allowed_experts(self, mode: str, token_modality: torch.Tensor | None, device) -> torch.Tensor | None:
        """Boolean mask of the experts each token may use (`None` = all of them)."""
        is_speech_expert = self._placement(device)[0]
        if mode == "free":
            return None
        if mode == "speech_only":
            return is_speech_expert.unsqueeze(0)
        if mode == "text_only":
            return (~is_speech_expert).unsqueeze(0)
        if mode == "by_token_modality":
            # padding / ignored tokens route like text tokens
            speech_token = (token_modality == SPEECH_MODALITY).unsqueeze(-1)
            return is_speech_expert.unsqueeze(0) == speech_token
        raise ValueError(f"Unknown routing mode {mode!r}; choose one of {list(ROUTING_MODES)}.")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        state = self.routing_state
        batch_size, seq_len, hidden_dim = hidden_states.shape
        if self.training and self.spec.jitter_noise > 0:  # Mixtral's router jitter
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.spec.jitter_noise, 1.0 + self.spec.jitter_noise)
            hidden_states = hidden_states * noise
        flat = hidden_states.reshape(-1, hidden_dim)
        token_modality = state.token_modality
        if token_modality is not None and token_modality.numel() != flat.shape[0]:
            raise ValueError(
                f"token_modality has {token_modality.numel()} entries but the batch has {flat.shape[0]} tokens: "
                "give one modality per input position."
            )

        router_logits = self.router(flat)
        allowed = self.allowed_experts(state.mode, token_modality, flat.device)
        decision = route_tokens(router_logits, allowed, self.spec)
        output = self._run_experts(flat, decision)

        if hasattr(self, "shared_experts"):  # DeepSeek: always-on shared experts
            output = output + self.shared_experts(flat)
        if hasattr(self, "shared_expert"):  # Qwen2-MoE: sigmoid-gated shared expert
            output = output + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)

        # The balance loss is computed whenever it is wanted, also while gradient checkpointing
        # recomputes this block, so both passes save the same tensors; it is kept only once.
        aux_loss = self._balance_loss(decision, allowed, token_modality, state.mode) if state.want_router_logits else None
        if state.recording:
            self._record(state, router_logits, decision, aux_loss, token_modality)
        return output.view(batch_size, seq_len, hidden_dim)

    def _run_experts(self, hidden_states: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        """Send every (token, expert) pair to the bank holding that expert and sum the results."""
        is_speech_expert, local_index, _ = self._placement(hidden_states.device)
        index, weight = decision.expert_index, decision.expert_weight
        filled = index >= 0
        source_index = index.clamp(min=0)
        slot_is_speech = is_speech_expert[source_index] & filled
        slot_local = local_index[source_index]

        if self.routing_state.mode == "free" and not torch.is_grad_enabled():
            packed = self._packed_banks()
            if packed is not None:  # inference: one kernel call over both banks, like the source
                return packed(hidden_states, self._placement(hidden_states.device)[2][index], weight)

        only_bank = self._only_bank_in_use(self.routing_state.mode)
        if only_bank is not None:
            # Every filled slot is in one bank: run it on the whole [tokens, top_k] routing table.
            # Empty slots point at expert 0 with weight 0 (they add nothing).
            bank = self.banks()[only_bank]
            return bank(hidden_states, slot_local.masked_fill(~filled, 0), weight.masked_fill(~filled, 0.0))

        output = torch.zeros_like(hidden_states)
        top_k = index.shape[1]
        for modality, in_bank in ((TEXT_MODALITY, filled & ~slot_is_speech), (SPEECH_MODALITY, slot_is_speech)):
            pairs = in_bank.reshape(-1).nonzero().squeeze(-1)
            if pairs.numel() == 0:
                continue
            tokens = pairs // top_k
            bank_out = self.banks()[modality](
                hidden_states[tokens], slot_local.reshape(-1)[pairs, None], weight.reshape(-1)[pairs, None]
            )
            output.index_add_(0, tokens, bank_out.to(output.dtype))
        return output

    def _packed_banks(self) -> DeepTalkExperts | None:
        """Both banks as ONE experts module (text experts, then speech experts) for inference in
        `free` mode, so it costs one experts-kernel call like the source's block.

        The banks stay two Parameters (what freezing, optimizers and PEFT need); for inference
        their weights are moved back to back into one storage (once; again after `.to()` or a
        reload) and this module views that storage without copying. Returns None when the banks
        cannot be packed (an empty bank, meta or distributed tensors).
        """
        banks = (self.text_bank, self.speech_bank)
        if not all(isinstance(bank, DeepTalkExperts) for bank in banks):
            return None  # e.g. an unmerged PEFT adapter wraps a bank: packing raw weights would skip it
        params = [getattr(bank, name) for name in ("gate_up_proj", "down_proj") for bank in banks]
        if any(p.numel() == 0 or p.is_meta or type(p) is not nn.Parameter for p in params):
            return None
        key = tuple((p.data_ptr(), p.shape, p.dtype, p.device) for p in params)
        cached = self._packed_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        views = []
        for name in ("gate_up_proj", "down_proj"):
            first, second = getattr(self.text_bank, name), getattr(self.speech_bank, name)
            if not _back_to_back(first, second):
                _pack_back_to_back(first, second)
            views.append(first.as_strided((first.shape[0] + second.shape[0], *first.shape[1:]), first.stride()))
        packed = copy.copy(self.text_bank)  # the same kernels and config, with its own parameter table
        packed._parameters = {
            "gate_up_proj": nn.Parameter(views[0], requires_grad=False),
            "down_proj": nn.Parameter(views[1], requires_grad=False),
        }
        packed.num_experts = views[0].shape[0]
        key = tuple((p.data_ptr(), p.shape, p.dtype, p.device) for p in params)
        self._packed_cache = (key, packed)
        return packed

    def _only_bank_in_use(self, mode: str) -> int | None:
        if mode == "speech_only":
            return SPEECH_MODALITY
        if mode == "text_only" or not self.bank_members[SPEECH_MODALITY]:
            return TEXT_MODALITY
        return None

    def _record(self, state: RoutingState, router_logits, decision, aux_loss, token_modality):
        if state.want_router_logits:
            state.router_logits.append(router_logits)
            state.aux_losses.append(aux_loss)
        if state.want_expert_load:
            with torch.no_grad():
                counted = decision.expert_index >= 0
                if token_modality is not None:
                    counted = counted & (token_modality != IGNORED_TOKEN).unsqueeze(-1)
                load = torch.zeros(2, self.num_experts, device=router_logits.device)
                modality = (
                    token_modality.clamp(min=0)
                    if token_modality is not None
                    else torch.zeros(decision.expert_index.shape[0], dtype=torch.long, device=router_logits.device)
                )
                slot_modality = modality.unsqueeze(-1).expand_as(decision.expert_index)
                flat_target = slot_modality[counted] * self.num_experts + decision.expert_index[counted]
                load.view(-1).index_add_(0, flat_target, torch.ones_like(flat_target, dtype=load.dtype))
                state.expert_load.append(load)

    def _balance_loss(self, decision, allowed, token_modality, mode) -> torch.Tensor:
        real = None if token_modality is None else token_modality != IGNORED_TOKEN
        if mode != "by_token_modality":
            num_allowed = self.num_experts if allowed is None else int(allowed.sum())
            return load_balancing_loss(decision, num_allowed, real)
        # one balance loss per bank, over that bank's tokens, weighted by token count
        total, count = decision.probs.new_zeros(()), 0
        for modality in (TEXT_MODALITY, SPEECH_MODALITY):
            rows = token_modality == modality
            n = int(rows.sum())
            if n:
                total = total + n * load_balancing_loss(decision, len(self.bank_members[modality]), rows)
                count += n
        return total / max(count, 1)


def _back_to_back(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether `second` starts in `first`'s storage right where `first` ends."""
    return (
        first.is_contiguous()
        and second.is_contiguous()
        and first.dtype == second.dtype
        and first.device == second.device
        and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and second.storage_offset() == first.storage_offset() + first.numel()
    )


def _pack_back_to_back(first: nn.Parameter, second: nn.Parameter):
    """Move two parameters' data into one storage, `first` then `second`; the Parameter objects (and
    so optimizers, freezing and hooks) stay the same. Done outside inference mode so the new data are
    ordinary tensors that training can use later."""
    with torch.inference_mode(False), torch.no_grad():
        storage = torch.cat([first.detach(), second.detach()])
        first.data = storage[: first.shape[0]]
        second.data = storage[first.shape[0] :]


# --------------------------------------------------------------------------------------------------
# 4. Speech input: Whisper encoder frames -> LLM positions
# --------------------------------------------------------------------------------------------------
class DeepTalkAudioAdapter(nn.Module):
    """Stacks `stride` consecutive 50 Hz Whisper frames into one LLM position and projects them into
    the LLM's hidden size with a two-layer MLP (the paper calls its adapter an MLP that downsamples)."""

    def __init__(self, audio_hidden_size: int, hidden_size: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj_in = nn.Linear(stride * audio_hidden_size, hidden_size)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(hidden_size, hidden_size)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """`[frames, audio_hidden]` -> `[ceil(frames / stride), hidden]` (last group zero-padded)."""
        frames = F.pad(frames, (0, 0, 0, (-frames.shape[0]) % self.stride))
        return self.proj_out(self.act(self.proj_in(frames.reshape(-1, self.stride * frames.shape[-1]))))


# --------------------------------------------------------------------------------------------------
# 5. Model
# --------------------------------------------------------------------------------------------------
@dataclass
class DeepTalkModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus DeepTalk's per-layer expert load.

    aux_loss (`torch.FloatTensor`): load-balancing loss averaged over MoE layers (with
        `output_router_logits`).
    expert_load (`torch.FloatTensor` of shape `(num_moe_layers, 2, num_experts)`): how many token
        slots chose each expert (source order), split by token modality (0 = text, 1 = speech).
        Returned with `output_expert_load=True`; the input of the modality expert assignment.
    """

    aux_loss: torch.FloatTensor | None = None
    expert_load: torch.FloatTensor | None = None


@dataclass
class DeepTalkCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus `expert_load` (see `DeepTalkModelOutputWithPast`) and, for
    multi-stream labels, `stream_losses` (`(1 + N,)`: text CE then each audio stream's CE; NaN for
    a stream without labels in the batch)."""

    expert_load: torch.FloatTensor | None = None
    stream_losses: torch.FloatTensor | None = None


class DeepTalkPreTrainedModel(PreTrainedModel):
    config_class = DeepTalkConfig
    config: DeepTalkConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # routing sends a data-dependent number of tokens to each bank
    _keep_in_fp32_modules_strict = ["router"]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.text_config.initializer_range
        if isinstance(module, DeepTalkExperts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, DeepTalkRouter):
            nn.init.normal_(module.weight, std=std)


class DeepTalkModel(DeepTalkPreTrainedModel):
    """The source family's transformers decoder with DeepTalk MoE blocks."""

    def __init__(self, config: DeepTalkConfig):
        super().__init__(config)
        self.routing_state = RoutingState()
        self.language_model = AutoModel.from_config(config.text_config)
        self._no_split_modules = list(getattr(self.language_model, "_no_split_modules", None) or [])
        self._swap_moe_blocks()
        if config.audio_config is not None:
            self.build_audio_input()
        self.post_init()

    def build_audio_input(self):
        """Create the Whisper encoder and the adapter described by `config.audio_config`."""
        audio_config = self.config.audio_config
        self.audio_encoder = WhisperEncoder(audio_config)
        self.audio_adapter = DeepTalkAudioAdapter(
            audio_config.d_model, self.config.text_config.hidden_size, self.config.audio_adapter_stride
        )

    def _swap_moe_blocks(self):
        layers = self.language_model.layers
        found = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")]
        if found != self.config.moe_layer_indices:
            raise ValueError(
                f"The {self.config.family} decoder has MoE blocks at layers {found}, but the config expects "
                f"{self.config.moe_layer_indices}. This transformers version builds the family differently; "
                "please report it."
            )
        for moe_layer, layer_idx in enumerate(found):
            source_block = layers[layer_idx].mlp
            layers[layer_idx].mlp = DeepTalkSparseMoeBlock(self.config, moe_layer, source_block, self.routing_state)

    def moe_blocks(self) -> list[DeepTalkSparseMoeBlock]:
        return [layer.mlp for layer in self.language_model.layers if isinstance(layer.mlp, DeepTalkSparseMoeBlock)]

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ---- speech input ------------------------------------------------------------------------
    def encode_audio(self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel `[batch, mel_bins, frames]` -> adapter outputs of every clip, concatenated in batch
        order: `[sum of config.num_audio_positions(length), hidden]`.

        Unless `config.audio_pad_to_30s`, only the real length is encoded (Whisper's positional
        table is cut to it and padded frames are masked out of attention), which is what makes short
        spoken questions cheap.
        """
        if not hasattr(self, "audio_encoder"):
            raise ValueError("This model has no audio encoder: build it with an audio_config (see add_speech).")
        encoder = self.audio_encoder
        batch, _, frames = input_features.shape
        if feature_lengths is None:
            feature_lengths = torch.full((batch,), frames, dtype=torch.long)
        feature_lengths = feature_lengths.to(input_features.device).long()
        if self.config.audio_pad_to_30s:
            input_features = F.pad(input_features, (0, max(0, 3000 - frames)))[..., :3000]
            feature_lengths = torch.full_like(feature_lengths, 3000)
        input_features = input_features.to(encoder.conv1.weight.dtype)
        hidden = F.gelu(encoder.conv1(input_features))
        hidden = F.gelu(encoder.conv2(hidden)).transpose(1, 2)
        steps = hidden.shape[1]
        if steps > encoder.embed_positions.num_embeddings:
            raise ValueError(
                f"Audio of {frames} mel frames is longer than the encoder's window "
                f"({2 * encoder.embed_positions.num_embeddings} frames = 30 s): split it into shorter clips."
            )
        hidden = hidden + encoder.embed_positions.weight[:steps]
        encoder_lengths = (feature_lengths - 1) // 2 + 1
        attention_mask = None
        if (encoder_lengths < steps).any():
            keep = torch.arange(steps, device=hidden.device)[None, :] < encoder_lengths[:, None]
            attention_mask = torch.zeros(batch, 1, 1, steps, dtype=hidden.dtype, device=hidden.device)
            attention_mask = attention_mask.masked_fill(~keep[:, None, None, :], torch.finfo(hidden.dtype).min)
        for layer in encoder.layers:
            hidden = layer(hidden, attention_mask)
        hidden = encoder.layer_norm(hidden)
        return torch.cat([self.audio_adapter(hidden[b, : int(encoder_lengths[b])]) for b in range(batch)])

    def mean_stream_embedding(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`[B, 1 + N, T]` ids -> `[B, T, H]`: the mean of the streams' embeddings, leaving PAD_A slots
        out when `config.stream_embedding_mean == "non_pad"` (the text slot always counts)."""
        embeddings = self.get_input_embeddings()(input_ids)
        if self.config.stream_embedding_mean == "all":
            return embeddings.mean(dim=1)
        pad_ids = self._pad_a_ids(input_ids.shape[1] - 1, input_ids.device)
        weight = (input_ids != pad_ids[None, :, None]).to(embeddings.dtype).unsqueeze(-1)
        return (embeddings * weight).sum(dim=1) / weight.sum(dim=1)

    def _pad_a_ids(self, num_audio_streams: int, device) -> torch.Tensor:
        """`[1 + N]` PAD_A id per stream (-1 for the text slot), cached: it is needed every decode step."""
        key = (num_audio_streams, str(device), self.config.text_vocab_size, self.config.audio_codebook_size)
        cache = self.__dict__.setdefault("_pad_a_ids_cache", {})
        if key not in cache:
            ids = [-1] + [self.config.audio_special_id("<|pad_a|>", i) for i in range(num_audio_streams)]
            cache[key] = torch.tensor(ids, device=device)
        return cache[key]

    def embed_inputs(self, input_ids, input_features=None, audio_feature_lengths=None, audio_input_mask=None):
        """Input embeddings of text ids `[B, T]` or multi-stream ids `[B, 1 + N, T]` (the mean of the
        streams' embeddings), with audio features spliced in at `audio_input_mask` positions.

        At an audio-input position the N audio slots are replaced by the adapter output while the
        text slot keeps its placeholder embedding, as in the authors' code:
        `(text_embedding + N * audio_feature) / (1 + N)`, for multi-stream and text-stream-only ids
        alike (plain replacement when the model has no audio streams).
        """
        embed = self.get_input_embeddings()
        inputs_embeds = self.mean_stream_embedding(input_ids) if input_ids.dim() == 3 else embed(input_ids)
        if input_features is None:
            return inputs_embeds
        if audio_input_mask is None:
            raise ValueError("input_features need audio_input_mask: which positions receive the audio features.")
        features = self.encode_audio(input_features, audio_feature_lengths).to(inputs_embeds.dtype)
        positions = int(audio_input_mask.sum())
        if features.shape[0] != positions:
            raise ValueError(
                f"The audio gives {features.shape[0]} adapter frames but audio_input_mask marks {positions} "
                "positions. Build inputs with DeepTalkProcessor, or mark config.num_audio_positions(mel_frames) "
                "positions per clip."
            )
        # The N audio slots take the feature, the text slot keeps its token. Plain text ids get the
        # same mix, so the text stream alone (e.g. for generate()) embeds like the full layout.
        audio_slots = input_ids.shape[1] - 1 if input_ids.dim() == 3 else self.config.num_audio_streams
        if audio_slots:
            text_ids = input_ids[:, 0] if input_ids.dim() == 3 else input_ids
            text_slot = embed(text_ids)[audio_input_mask]
            features = (text_slot + audio_slots * features) / (audio_slots + 1)
        mask = audio_input_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features)

    def token_modality_from_inputs(self, input_ids, inputs_embeds, attention_mask, token_modality, audio_input_mask=None):
        """Per-token modality (0 text, 1 speech, -1 padding), flattened like the MoE blocks' input.

        Without an explicit `token_modality`, a position is speech when it receives audio features or
        when any audio stream carries a codec code there.
        """
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if reference.dim() == 3:
            reference = reference[:, 0]
        if token_modality is not None:
            token_modality = token_modality.to(reference.device)
            if token_modality.shape[-1] > reference.shape[-1]:  # generation with a cache: keep the new steps
                token_modality = token_modality[..., -reference.shape[-1] :]
            if token_modality.shape != reference.shape:
                raise ValueError(
                    f"token_modality has shape {tuple(token_modality.shape)} but the input has "
                    f"{tuple(reference.shape)}: give one modality (0 text, 1 speech) per input position."
                )
            bad = ~torch.isin(token_modality, torch.tensor([TEXT_MODALITY, SPEECH_MODALITY, IGNORED_TOKEN], device=reference.device))
            if bad.any():
                raise ValueError(
                    f"token_modality holds {token_modality[bad].unique().tolist()}; use 0 (text), 1 (speech) "
                    "or -1 (padding)."
                )
            return token_modality.reshape(-1).long()
        modality = torch.full(reference.shape, TEXT_MODALITY, dtype=torch.long, device=reference.device)
        if input_ids is not None and input_ids.dim() == 3:
            speech = torch.zeros_like(reference, dtype=torch.bool)
            for stream in range(1, input_ids.shape[1]):
                start, _ = self.config.stream_range(stream)
                codes = input_ids[:, stream] - start
                speech |= (codes >= 0) & (codes < self.config.audio_codebook_size)
            modality = modality.masked_fill(speech, SPEECH_MODALITY)
        if audio_input_mask is not None:
            modality = modality.masked_fill(audio_input_mask.bool(), SPEECH_MODALITY)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == reference.shape:
            modality = modality.masked_fill(attention_mask == 0, IGNORED_TOKEN)
        return modality.reshape(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        token_modality: torch.LongTensor | None = None,
        routing_mode: str | None = None,
        output_router_logits: bool | None = None,
        output_expert_load: bool | None = None,
        input_features: torch.FloatTensor | None = None,
        audio_feature_lengths: torch.LongTensor | None = None,
        audio_input_mask: torch.BoolTensor | None = None,
        **kwargs,
    ) -> DeepTalkModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, 1 + N, sequence_length)`):
            Text ids, or multi-stream ids (text stream + N audio streams, global vocabulary ids).
        input_features (`torch.FloatTensor` of shape `(batch_size, mel_bins, frames)`, *optional*):
            Log-mel features of the user's audio (`WhisperFeatureExtractor`).
        audio_feature_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Real mel frames of each clip (the rest is padding).
        audio_input_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions that receive the audio features, in order.
        token_modality (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            0 for a text position, 1 for a speech position, -1 for padding. Used by the
            `by_token_modality` routing mode and to split the expert load by modality. Defaults to
            text everywhere (padding from `attention_mask`).
        routing_mode (`str`, *optional*):
            Overrides `config.routing_mode` for this call.
        output_router_logits (`bool`, *optional*):
            Return router logits and the load-balancing `aux_loss`.
        output_expert_load (`bool`, *optional*):
            Return `expert_load`, the per-layer count of selections per expert by token modality.
        """
        if "past_key_values" in kwargs:  # transformers < 5.40 name
            cache = kwargs.pop("past_key_values")
        mode = routing_mode or self.config.routing_mode
        if mode not in ROUTING_MODES:
            raise ValueError(f"Unknown routing_mode {mode!r}; choose one of {list(ROUTING_MODES)}.")
        if mode in ("speech_only", "by_token_modality") and not self.config.speech_experts:
            raise ValueError(
                f"routing_mode={mode!r} needs speech experts; none are assigned. Pass speech_experts when "
                "converting, or run the assignment step first."
            )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        # Token modality feeds by_token_modality routing and the per-modality records; plain
        # inference needs neither, so skip the work there (it shows in per-token decode time).
        modality = None
        if token_modality is not None or mode == "by_token_modality" or output_router_logits or output_expert_load:
            modality = self.token_modality_from_inputs(
                input_ids, inputs_embeds, attention_mask, token_modality, audio_input_mask
            )
        if input_ids is not None and (input_ids.dim() == 3 or input_features is not None):
            inputs_embeds = self.embed_inputs(input_ids, input_features, audio_feature_lengths, audio_input_mask)
            input_ids = None

        self.routing_state.begin(mode, modality, bool(output_router_logits), bool(output_expert_load))
        try:
            outputs = self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            self.routing_state.end()
        state = self.routing_state
        aux_loss = torch.stack(state.aux_losses).mean() if state.aux_losses else None
        return DeepTalkModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(state.router_logits) if output_router_logits else None,
            aux_loss=aux_loss,
            expert_load=torch.stack(state.expert_load) if output_expert_load else None,
        )


# --------------------------------------------------------------------------------------------------
# 6. Causal LM
# --------------------------------------------------------------------------------------------------
class DeepTalkForCausalLM(DeepTalkPreTrainedModel, GenerationMixin):
    """DeepTalk decoder with a language-modelling head.

    Build one from a pre-trained transformers MoE LLM with [`DeepTalkForCausalLM.from_text_moe`].
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: DeepTalkConfig):
        super().__init__(config)
        self.model = DeepTalkModel(config)
        self._no_split_modules = self.model._no_split_modules
        self.vocab_size = config.text_config.vocab_size  # the whole extended vocabulary
        self.lm_head = nn.Linear(config.text_config.hidden_size, self.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def moe_blocks(self) -> list[DeepTalkSparseMoeBlock]:
        return self.model.moe_blocks()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        token_modality: torch.LongTensor | None = None,
        routing_mode: str | None = None,
        output_router_logits: bool | None = None,
        output_expert_load: bool | None = None,
        input_features: torch.FloatTensor | None = None,
        audio_feature_lengths: torch.LongTensor | None = None,
        audio_input_mask: torch.BoolTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DeepTalkCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, 1 + N, sequence_length)`):
            Next-token labels (-100 = ignored), shifted inside the loss like transformers' causal LMs.
            Multi-stream labels give the paper's loss: the mean of the text CE and the N audio-stream
            CEs, each over its own slice of the vocabulary.
        input_ids, input_features, audio_feature_lengths, audio_input_mask, token_modality, routing_mode,
        output_router_logits, output_expert_load:
            See [`DeepTalkModel.forward`].
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            token_modality=token_modality,
            routing_mode=routing_mode,
            output_router_logits=output_router_logits,
            output_expert_load=output_expert_load,
            input_features=input_features,
            audio_feature_lengths=audio_feature_lengths,
            audio_input_mask=audio_input_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss, stream_losses = None, None
        if labels is not None and labels.dim() == 3:
            stream_losses = self.stream_losses(logits, labels)
            loss = stream_losses[~stream_losses.isnan()].mean()
            stream_losses = stream_losses.detach()
        elif labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **loss_kwargs)
        if loss is not None:
            if outputs.aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss.to(loss.device)
        return DeepTalkCausalLMOutputWithPast(
            loss=loss,
            aux_loss=outputs.aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            expert_load=outputs.expert_load,
            stream_losses=stream_losses,
        )

    def stream_logits(self, logits: torch.Tensor, stream: int) -> torch.Tensor:
        """The slice of `logits` over `stream`'s block of the vocabulary (0 = text, 1..N = audio)."""
        start, end = self.config.stream_range(stream)
        return logits[..., start:end]

    def stream_losses(self, logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """Cross-entropy of each stream over its own vocabulary slice: `(1 + N,)`, NaN where a
        stream has no labels in the batch."""
        if labels.shape[1] != self.config.num_streams:
            raise ValueError(
                f"labels have {labels.shape[1]} streams but the model has {self.config.num_streams} "
                f"(1 text + {self.config.num_audio_streams} audio)."
            )
        losses = []
        for stream in range(labels.shape[1]):
            start, end = self.config.stream_range(stream)
            target = labels[:, stream]
            valid = target != -100
            if not valid.any():
                losses.append(logits.new_tensor(float("nan")))
                continue
            local = torch.where(valid, target - start, -100)
            if ((local[valid] < 0) | (local[valid] >= end - start)).any():
                raise ValueError(
                    f"labels of stream {stream} hold ids outside its vocabulary block [{start}, {end}): "
                    "build labels with the processor's layout (global ids per stream)."
                )
            losses.append(self.loss_function(logits[..., start:end], local, end - start))
        return torch.stack([loss.float() for loss in losses])

    def prepare_inputs_for_generation(self, input_ids, cache=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if cache is not None and cache.get_seq_length() > 0:  # audio is encoded once, at prefill
            for name in ("input_features", "audio_feature_lengths", "audio_input_mask"):
                model_inputs.pop(name, None)
        return model_inputs

    # ---- speech ------------------------------------------------------------------------------
    def add_speech(
        self,
        num_audio_streams: int,
        audio_codebook_size: int,
        *,
        audio_stream_delays: list[int] | None = None,
        audio_special_tokens: list[str] | None = None,
        audio_config=None,
        audio_adapter_stride: int | None = None,
        audio_pad_to_30s: bool | None = None,
        text_vocab_size: int | None = None,
        mean_resizing: bool = True,
    ):
        """Give a converted text model its speech vocabulary and, with `audio_config`, its ears.

        Appends one block of `audio_codebook_size + len(audio_special_tokens)` ids per audio stream
        to the embedding table and the head (with `mean_resizing`, transformers draws new rows from
        the old rows' mean and covariance; the paper draws them from N(0, initializer_range)), and builds
        the Whisper encoder and adapter. Text rows are untouched: text logits stay the source's.
        `text_vocab_size` first grows the text block (e.g. to `len(tokenizer)` after adding DeepTalk's
        chat specials); `DeepTalkProcessor.model_speech_kwargs()` gives all of these arguments.
        """
        if self.config.num_audio_streams:
            raise ValueError("This model already has a speech vocabulary (num_audio_streams > 0).")
        text_vocab_size = text_vocab_size or self.config.text_vocab_size
        if text_vocab_size < self.config.text_vocab_size:
            raise ValueError(
                f"text_vocab_size={text_vocab_size} would cut the model's text vocabulary "
                f"({self.config.text_vocab_size}); the tokenizer must cover the model's text ids."
            )
        updates = {
            "num_audio_streams": num_audio_streams,
            "audio_codebook_size": audio_codebook_size,
            "audio_stream_delays": audio_stream_delays,
            "text_vocab_size": text_vocab_size,
        }
        if audio_special_tokens is not None:
            updates["audio_special_tokens"] = audio_special_tokens
        if audio_config is not None:
            updates["audio_config"] = audio_config.to_dict() if hasattr(audio_config, "to_dict") else audio_config
        for name, value in (("audio_adapter_stride", audio_adapter_stride), ("audio_pad_to_30s", audio_pad_to_30s)):
            if value is not None:
                updates[name] = value
        new_config = DeepTalkConfig(**{**self.config.to_dict(), **updates})  # validates
        for name in ("num_audio_streams", "audio_codebook_size", "audio_stream_delays", "audio_special_tokens",
                     "text_vocab_size", "audio_config", "audio_adapter_stride", "audio_pad_to_30s"):
            setattr(self.config, name, getattr(new_config, name))
        total = self.config.stream_range(self.config.num_streams - 1)[1]
        self.resize_token_embeddings(total, mean_resizing=mean_resizing)
        if self.config.audio_config is not None:
            self.model.build_audio_input()
            self.model.audio_encoder.to(self.lm_head.weight.device)
            self.model.audio_adapter.to(self.lm_head.weight.device)
        return self

    # ---- expert placement ----------------------------------------------------------------------
    def set_speech_experts(self, speech_experts: list[list[int]]):
        """Move experts between the banks so that `speech_experts` (source indices, one list per MoE
        layer) are the speech experts. Every expert keeps its weights, so `free` routing computes
        exactly what it did before. Bank parameters are replaced: build optimizers afterwards."""
        new_config = DeepTalkConfig(
            **{**self.config.to_dict(), "speech_experts": speech_experts, "num_speech_experts": None}
        )
        for moe_layer, block in enumerate(self.moe_blocks()):
            gate_up, down = block.source_order_experts()
            block.load_source_experts(gate_up, down, new_config.expert_modality(moe_layer))
        self.config.speech_experts = new_config.speech_experts
        self.config.num_speech_experts = new_config.num_speech_experts

    def add_new_speech_experts(self, num_new: int, *, seed: int = 0):
        """The MoExtend baseline (the paper's Table 2 ablation): add `num_new` NEW routed experts per
        MoE layer, with new router rows, and make them the speech bank, instead of re-purposing
        existing experts.

        New experts start as copies of existing experts of the same layer (chosen with `seed`); their
        router rows are drawn from N(0, initializer_range) like any new parameter. Free routing
        therefore changes: the new rows take probability mass from the source's experts, the
        "router disturbance" the paper blames for MoExtend's lower scores. DeepSeek's group-limited
        top-k keeps its groups over the source's experts; the added ones are always candidates.
        """
        if self.config.num_added_experts:
            raise ValueError("This model already has added experts; add them once.")
        if self.config.speech_experts:
            raise ValueError(
                "MoExtend makes the NEW experts the speech bank, but this model already has speech experts assigned."
            )
        if num_new < 1:
            raise ValueError(f"num_new={num_new} must be >= 1.")
        old_count = self.config.num_routed_experts
        generator = torch.Generator().manual_seed(seed)
        std = self.config.text_config.initializer_range
        modality = [TEXT_MODALITY] * old_count + [SPEECH_MODALITY] * num_new
        for block in self.moe_blocks():
            gate_up, down = block.source_order_experts()
            copies = torch.randperm(old_count, generator=generator)[:num_new].to(gate_up.device)
            router = block.router.weight
            new_rows = torch.randn(num_new, router.shape[1], generator=generator).to(router) * std
            block.router.weight = nn.Parameter(torch.cat([router.detach(), new_rows]))
            block.num_experts = old_count + num_new
            block.load_source_experts(
                torch.cat([gate_up, gate_up[copies]]), torch.cat([down, down[copies]]), expert_modality=modality
            )
        self.config.num_added_experts = num_new
        self.config.speech_experts = [list(range(old_count, old_count + num_new)) for _ in self.config.moe_layer_indices]
        self.config.num_speech_experts = num_new
        return self

    # ---- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_text_moe(
        cls,
        source: str | os.PathLike | PreTrainedModel,
        speech_experts: list[list[int]] | None = None,
        *,
        progress: bool = True,
        **config_overrides,
    ) -> DeepTalkForCausalLM:
        """Convert a pre-trained transformers MoE LLM into a DeepTalk model.

        Args:
            source: a `*ForCausalLM` instance of a supported family, or a path / Hub id to load one
                from (extra `from_pretrained` options can be passed with `source_kwargs={...}`).
            speech_experts: one list per MoE layer of the source expert indices that serve speech,
                or `None` to leave the assignment for later (`deeptalk assign`).
            progress: show a progress bar over layers.
            config_overrides: other `DeepTalkConfig` fields (`routing_mode`, `num_speech_experts`,
                `router_aux_loss_coef`, ...).

        With `routing_mode="free"`, the result computes the source's logits (tested to 1e-4 in fp32
        for every family). When `source` is a path, its tensors are reused without a copy; when it
        is a model instance, tensors are copied so the source stays usable.
        """
        source_kwargs = config_overrides.pop("source_kwargs", {})
        owned = isinstance(source, (str, os.PathLike))
        if owned:
            source = AutoModelForCausalLM.from_pretrained(source, **source_kwargs)
        text_config = source.config.__class__.from_dict(source.config.to_dict())
        config = DeepTalkConfig(text_config=text_config, speech_experts=speech_experts, **config_overrides)
        config.dtype = source.dtype

        with torch.device("meta"):
            model = cls(config)
        state = _convert_state_dict(source, model, copy=not owned, progress=progress)
        model.load_state_dict(state, strict=True, assign=True)
        _copy_buffers(source, model)
        for name, param in model.named_parameters():
            if param.is_meta:
                raise RuntimeError(f"Conversion left {name} uninitialised; please report this.")
            param.requires_grad_(True)
        if config.tie_word_embeddings:
            model.tie_weights()
        # keep the source's kernels: a model built on the meta device starts with the defaults
        if source.config._experts_implementation is not None:
            model.set_experts_implementation(source.config._experts_implementation)
        if source.config._attn_implementation is not None:
            model.set_attn_implementation(source.config._attn_implementation)
        model.train(source.training)
        return model


def _source_name(name: str) -> str:
    """DeepTalk parameter/buffer name -> source name (bank and router names aside)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def _convert_state_dict(source, model: DeepTalkForCausalLM, copy: bool, progress: bool) -> dict:
    source_state = source.state_dict()
    target_names = list(model.state_dict().keys())
    blocks = {f"model.language_model.layers.{i}.mlp.": block for i, block in _blocks_by_layer(model)}
    state = {}
    iterator = blocks.items()
    if progress:
        iterator = logging.tqdm(iterator, total=len(blocks), desc="Splitting experts into text/speech banks")
    for prefix, block in iterator:
        source_prefix = _source_name(prefix)
        gate_up = source_state[source_prefix + "experts.gate_up_proj"]
        down = source_state[source_prefix + "experts.down_proj"]
        for bank_name, (bank_gate_up, bank_down) in block.split_source_experts(gate_up, down).items():
            state[f"{prefix}{bank_name}.gate_up_proj"] = bank_gate_up
            state[f"{prefix}{bank_name}.down_proj"] = bank_down
        # `.float()` of an fp32 tensor is the tensor itself: copy explicitly, or training the router
        # would silently train the source model's gate too
        state[prefix + "router.weight"] = source_state[source_prefix + "gate.weight"].to(torch.float32, copy=copy)
    for name in target_names:
        if name in state:
            continue
        source_name = _source_name(name)
        if source_name not in source_state:
            raise KeyError(f"Source checkpoint has no tensor {source_name!r} for DeepTalk's {name!r}.")
        tensor = source_state[source_name]
        state[name] = tensor.clone() if copy else tensor
    return state


def _blocks_by_layer(model):
    return [(i, layer.mlp) for i, layer in enumerate(model.model.language_model.layers) if isinstance(layer.mlp, DeepTalkSparseMoeBlock)]


def _copy_buffers(source, model):
    """Non-persistent buffers (e.g. rotary frequencies) are not in the state dict: copy them over."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        source_buffer = source_buffers.get(_source_name(name))
        if source_buffer is None:
            raise KeyError(f"Source model has no buffer {_source_name(name)!r} for DeepTalk's {name!r}.")
        module._buffers[buffer_name] = source_buffer.clone()


__all__ = [
    "DeepTalkForCausalLM",
    "DeepTalkModel",
    "DeepTalkPreTrainedModel",
    "DeepTalkSparseMoeBlock",
    "DeepTalkExperts",
    "RouterSpec",
    "route_tokens",
]
