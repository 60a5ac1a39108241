# Copyright 2026 The deeptalk authors. Apache-2.0.
"""DeepTalk: a pre-trained MoE LLM whose routed experts are split into a text bank and a speech bank.

Paper: "DeepTalk: Towards Seamless and Smart Speech Interaction with Adaptive Modality-Specific MoE"
(arXiv 2506.21864; v3 is titled "DeepOmni").

This file is copied next to the weights by the Hub export (``trust_remote_code``): it imports only
torch, transformers and ``configuration_deeptalk``.

Read top to bottom:

1. ``allowed_experts`` / ``route_tokens`` -- THE routing policy: which experts a token may choose
   in each ``RoutingMode``, then the source family's own top-k.
2. ``DeepTalkExperts``        -- one modality's bank of routed experts, fused like transformers' experts.
3. ``DeepTalkSparseMoeBlock`` -- one router over all experts in the *source* order, a text bank, a
   speech bank and the source's shared experts. The routing mode and each token's modality arrive
   as call arguments, passed down the decoder layers (as ERNIE-4.5-VL-MoE passes token types).
4. ``DeepTalkDecoderLayer``   -- the source family's attention and norms around a DeepTalk block.
5. ``DeepTalkModel`` / ``DeepTalkForCausalLM`` -- embeddings (text rows and audio rows are separate
   parameters), Whisper input, the decoder, one head over the extended vocabulary, losses.

Router logits, hidden states and attentions are recorded by transformers' output capturing; the
balance loss and the per-modality expert load are derived from the recorded router logits. No
module keeps per-call state, so a model can be shared by threads and a forward may run between a
checkpointed forward and its backward.

Invariant (tested for every family): in ``free`` mode a converted model computes its source's logits.
"""

import inspect
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.integrations.moe import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_deeptalk import (
    IGNORED_TOKEN,
    SPEECH_MODALITY,
    TEXT_MODALITY,
    DeepTalkConfig,
    RoutingMode,
    SpeechTokenLayout,
)

# Names of the shared (always-on) expert modules in the source families' MoE blocks. They are moved
# into the DeepTalk block as they are, so their weights keep their names.
SHARED_EXPERT_MODULES = ("shared_experts", "shared_expert", "shared_expert_gate")
IGNORE_INDEX = -100
MASK_MAKERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
AUDIO_INPUT_NAMES = ("input_features", "audio_feature_lengths", "audio_input_mask", "audio_transcript_ids")


# --------------------------------------------------------------------------------------------------
# 1. The routing policy
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
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
    def from_text_config(cls, text_config) -> "RouterSpec":
        family = text_config.model_type
        if family == "mixtral":  # Mixtral always renormalises its top-k weights
            return cls(top_k=text_config.num_experts_per_tok, norm_topk_prob=True,
                       jitter_noise=getattr(text_config, "router_jitter_noise", 0.0) or 0.0)
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


def allowed_experts(
    mode: RoutingMode, token_modality: torch.Tensor | None, is_speech_expert: torch.Tensor
) -> tuple[torch.Tensor | None, int | None]:
    """THE routing policy: `(allowed, bank)` for one MoE layer.

    `allowed` is a boolean mask `[1 or tokens, experts]` of the experts each token may choose (`None`:
    all of them); `bank` is the modality whose bank holds every expert that can be chosen (`None`:
    both banks may be used). `is_speech_expert` is the layer's placement (`[experts]`, source order).
    Padding tokens (modality -1) route like text tokens in `by_token_modality` mode.
    """
    if mode is RoutingMode.FREE:
        return None, None
    if mode is RoutingMode.SPEECH_ONLY:
        return is_speech_expert.unsqueeze(0), SPEECH_MODALITY
    if mode is RoutingMode.TEXT_ONLY:
        return ~is_speech_expert.unsqueeze(0), TEXT_MODALITY
    speech_token = (token_modality == SPEECH_MODALITY).unsqueeze(-1)
    return is_speech_expert.unsqueeze(0) == speech_token, None


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
    """Top-k over the allowed experts, with the family's semantics.

    1. Disallowed experts' logits become -inf **before** the softmax, as in the authors' code, so the
       weights renormalise over the allowed set.
    2. The family's top-k: group-limited greedy (DeepSeek) when every expert is allowed, plain greedy
       otherwise (a group limit could leave a token with no allowed expert).
    3. Slots that land on a disallowed expert (fewer allowed experts than top-k, e.g. the paper's 6
       speech experts with top-6 routing) are emptied: index -1, weight 0.
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
        group_probs = probs if grouped == num_experts else probs[:, :grouped]
        group_scores = group_probs.reshape(num_tokens, spec.num_groups, -1).max(dim=-1).values
        group_index = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, grouped // spec.num_groups).reshape(num_tokens, -1)
        if grouped < num_experts:
            expert_mask = F.pad(expert_mask, (0, num_experts - grouped), value=1.0)
        choice_scores = probs.masked_fill(~expert_mask.bool(), 0.0)

    expert_weight, expert_index = torch.topk(choice_scores, spec.top_k, dim=-1, sorted=False)
    if allowed is not None:
        filled = allowed.expand_as(probs).gather(1, expert_index)
        expert_index = expert_index.masked_fill(~filled, -1)
        expert_weight = expert_weight.masked_fill(~filled, 0.0)
    if spec.norm_topk_prob:
        expert_weight = expert_weight / expert_weight.sum(dim=-1, keepdim=True)
    if spec.routed_scaling_factor != 1.0:
        expert_weight = expert_weight * spec.routed_scaling_factor
    return RoutingDecision(expert_weight=expert_weight, expert_index=expert_index, probs=probs)


def load_balancing_loss(decision: RoutingDecision, num_allowed: int, token_weight: torch.Tensor | None = None):
    """Switch-style balance loss over one set of allowed experts: `num_allowed * sum_e f_e * P_e`.

    `f_e` is the fraction of token slots sent to expert e and `P_e` its mean routing probability,
    both averaged over tokens with `token_weight` (`None`: all tokens) -- transformers'
    `load_balancing_loss_func` for one layer. Uniform routing gives `min(top_k, num_allowed)`.
    """
    index, probs = decision.expert_index, decision.probs
    slots = F.one_hot(index.clamp(min=0), probs.shape[-1]).to(probs.dtype) * (index >= 0).unsqueeze(-1)
    per_token = slots.sum(dim=1)  # [tokens, experts]
    if token_weight is None:
        fraction, mean_prob = per_token.mean(dim=0), probs.mean(dim=0)
    else:
        weight = token_weight.to(probs.dtype).unsqueeze(-1)
        total = weight.sum().clamp(min=1.0)
        fraction, mean_prob = (weight * per_token).sum(dim=0) / total, (weight * probs).sum(dim=0) / total
    return num_allowed * (fraction * mean_prob).sum()


# --------------------------------------------------------------------------------------------------
# 2. One modality's bank of experts
# --------------------------------------------------------------------------------------------------
@use_experts_implementation
class DeepTalkExperts(nn.Module):
    """A bank of routed experts for one modality, stored fused like transformers' MoE experts.

    `gate_up_proj` is `[num_experts, 2 * intermediate, hidden]` and `down_proj` is
    `[num_experts, hidden, intermediate]`, so the transformers experts kernels (`experts_implementation`)
    run it, PEFT can target it with `target_parameters`, and one modality is frozen by
    `requires_grad_(False)` on its bank. Expert ids `>= num_experts` are sentinels that the kernels
    skip: that is how a bank ignores the slots routed to the other bank. `forward` is the eager reference.
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

    def _finish_init(self):
        self._is_expert_parallel = True  # the kernels' sentinel support, see the class docstring

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final_hidden_states = torch.zeros_like(hidden_states)
        for expert_idx in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == expert_idx)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            out = out * top_k_weights[token_idx, slot, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states


def _new_bank(config, num_experts: int, intermediate_size: int) -> DeepTalkExperts:
    bank = DeepTalkExperts(config, num_experts, intermediate_size)
    bank._finish_init()
    return bank


class DeepTalkRouter(nn.Module):
    """One linear router over all routed experts, in the source model's expert order (kept in fp32).
    Its output, the raw router logits, is what `output_router_logits` records."""

    def __init__(self, hidden_size: int, num_experts: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=std)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if hidden_states.dtype != weight.dtype:  # checked here: a `.to` that changes nothing still dispatches
            hidden_states = hidden_states.to(weight.dtype)
        return F.linear(hidden_states, weight)


# --------------------------------------------------------------------------------------------------
# Two parameters used as one: the banks of a block, the text and audio rows of the head.
# --------------------------------------------------------------------------------------------------
def _exclusively_local(t: torch.Tensor) -> bool:
    """A plain tensor this process holds in full: not meta, not a DTensor, not a DeepSpeed partition."""
    return type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta and not hasattr(t, "ds_id") and t.numel() > 0


def _back_to_back(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether `first` and `second` fill one storage exactly, `second` right after `first`."""
    return (
        first.is_contiguous()
        and second.is_contiguous()
        and first.dtype == second.dtype
        and first.device == second.device
        and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and first.storage_offset() == 0
        and second.storage_offset() == first.numel()
        and first.untyped_storage().nbytes() == (first.numel() + second.numel()) * first.element_size()
    )


def joined_view(first: nn.Parameter, second: nn.Parameter) -> torch.Tensor | None:
    """`torch.cat([first, second])` as a view, with no copy per call, or None where that is unsafe.

    The parameters stay two Parameters (what freezing, optimizers and PEFT need); their data are
    moved once into one storage, back to back (the Parameter objects stay the same, so optimizers and
    ties are unaffected). Tensors an engine partitions, or views into a larger storage (an FSDP flat
    parameter), are left alone: None.
    """
    if not (_exclusively_local(first) and _exclusively_local(second)):
        return None
    if first.is_inference() or second.is_inference():
        return None  # tensors made under inference_mode cannot be re-pointed
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors that training can use later
        if not _back_to_back(first, second):
            if first.untyped_storage().nbytes() != first.numel() * first.element_size() or (
                second.untyped_storage().nbytes() != second.numel() * second.element_size()
            ):
                return None  # a view into someone else's storage
            storage = torch.cat([first.detach(), second.detach()])
            first.data = storage[: first.shape[0]]
            second.data = storage[first.shape[0] :]
        return first.detach().as_strided((first.shape[0] + second.shape[0], *first.shape[1:]), first.stride())


class _JoinedCache:
    """Per-module cache of `joined_view` results, dropped when the module's tensors move (`_apply`)."""

    def _joined(self, key: str, first: nn.Parameter, second: nn.Parameter) -> torch.Tensor | None:
        cache = self.__dict__.setdefault("_joined_views", {})
        if torch.compiler.is_compiling():  # data_ptr cannot be traced: use what eager mode prepared
            entry = cache.get(key)
            return None if entry is None else entry[0]
        entry = cache.get(key)
        if entry is not None and entry[1] == first.data_ptr() and entry[2] == second.data_ptr():
            return entry[0]
        view = joined_view(first, second)
        if view is None:
            cache.pop(key, None)
            return None
        cache[key] = (view, first.data_ptr(), second.data_ptr())
        return view

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_joined_views", None)
        self.__dict__.pop("_packed_module", None)
        return super()._apply(fn, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# 3. The modality-aware MoE block
# --------------------------------------------------------------------------------------------------
class DeepTalkSparseMoeBlock(_JoinedCache, nn.Module):
    """Router + text bank + speech bank + the source's shared experts, for one MoE layer."""

    def __init__(self, config: DeepTalkConfig, moe_layer: int, source_block: nn.Module):
        super().__init__()
        text_config = config.text_config
        self.moe_layer = moe_layer
        self.num_experts = config.num_routed_experts
        self.spec = RouterSpec.from_text_config(text_config)
        self.intermediate_size = source_block.experts.intermediate_dim
        self.bank_config = text_config  # what the experts kernels read (`_experts_implementation`, act)
        self.router = DeepTalkRouter(
            text_config.hidden_size, self.num_experts, getattr(text_config, "initializer_range", 0.02)
        )
        for name in SHARED_EXPERT_MODULES:  # moved over untouched
            if hasattr(source_block, name):
                setattr(self, name, getattr(source_block, name))
        self.register_buffer("is_speech_expert", torch.zeros(self.num_experts, dtype=torch.bool), persistent=False)
        self.register_buffer("local_index", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("packed_index", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self._build_banks(config.expert_modality(moe_layer))

    # ---- expert placement ----------------------------------------------------------------------
    def _build_banks(self, expert_modality: list[int], device=None):
        """Create the banks for a modality map (source index -> modality), randomly initialised, or
        on `device="meta"` when their weights are about to be filled in."""
        self.expert_modality = list(expert_modality)
        self.bank_members = {
            modality: [e for e, m in enumerate(expert_modality) if m == modality]
            for modality in (TEXT_MODALITY, SPEECH_MODALITY)
        }
        with torch.device(device or self.router.weight.device):
            self.text_bank = _new_bank(self.bank_config, len(self.bank_members[TEXT_MODALITY]), self.intermediate_size)
            self.speech_bank = _new_bank(
                self.bank_config, len(self.bank_members[SPEECH_MODALITY]), self.intermediate_size
            )
        self.has_speech_bank = bool(self.bank_members[SPEECH_MODALITY])
        # text experts all before speech experts: the packed order is the source order (no index remap)
        num_text = len(self.bank_members[TEXT_MODALITY])
        self.packed_in_source_order = self.bank_members[TEXT_MODALITY] == list(range(num_text))
        self.fill_placement()
        self.__dict__.pop("_joined_views", None)
        self.__dict__.pop("_packed_module", None)

    @torch.no_grad()
    def fill_placement(self):
        """Fill the placement tables (source index -> is speech, index in its bank, index in the packed
        text-then-speech layout) from `expert_modality`; they are not saved, the config holds the map."""
        if self.is_speech_expert.is_meta:
            return
        num_text = len(self.bank_members[TEXT_MODALITY])
        local = [0] * self.num_experts
        for members in self.bank_members.values():
            for position, expert in enumerate(members):
                local[expert] = position
        packed = [index + (num_text if m == SPEECH_MODALITY else 0) for index, m in zip(local, self.expert_modality)]
        device = self.is_speech_expert.device
        init.copy_(self.is_speech_expert, torch.tensor(self.expert_modality, device=device) == SPEECH_MODALITY)
        init.copy_(self.local_index, torch.tensor(local, device=device))
        init.copy_(self.packed_index, torch.tensor(packed, device=device))

    def banks(self) -> dict[int, DeepTalkExperts]:
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
            placement_device = self.is_speech_expert.device
            self._build_banks(expert_modality, device="meta")  # no throwaway random init
            if self.is_speech_expert.is_meta and placement_device.type != "meta":
                self._apply(lambda t: t.to(placement_device) if t.is_meta else t)
        for bank_name, (gate_up, down) in self.split_source_experts(gate_up_proj, down_proj).items():
            bank = getattr(self, bank_name)
            bank.gate_up_proj = nn.Parameter(gate_up.contiguous())
            bank.down_proj = nn.Parameter(down.contiguous())
        self.__dict__.pop("_joined_views", None)
        self.__dict__.pop("_packed_module", None)

    def split_source_experts(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> dict:
        """Source-order fused expert weights -> `{"text_bank": (gate_up, down), "speech_bank": ...}`,
        each in its bank's order (the one place the expert map splits weights)."""
        split = {}
        for modality, bank_name in ((TEXT_MODALITY, "text_bank"), (SPEECH_MODALITY, "speech_bank")):
            members = torch.tensor(self.bank_members[modality], dtype=torch.long, device=gate_up_proj.device)
            split[bank_name] = (gate_up_proj.index_select(0, members), down_proj.index_select(0, members))
        return split

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        routing_mode: RoutingMode = RoutingMode.FREE,
        token_modality: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        if self.training and self.spec.jitter_noise > 0:  # Mixtral's router jitter
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.spec.jitter_noise, 1.0 + self.spec.jitter_noise)
            hidden_states = hidden_states * noise
        flat = hidden_states.reshape(-1, hidden_dim)
        router_logits = self.router(flat)
        allowed, bank = allowed_experts(routing_mode, token_modality, self.is_speech_expert)
        decision = route_tokens(router_logits, allowed, self.spec)
        index, weight = decision.expert_index, decision.expert_weight
        packed = None
        if bank is None and not torch.is_grad_enabled() and (allowed is None or self.has_speech_bank):
            packed = self._packed_experts()
        if packed is not None:  # inference: both banks as one experts call, like the source's block
            if allowed is not None or not self.packed_in_source_order:  # empty slots (-1) land on a weight 0
                index = torch.take(self._buffers["packed_index"], index)
            output = packed(flat, index, weight)
        else:
            output = self._run_experts(flat, index, weight, bank)
        modules = self._modules  # looked up, not `hasattr`: a missing module costs an AttributeError per call
        if (shared := modules.get("shared_experts")) is not None:  # DeepSeek: always-on shared experts
            output = output + shared(flat)
        if (shared := modules.get("shared_expert")) is not None:  # Qwen2-MoE: sigmoid-gated shared expert
            output = output + torch.sigmoid(modules["shared_expert_gate"](flat)) * shared(flat)
        return output.view(batch_size, seq_len, hidden_dim)

    def _run_experts(self, hidden_states, index, weight, bank: int | None) -> torch.Tensor:
        """Send every (token, expert) slot to the bank holding that expert, with no host sync (training,
        restricted modes, or weights an engine partitions)."""
        if bank is None and not self.has_speech_bank:
            bank = TEXT_MODALITY
        if bank is not None:  # every chosen expert is in one bank; empty slots go to its expert 0, weight 0
            return self.banks()[bank](hidden_states, self.local_index[index.clamp(min=0)], weight)
        # Each bank runs its own slots; the other bank's are sentinels.
        source = index.clamp(min=0)
        speech_slot = self.is_speech_expert[source]
        local = self.local_index[source]
        filled = index >= 0
        text_local = torch.where(filled & ~speech_slot, local, self.text_bank.num_experts)
        speech_local = torch.where(filled & speech_slot, local, self.speech_bank.num_experts)
        return self.text_bank(hidden_states, text_local, weight) + self.speech_bank(hidden_states, speech_local, weight)

    def _packed_experts(self) -> DeepTalkExperts | None:
        """Both banks as ONE experts module (text experts, then speech experts), for inference, or None
        where that needs a copy (weights an engine partitions) or would skip a wrapper (PEFT).

        Built once and cached; reused while the banks are the same modules over the same memory. `_apply`
        (`.to()`, dtype casts) and re-placing experts drop the cache."""
        cached = self.__dict__.get("_packed_module")
        if torch.compiler.is_compiling():  # data_ptr cannot be traced: use what eager mode prepared
            return cached
        modules = self._modules
        text_bank, speech_bank = modules["text_bank"], modules["speech_bank"]
        if cached is not None and cached.source_banks[0] is text_bank and cached.source_banks[1] is speech_bank:
            text, speech = text_bank._parameters, speech_bank._parameters  # no nn.Module.__getattr__ per step
            if cached.source_ptrs == (
                text["gate_up_proj"].data_ptr(),
                text["down_proj"].data_ptr(),
                speech["gate_up_proj"].data_ptr(),
                speech["down_proj"].data_ptr(),
            ):
                return cached  # the hot path: a few identity and pointer checks per layer and step
        self.__dict__.pop("_packed_module", None)
        if not (type(text_bank) is DeepTalkExperts and type(speech_bank) is DeepTalkExperts):
            return None  # e.g. a PEFT adapter wraps a bank: packing raw weights would skip it
        if self.has_speech_bank:
            gate_up = self._joined("gate_up_proj", text_bank.gate_up_proj, speech_bank.gate_up_proj)
            down = self._joined("down_proj", text_bank.down_proj, speech_bank.down_proj)
        else:  # the text bank alone holds every expert, in the source order
            local = _exclusively_local(text_bank.gate_up_proj) and _exclusively_local(text_bank.down_proj)
            gate_up, down = (text_bank.gate_up_proj.detach(), text_bank.down_proj.detach()) if local else (None, None)
        if gate_up is None or down is None:
            return None
        packed = DeepTalkExperts.__new__(DeepTalkExperts)
        nn.Module.__init__(packed)
        packed.__dict__.update({k: v for k, v in text_bank.__dict__.items() if k not in ("_parameters", "_buffers")})
        packed._modules = dict(text_bank._modules)  # the activation
        packed._parameters = {"gate_up_proj": gate_up, "down_proj": down}
        packed.num_experts = gate_up.shape[0]
        packed._is_expert_parallel = False  # no sentinels here: the source's exact kernel path
        packed.source_banks = (text_bank, speech_bank)
        packed.source_ptrs = (
            text_bank.gate_up_proj.data_ptr(),
            text_bank.down_proj.data_ptr(),
            speech_bank.gate_up_proj.data_ptr(),
            speech_bank.down_proj.data_ptr(),
        )
        self.__dict__["_packed_module"] = packed
        return packed

    # ---- what the router did (from recorded router logits) -------------------------------------
    def routing_statistics(self, router_logits, mode: RoutingMode, token_modality, want_aux: bool, want_load: bool):
        """`(aux_loss, expert_load)` of this layer, re-derived from its recorded router logits (the
        routing is a deterministic function of them). `expert_load` is `[2, experts]`: token slots per
        expert by token modality (padding not counted)."""
        allowed, bank = allowed_experts(mode, token_modality, self.is_speech_expert)
        decision = route_tokens(router_logits, allowed, self.spec)
        aux = load = None
        if want_aux and mode is RoutingMode.BY_TOKEN_MODALITY:  # one balance loss per bank over its tokens
            aux, tokens = 0.0, 0.0
            for modality in (TEXT_MODALITY, SPEECH_MODALITY):
                rows = token_modality == modality
                count = rows.sum()
                aux = aux + count * load_balancing_loss(decision, len(self.bank_members[modality]), rows)
                tokens = tokens + count
            aux = aux / tokens.clamp(min=1)
        elif want_aux:
            num_allowed = self.num_experts if bank is None else len(self.bank_members[bank])
            real = None if token_modality is None else token_modality != IGNORED_TOKEN
            aux = load_balancing_loss(decision, num_allowed, real)
        if want_load:
            with torch.no_grad():
                index = decision.expert_index
                modality = token_modality
                if modality is None:
                    modality = torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
                counted = (index >= 0) & (modality != IGNORED_TOKEN).unsqueeze(-1)
                target = modality.clamp(min=0).unsqueeze(-1) * self.num_experts + index.clamp(min=0)
                load = torch.zeros(2 * self.num_experts, device=index.device)
                load.scatter_add_(0, target.reshape(-1), counted.reshape(-1).float())
                load = load.view(2, self.num_experts)
        return aux, load


# --------------------------------------------------------------------------------------------------
# 4. Decoder layer, embeddings and head
# --------------------------------------------------------------------------------------------------
class DeepTalkDecoderLayer(GradientCheckpointingLayer):
    """The source family's pre-norm decoder layer (its attention and norms, moved over untouched)
    around its MLP: a DeepTalk MoE block, which also receives the routing arguments, or the family's
    dense MLP (DeepSeek's first layer, Qwen's `mlp_only_layers`)."""

    def __init__(self, source_layer: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = source_layer.self_attn
        self.input_layernorm = source_layer.input_layernorm
        self.post_attention_layernorm = source_layer.post_attention_layernorm
        self.mlp = mlp
        self.is_moe = isinstance(mlp, DeepTalkSparseMoeBlock)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing_mode: RoutingMode = RoutingMode.FREE,
        token_modality: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            hidden_states = self.mlp(hidden_states, routing_mode, token_modality)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class DeepTalkEmbedding(nn.Embedding):
    """The input embedding of a speech model: `weight` holds the source's text rows, `audio_weight` the
    rows of the audio streams' blocks (ids `>= num_text_rows`). Two parameters, so a phase can train
    the audio rows with the text rows frozen under any engine (DDP, ZeRO, FSDP) with no gradient hook."""

    def __init__(self, num_text_rows: int, num_audio_rows: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__(num_text_rows, embedding_dim, padding_idx)
        self.audio_weight = nn.Parameter(torch.empty(num_audio_rows, embedding_dim))
        nn.init.normal_(self.audio_weight, std=0.02)
        self.num_embeddings = num_text_rows + num_audio_rows  # what it embeds: the whole extended vocabulary

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        num_text = self.weight.shape[0]
        text = F.embedding(input_ids.clamp(max=num_text - 1), self.weight, self.padding_idx)
        audio = F.embedding((input_ids - num_text).clamp(min=0), self.audio_weight)
        return torch.where((input_ids >= num_text).unsqueeze(-1), audio, text)

    def extra_repr(self) -> str:
        return f"text rows {self.weight.shape[0]}, audio rows {self.audio_weight.shape[0]}, dim {self.embedding_dim}"


class DeepTalkLMHead(_JoinedCache, nn.Linear):
    """The output head of a speech model: one matmul over the extended vocabulary, whose text rows
    (`weight`) and audio rows (`audio_weight`) are separate parameters (tied to `DeepTalkEmbedding`'s
    when the embeddings are tied). Inference multiplies by a view of both; training concatenates."""

    def __init__(self, hidden_size: int, num_text_rows: int, num_audio_rows: int):
        super().__init__(hidden_size, num_text_rows, bias=False)
        self.audio_weight = nn.Parameter(torch.empty(num_audio_rows, hidden_size))
        nn.init.normal_(self.audio_weight, std=0.02)
        self.out_features = num_text_rows + num_audio_rows  # what it scores: the whole extended vocabulary

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = None
        if not torch.is_grad_enabled():
            weight = self._joined("weight", self.weight, self.audio_weight)
        if weight is None:
            weight = torch.cat([self.weight, self.audio_weight])
        return F.linear(hidden_states, weight)

    def extra_repr(self) -> str:
        return f"hidden {self.in_features}, text rows {self.weight.shape[0]}, audio rows {self.audio_weight.shape[0]}"


# --------------------------------------------------------------------------------------------------
# 5. Speech input: Whisper encoder frames -> LLM positions
# --------------------------------------------------------------------------------------------------
class DeepTalkAudioEncoder(WhisperEncoder):
    """Whisper's encoder run on each clip's real length (Whisper pads to 30 s; short spoken questions
    need not pay for that). Its layers' outputs are inputs of DeepTalk, not recorded outputs."""

    _can_record_outputs = {}
    _no_split_modules = ["WhisperEncoderLayer"]

    def encode(self, input_features: torch.Tensor, feature_lengths: torch.Tensor, pad_to_30s: bool = False):
        """Log-mel `[batch, mel_bins, frames]` -> (`[batch, steps, d_model]`, encoder lengths `[batch]`)."""
        batch, _, frames = input_features.shape
        if pad_to_30s:
            input_features = F.pad(input_features, (0, max(0, 3000 - frames)))[..., :3000]
            feature_lengths = torch.full_like(feature_lengths, 3000)
        input_features = input_features.to(self.conv1.weight.dtype)
        hidden = F.gelu(self.conv1(input_features))
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)
        steps = hidden.shape[1]
        if steps > self.embed_positions.num_embeddings:
            raise ValueError(
                f"Audio of {frames} mel frames is longer than the encoder's window "
                f"({2 * self.embed_positions.num_embeddings} frames = 30 s): split it into shorter clips."
            )
        hidden = hidden + self.embed_positions.weight[:steps]
        encoder_lengths = (feature_lengths - 1) // 2 + 1
        keep = torch.arange(steps, device=hidden.device)[None, :] < encoder_lengths[:, None]
        attention_mask = torch.zeros(batch, 1, 1, steps, dtype=hidden.dtype, device=hidden.device)
        attention_mask = attention_mask.masked_fill(~keep[:, None, None, :], torch.finfo(hidden.dtype).min)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)
        return self.layer_norm(hidden), encoder_lengths


class DeepTalkAudioAdapter(nn.Module):
    """Stacks `stride` consecutive 50 Hz Whisper frames into one LLM position and projects them into
    the LLM's hidden size with a two-layer MLP (the paper calls its adapter an MLP that downsamples).
    With `ctc_vocab_size` it also has `ctc_head`, a CTC classifier over the text vocabulary whose last
    class is the blank (`config.audio_adapter == "ctc"`)."""

    def __init__(self, audio_hidden_size: int, hidden_size: int, stride: int, ctc_vocab_size: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.stride = stride
        self.dropout = nn.Dropout(dropout)
        self.proj_in = nn.Linear(stride * audio_hidden_size, hidden_size)
        self.act = nn.GELU()
        self.proj_out = nn.Linear(hidden_size, hidden_size)
        if ctc_vocab_size is not None:
            self.ctc_head = nn.Linear(hidden_size, ctc_vocab_size + 1)

    def num_positions(self, lengths: torch.Tensor) -> torch.Tensor:
        """LLM positions of clips with `lengths` encoder frames."""
        return -(-lengths // self.stride)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`[clips, steps, audio_hidden]` encoder frames (clip b's first `lengths[b]` are real) -> the
        LLM positions of every clip in order, `[sum of ceil(lengths / stride), hidden]`; each clip's
        last group is zero-padded."""
        clips, steps, width = frames.shape
        real = torch.arange(steps, device=frames.device)[None, :] < lengths[:, None]
        frames = F.pad(frames * real.unsqueeze(-1).to(frames.dtype), (0, 0, 0, (-steps) % self.stride))
        grouped = frames.reshape(clips, -1, self.stride * width)
        positions = torch.arange(grouped.shape[1], device=frames.device)[None, :] < self.num_positions(lengths)[:, None]
        return self.proj_out(self.act(self.proj_in(self.dropout(grouped[positions]))))


def greedy_ctc_emissions(ctc_logits: torch.Tensor, clip_positions: torch.Tensor) -> torch.Tensor:
    """`[positions, classes]` CTC logits of clips laid end to end (blank = last class) -> which positions
    emit a token under greedy decoding: the best class is not the blank and not the previous position's
    best in the same clip."""
    best = ctc_logits.argmax(dim=-1)
    first = torch.zeros_like(best, dtype=torch.bool)
    first[clip_positions.cumsum(0) - clip_positions] = True
    return (best != ctc_logits.shape[-1] - 1) & (first | (best != best.roll(1)))


def span_markers(first_audio_stream: torch.Tensor, audio_input_mask: torch.Tensor, marker_ids: torch.Tensor):
    """`[B, T]` the clips' `<|boa|>` / `<|eoa|>` marker positions: right before or after a run of audio-input
    positions, with a marker id (`marker_ids`) on the first audio stream (`first_audio_stream`, `[B, T]`)."""
    audio = audio_input_mask.bool()
    beside = (F.pad(audio[:, 1:], (0, 1)) | F.pad(audio[:, :-1], (1, 0))) & ~audio
    return beside & torch.isin(first_audio_stream, marker_ids)


def right_aligned_destinations(emitted: torch.Tensor, clip_positions: torch.Tensor) -> torch.Tensor:
    """Where each position goes when every clip's emitted positions move, in order, to the end of the
    clip's span (indices into the clips' concatenated positions; meaningful where `emitted`)."""
    clip = torch.repeat_interleave(torch.arange(len(clip_positions), device=emitted.device), clip_positions,
                                   output_size=emitted.shape[0])
    counts = torch.zeros_like(clip_positions).index_add_(0, clip, emitted.long())
    rank = emitted.long().cumsum(0) - 1 - (counts.cumsum(0) - counts)[clip]
    return (clip_positions.cumsum(0) - counts)[clip] + rank


def audio_ctc_loss(ctc_logits: torch.Tensor, clip_positions: torch.Tensor, transcript_ids: torch.Tensor):
    """CTC loss per transcript token over the clips that have a transcript (`transcript_ids` rows, padded
    with -100; an all -100 row has none). `ctc_logits`: `[positions, classes]` of the clips laid end to end."""
    if transcript_ids.dim() != 2 or transcript_ids.shape[0] != clip_positions.shape[0]:
        raise ValueError(
            f"audio_transcript_ids has shape {tuple(transcript_ids.shape)}; give one row per audio clip "
            f"({clip_positions.shape[0]} clips), padded with {IGNORE_INDEX}."
        )
    target_lengths = (transcript_ids != IGNORE_INDEX).sum(dim=-1)
    has = target_lengths > 0
    if not bool(has.any()):
        return ctc_logits.sum() * 0.0
    per_clip = ctc_logits.log_softmax(dim=-1).split(clip_positions.tolist())
    log_probs = nn.utils.rnn.pad_sequence(per_clip)  # [positions, clips, classes]
    loss = F.ctc_loss(log_probs[:, has], transcript_ids[has].clamp_min(0), clip_positions[has], target_lengths[has],
                      blank=ctc_logits.shape[-1] - 1, reduction="sum", zero_infinity=True)
    return loss / target_lengths[has].sum()


# --------------------------------------------------------------------------------------------------
# 6. Model
# --------------------------------------------------------------------------------------------------
def _set_output_attribute(output, name: str, value) -> None:
    """`ModelOutput.__setattr__` with the field names read from the class: the base lists the dataclass fields
    again at every assignment, O(fields²) per output built, and a forward builds one at every decode step."""
    name = output._replace_old_cache_name(name)
    if value is not None and name in type(output).__dataclass_fields__:
        OrderedDict.__setitem__(output, name, value)
    object.__setattr__(output, name, value)


@dataclass
class DeepTalkModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus the per-token modality the routing used.

    token_modality (`torch.LongTensor` of shape `(batch_size * sequence_length,)`, *optional*):
        0 text, 1 speech, -1 padding; returned when router logits are recorded or routing needed it.
    audio_ctc_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The CTC adapter's loss on `audio_transcript_ids` (`config.audio_adapter == "ctc"`).
    """

    token_modality: torch.LongTensor | None = None
    audio_ctc_loss: torch.FloatTensor | None = None

    __setattr__ = _set_output_attribute


@dataclass
class DeepTalkCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus `expert_load` and `stream_losses`.

    expert_load (`torch.FloatTensor` of shape `(num_moe_layers, 2, num_experts)`, *optional*):
        How many token slots chose each expert (source order), split by token modality (0 = text,
        1 = speech). Returned with `output_expert_load=True`; the input of the expert assignment.
    stream_losses (`torch.FloatTensor` of shape `(1 + N,)`, *optional*):
        With multi-stream labels: this batch's mean cross-entropy of each stream (text, then each audio
        stream), NaN for a stream without labels; detached, for logging.
    audio_ctc_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The CTC adapter's loss on `audio_transcript_ids`, added to `loss` times `config.audio_ctc_loss_weight`.
    """

    expert_load: torch.FloatTensor | None = None
    stream_losses: torch.FloatTensor | None = None
    audio_ctc_loss: torch.FloatTensor | None = None

    __setattr__ = _set_output_attribute


class DeepTalkPreTrainedModel(PreTrainedModel):
    config_class = DeepTalkConfig
    config: DeepTalkConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepTalkDecoderLayer"]  # a speech model adds its encoder's WhisperEncoderLayer
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _keep_in_fp32_modules_strict = ["router"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(DeepTalkRouter, index=0),
        "hidden_states": DeepTalkDecoderLayer,
        "attentions": OutputRecorder(None, index=1, class_name="self_attn"),
    }

    # The family's attention modules and DeepTalk's banks read the kernel choices from `text_config`,
    # which has no model object of its own: mirror the top-level choice onto it.
    def set_attn_implementation(self, attn_implementation, allow_all_kernels: bool = False):
        if isinstance(attn_implementation, str):
            text = self.config.text_config._attn_implementation
            attn_implementation = {"": attn_implementation, "audio_config": attn_implementation, "text_config": text}
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
        self.config.text_config._attn_implementation_internal = self.config._attn_implementation

    def set_experts_implementation(self, experts_implementation):
        super().set_experts_implementation(experts_implementation)
        self.config.text_config._experts_implementation_internal = self.config._experts_implementation

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.get_text_config().initializer_range
        if isinstance(module, DeepTalkExperts):
            init.normal_(module.gate_up_proj, std=std)
            init.normal_(module.down_proj, std=std)
        elif isinstance(module, DeepTalkRouter):
            init.normal_(module.weight, std=std)
        elif isinstance(module, (DeepTalkEmbedding, DeepTalkLMHead)):
            init.normal_(module.audio_weight, std=std)
        elif isinstance(module, DeepTalkSparseMoeBlock):
            module.fill_placement()
        elif isinstance(module, DeepTalkModel):
            module.fill_stream_tables()


def _tp_plan_for_banks(plan: dict | None) -> dict:
    """A family's `base_model_tp_plan`/`ep_plan` with its fused `mlp.experts` entries repeated for both
    banks (the router is replicated: DeepTalk's is `mlp.router`, the family's `mlp.gate` is gone)."""
    out = {}
    for key, style in (plan or {}).items():
        if ".mlp.experts" in key:
            for bank in ("text_bank", "speech_bank"):
                out[key.replace(".mlp.experts", f".mlp.{bank}")] = style
        elif not key.endswith(".mlp.gate") and ".mlp.gate." not in key:
            out[key] = style
    return out


class DeepTalkModel(DeepTalkPreTrainedModel):
    """The source family's decoder (embedding, attention, norms, rotary) with DeepTalk MoE blocks,
    DeepTalk's multi-stream embedding and the Whisper input path."""

    def __init__(self, config: DeepTalkConfig):
        super().__init__(config)
        text_config = config.text_config
        family_model = AutoModel.from_config(text_config)  # built for its parts, then dropped
        found = [
            i
            for i, layer in enumerate(family_model.layers)
            if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")
        ]
        if found != config.moe_layer_indices:
            raise ValueError(
                f"The {config.family} decoder has MoE blocks at layers {found}, but the config expects "
                f"{config.moe_layer_indices}. This transformers version builds the family differently; "
                "please report it."
            )
        self.padding_idx = getattr(text_config, "pad_token_id", None)
        self.embed_tokens = family_model.embed_tokens
        moe_layer = {layer_idx: n for n, layer_idx in enumerate(found)}
        self.layers = nn.ModuleList(
            DeepTalkDecoderLayer(
                layer,
                DeepTalkSparseMoeBlock(config, moe_layer[i], layer.mlp) if i in moe_layer else layer.mlp,
            )
            for i, layer in enumerate(family_model.layers)
        )
        self.norm = family_model.norm
        self.rotary_emb = family_model.rotary_emb
        # each layer's mask kind, as its attention module was built (read per step: kept off the config)
        self.layer_mask_kinds = tuple(config.decoder_layer_types)
        self.register_buffer("stream_offsets", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("stream_pad_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        if config.speech_layout is not None:
            self._build_speech_input()
        self.gradient_checkpointing = False
        text_config._attn_implementation_internal = config._attn_implementation
        text_config._experts_implementation_internal = config._experts_implementation
        self.post_init()

    def init_parallel_plans(self):
        super().init_parallel_plans()
        text_config = self.config.text_config
        self._tp_plan.update(_tp_plan_for_banks(getattr(text_config, "base_model_tp_plan", None)))
        self._ep_plan.update(_tp_plan_for_banks(getattr(text_config, "base_model_ep_plan", None)))
        if self.config.speech_layout is not None:  # a vocabulary-sharded table cannot hold two row blocks
            self._tp_plan.pop("embed_tokens", None)
        elif self._tp_plan:  # as transformers does for a family's base model, whose plan sits on its own config
            self._tp_plan = {"embed_tokens": "embedding_rowwise", **self._tp_plan}
        # the family's plan names modules its configs may lack (q_b_proj without q_lora_rank, dense MLPs of a
        # model with none): keep what this model holds, as transformers matches it (layer indices as `*`)
        present = {re.sub(r"\d+", "*", name) for name, _ in [*self.named_modules(), *self.named_parameters()]}
        for plan in (self._tp_plan, self._ep_plan):
            for key in [key for key in plan if key not in present]:
                del plan[key]

    def _build_speech_input(self, audio_rows: torch.Tensor | None = None):
        """The speech-side modules a `speech_layout` / `audio_config` call for. At construction the tables
        are empty (weights are loaded or initialised next); `add_speech` passes the new `audio_rows` and
        keeps the existing text rows."""
        layout = self.config.layout
        hidden = self.config.text_config.hidden_size
        keep_text_rows = self.embed_tokens.weight.shape[0] == layout.text_vocab_size
        with torch.device("meta"):
            embedding = DeepTalkEmbedding(
                layout.text_vocab_size, layout.vocab_size - layout.text_vocab_size, hidden, self.padding_idx
            )
        device, dtype = self.embed_tokens.weight.device, self.embed_tokens.weight.dtype
        embedding.weight = self.embed_tokens.weight if keep_text_rows else nn.Parameter(
            torch.empty(layout.text_vocab_size, hidden, device=device, dtype=dtype))
        embedding.audio_weight = nn.Parameter(audio_rows if audio_rows is not None else torch.empty(
            layout.vocab_size - layout.text_vocab_size, hidden, device=device, dtype=dtype))
        self.embed_tokens = embedding
        n = layout.num_audio_streams
        self.stream_offsets = torch.zeros(n, dtype=torch.long, device=device)
        self.stream_pad_ids = torch.zeros(1 + n, dtype=torch.long, device=device)
        self.fill_stream_tables()
        if self.config.audio_config is not None and not hasattr(self, "audio_encoder"):
            self.audio_encoder = DeepTalkAudioEncoder(self.config.audio_config)
            self.audio_adapter = DeepTalkAudioAdapter(
                self.config.audio_config.d_model, self.config.text_config.hidden_size, self.config.audio_adapter_stride,
                ctc_vocab_size=layout.text_vocab_size if self.config.audio_adapter == "ctc" else None,
                dropout=self.config.audio_adapter_dropout,
            )

    @torch.no_grad()
    def fill_stream_tables(self):
        """First global id of each audio stream, and the PAD_A id of each stream (-1 for the text slot)."""
        layout = self.config.layout
        if layout is None or self.stream_offsets.is_meta:
            return
        n = layout.num_audio_streams
        init.copy_(self.stream_offsets, torch.tensor([layout.stream_offset(i + 1) for i in range(n)]))
        init.copy_(self.stream_pad_ids, torch.tensor([-1, *layout.audio_special_ids("<|pad_a|>").tolist()]))

    def moe_blocks(self) -> list[DeepTalkSparseMoeBlock]:
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # ---- inputs ------------------------------------------------------------------------------
    def encode_audio(self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel `[batch, mel_bins, frames]` -> adapter outputs of every clip, concatenated in batch
        order: `[sum of config.num_audio_positions(length), hidden]`."""
        return self.encode_audio_clips(input_features, feature_lengths)[0]

    def encode_audio_clips(self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None):
        """`encode_audio`, plus each clip's number of positions `[batch]`."""
        if not hasattr(self, "audio_encoder"):
            raise ValueError("This model has no audio encoder: build it with an audio_config (see add_speech).")
        batch, _, frames = input_features.shape
        if feature_lengths is None:
            feature_lengths = torch.full((batch,), frames, dtype=torch.long)
        feature_lengths = feature_lengths.to(input_features.device).long()
        hidden, lengths = self.audio_encoder.encode(input_features, feature_lengths, self.config.audio_pad_to_30s)
        return self.audio_adapter(hidden, lengths), self.audio_adapter.num_positions(lengths)

    def ctc_typed_positions(self, ctc_logits: torch.Tensor, clip_positions: torch.Tensor, placeholders: torch.Tensor):
        """The CTC adapter's LLM positions: each token greedy CTC emits becomes that token's text embedding,
        embedded as a typed text column would be (the gradient flows through its posterior, straight-through);
        a clip's emitted tokens fill the end of its span and the positions before keep their `placeholders`
        embedding. Returns `(embeddings, unused)`, `unused` marking the positions no emitted token landed on."""
        emitted = greedy_ctc_emissions(ctc_logits, clip_positions)
        destinations = right_aligned_destinations(emitted, clip_positions)
        unused = torch.ones_like(emitted).index_fill(0, destinations[emitted], False)
        posterior = ctc_logits[:, :-1].softmax(dim=-1)
        chosen = F.one_hot(posterior.argmax(dim=-1), posterior.shape[-1]).to(posterior.dtype)
        # exactly the token's row forward (a frozen LLM reads its own embedding), the posterior's gradient back
        typed = (chosen + posterior - posterior.detach()).to(placeholders.dtype) @ self.embed_tokens.weight
        num_audio = self.config.num_audio_streams
        if num_audio and self.config.stream_embedding_mean == "all":  # a typed column carries PAD_A on every stream
            pad_a = self.embed_tokens.audio_weight[self.stream_pad_ids[1:] - self.config.text_vocab_size]
            typed = (typed + pad_a.sum(dim=0)) / (num_audio + 1)
        return placeholders.index_put((destinations[emitted],), typed[emitted]), unused

    @torch.no_grad()
    def heard_token_ids(self, input_features: torch.Tensor,
                        audio_feature_lengths: torch.Tensor | None = None) -> list[list[int]]:
        """What the CTC adapter hears in each clip: the text token ids greedy CTC emits (repeats merged, blanks
        dropped), which are the words the LLM reads at the clip's positions. `input_features`: log-mel
        `[clips, mel_bins, frames]`, as the processor returns them."""
        if self.config.audio_adapter != "ctc":
            raise ValueError(f"heard_token_ids needs the CTC adapter (config.audio_adapter='ctc'); this model's "
                             f"adapter is {self.config.audio_adapter!r}, which feeds the LLM embeddings, not tokens.")
        features, clip_positions = self.encode_audio_clips(input_features, audio_feature_lengths)
        ctc_logits = self.audio_adapter.ctc_head(features)
        emitted, best = greedy_ctc_emissions(ctc_logits, clip_positions), ctc_logits.argmax(dim=-1)
        sizes = clip_positions.tolist()
        return [ids[keep].tolist() for ids, keep in zip(best.split(sizes), emitted.split(sizes))]

    def mean_stream_embedding(
        self, input_ids: torch.LongTensor, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, 1 + N, T]` ids -> `[B, T, H]`: the mean of the streams' embeddings, leaving PAD_A slots
        out when `config.stream_embedding_mean == "non_pad"` (the text slot always counts). `embeddings`:
        `embed_tokens(input_ids)` when the caller already has it."""
        if embeddings is None:
            embeddings = self.embed_tokens(input_ids)
        if self.config.stream_embedding_mean == "all":
            return embeddings.mean(dim=1)
        weight = (input_ids != self.stream_pad_ids[None, :, None]).to(embeddings.dtype).unsqueeze(-1)
        return (embeddings * weight).sum(dim=1) / weight.sum(dim=1)

    def embed_inputs(self, input_ids, input_features=None, audio_feature_lengths=None, audio_input_mask=None):
        """Input embeddings of text ids `[B, T]` or multi-stream ids `[B, 1 + N, T]`, with audio features
        spliced in at `audio_input_mask` positions.

        At an audio-input position the N audio slots take the adapter output while the text slot keeps
        its placeholder embedding, as in the authors' code: `(text_embedding + N * feature) / (1 + N)`.
        The CTC adapter (`config.audio_adapter == "ctc"`) fills the positions with `ctc_typed_positions`.
        """
        return self.embed_inputs_and_ctc_loss(input_ids, input_features, audio_feature_lengths, audio_input_mask)[0]

    def embed_prompt(self, input_ids, attention_mask=None, input_features=None, audio_feature_lengths=None,
                     audio_input_mask=None):
        """`(inputs_embeds, attention_mask)` for `generate(inputs_embeds=...)`: `embed_inputs`, and the attention
        mask with the placeholders the CTC adapter hides set to 0 (generate then skips them in the positions)."""
        embeds, _, hidden = self.embed_inputs_and_ctc_loss(input_ids, input_features, audio_feature_lengths,
                                                           audio_input_mask)
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if hidden is not None:
            attention_mask = attention_mask.masked_fill(hidden, 0)
        return embeds, attention_mask

    def embed_inputs_and_ctc_loss(self, input_ids, input_features=None, audio_feature_lengths=None,
                                  audio_input_mask=None, audio_transcript_ids=None):
        """`(embed_inputs(...), the CTC adapter's loss on audio_transcript_ids or None, hidden)`: `hidden`
        `[B, T]` marks the audio placeholders the CTC adapter leaves empty when
        `config.audio_ctc_hide_placeholders` (attention and positions skip them), and the clips' span markers
        with `config.audio_ctc_hide_span_markers`; else None."""
        # the table is looked up once per call: under FSDP each lookup of a sharded table is a collective,
        # so a second lookup for the audio positions would desync ranks whose batches hold no audio
        if input_ids.dim() == 3:
            stream_embeddings = self.embed_tokens(input_ids)
            inputs_embeds = self.mean_stream_embedding(input_ids, stream_embeddings)
            text_embeds = stream_embeddings[:, 0]
        else:
            inputs_embeds = text_embeds = self.embed_tokens(input_ids)
        ctc = self.config.audio_adapter == "ctc"
        if input_features is None:
            if "audio_encoder" in self._modules and (self.training or _distributed()):
                # every rank runs the same modules each step, whatever its batch holds, or collectives desync
                features = self.encode_audio(inputs_embeds.new_zeros(1, self.config.audio_config.num_mel_bins, 2))
                unused = features.sum() + (self.audio_adapter.ctc_head(features).sum() if ctc else 0.0)
                inputs_embeds = inputs_embeds + 0.0 * unused.to(inputs_embeds.dtype)
            return inputs_embeds, None, None
        if audio_input_mask is None:
            raise ValueError("input_features need audio_input_mask: which positions receive the audio features.")
        features, clip_positions = self.encode_audio_clips(input_features, audio_feature_lengths)
        features = features.to(inputs_embeds.dtype)
        positions = int(audio_input_mask.sum())  # audio prefill only: the decode steps carry no features
        if features.shape[0] != positions:
            raise ValueError(
                f"The audio gives {features.shape[0]} adapter frames but audio_input_mask marks {positions} positions. "
                "Build inputs with DeepTalkProcessor, or mark config.num_audio_positions(mel_frames) positions "
                "per clip."
            )
        mask = audio_input_mask.unsqueeze(-1).expand_as(inputs_embeds)
        if ctc:
            ctc_logits = self.audio_adapter.ctc_head(features).float()
            ctc_loss = None
            if audio_transcript_ids is not None:
                ctc_loss = audio_ctc_loss(ctc_logits, clip_positions, audio_transcript_ids.to(ctc_logits.device))
            typed, unused = self.ctc_typed_positions(ctc_logits, clip_positions, inputs_embeds[audio_input_mask])
            hidden = None
            if self.config.audio_ctc_hide_placeholders:
                hidden = torch.zeros_like(audio_input_mask, dtype=torch.bool).masked_scatter(audio_input_mask, unused)
                if self.config.audio_ctc_hide_span_markers and input_ids.dim() == 3:
                    layout = self.config.layout
                    markers = torch.tensor([layout.audio_special_id(name, 0) for name in ("<|boa|>", "<|eoa|>")],
                                           device=input_ids.device)
                    hidden = hidden | span_markers(input_ids[:, 1], audio_input_mask, markers)
            return inputs_embeds.masked_scatter(mask, typed), ctc_loss, hidden
        num_audio = self.config.num_audio_streams
        if num_audio:
            text_slot = text_embeds[audio_input_mask]
            features = (text_slot + num_audio * features) / (num_audio + 1)
        return inputs_embeds.masked_scatter(mask, features), None, None

    def token_modality_from_inputs(
        self, input_ids, inputs_embeds, attention_mask, token_modality, audio_input_mask=None
    ):
        """Per-token modality (0 text, 1 speech, -1 padding), flattened like the MoE blocks' input.

        Without an explicit `token_modality`, a position is speech when it receives audio features or
        when any audio stream carries a codec code there. Padding (`attention_mask == 0`) is always -1.
        """
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if reference.dim() == 3:
            reference = reference[:, 0]
        if token_modality is not None:
            modality = token_modality.to(reference.device).long()
            if modality.shape[-1] > reference.shape[-1]:  # generation with a cache: keep the new steps
                modality = modality[..., -reference.shape[-1] :]
            if modality.shape != reference.shape:
                raise ValueError(
                    f"token_modality has shape {tuple(modality.shape)} but the input has {tuple(reference.shape)}: "
                    "give one modality (0 text, 1 speech, -1 padding) per input position."
                )
            if ((modality < IGNORED_TOKEN) | (modality > SPEECH_MODALITY)).any():
                raise ValueError(
                    f"token_modality holds {modality.unique().tolist()}; use 0 (text), 1 (speech) or -1 (padding)."
                )
        else:
            modality = torch.full(reference.shape, TEXT_MODALITY, dtype=torch.long, device=reference.device)
            if input_ids is not None and input_ids.dim() == 3 and self.config.num_audio_streams:
                codes = input_ids[:, 1:] - self.stream_offsets[None, :, None]
                speech = ((codes >= 0) & (codes < self.config.speech_layout["codebook_size"])).any(dim=1)
                modality = modality.masked_fill(speech, SPEECH_MODALITY)
            if audio_input_mask is not None:
                modality = modality.masked_fill(audio_input_mask.bool(), SPEECH_MODALITY)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == reference.shape:
            modality = modality.masked_fill(attention_mask == 0, IGNORED_TOKEN)
        return modality.reshape(-1)

    @staticmethod
    def _hidden_placeholders(hidden, stored, cache, past_seen_tokens: int, new_tokens: int):
        """`[B, past + new]` hidden CTC placeholders of the whole sequence so far, from this call's (`hidden`)
        and those `stored` on the cache. A prompt's are kept on its cache, so the decode steps after it skip
        them too, whoever drives the loop."""
        parts = []
        if stored is not None:
            parts.append(F.pad(stored, (0, max(0, past_seen_tokens - stored.shape[1])))[:, :past_seen_tokens])
        elif past_seen_tokens:
            parts.append(hidden.new_zeros(hidden.shape[0], past_seen_tokens))
        parts.append(hidden if hidden is not None else stored.new_zeros(stored.shape[0], new_tokens))
        full = torch.cat(parts, dim=1)
        if hidden is not None and cache is not None:
            cache.deeptalk_hidden_placeholders = full
        return full

    @staticmethod
    def _skip_hidden(hidden, attention_mask, position_ids, past_seen_tokens: int):
        """The attention mask without the hidden placeholders, and positions that do not count them."""
        batch, total = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long, device=hidden.device)
        elif not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise ValueError("The CTC adapter hides placeholders through a 2D attention mask: pass a 2D mask or none.")
        if attention_mask.shape[1] == total:
            attention_mask = attention_mask.masked_fill(hidden.expand_as(attention_mask), 0)
        shift = hidden.long().cumsum(dim=-1)[:, past_seen_tokens:]
        if position_ids is None:
            position_ids = torch.arange(past_seen_tokens, total, device=hidden.device).unsqueeze(0)
        return attention_mask, position_ids - shift

    def _attention_masks(self, inputs_embeds, attention_mask, cache, position_ids) -> list:
        kinds = self.layer_mask_kinds
        if isinstance(attention_mask, dict):  # already built, e.g. by generate()
            return [attention_mask[kind] for kind in kinds]
        config = self.config.text_config
        built = {
            kind: MASK_MAKERS[kind](config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    cache=cache, position_ids=position_ids)
            for kind in dict.fromkeys(kinds)
        }
        return [built[kind] for kind in kinds]

    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        token_modality: torch.LongTensor | None = None,
        routing_mode: str | RoutingMode | None = None,
        input_features: torch.FloatTensor | None = None,
        audio_feature_lengths: torch.LongTensor | None = None,
        audio_input_mask: torch.BoolTensor | None = None,
        audio_transcript_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> DeepTalkModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, [1 + N,] sequence_length)`):
            Text ids `(batch_size, sequence_length)`, or multi-stream ids `(batch_size, 1 + N, sequence_length)`
            (text stream + N audio streams, global vocabulary ids).
        input_features (`torch.FloatTensor` of shape `(batch_size, mel_bins, frames)`, *optional*):
            Log-mel features of the user's audio (`WhisperFeatureExtractor`).
        audio_feature_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Real mel frames of each clip (the rest is padding).
        audio_input_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions that receive the audio features, in order.
        audio_transcript_ids (`torch.LongTensor` of shape `(num_clips, max_transcript_tokens)`, *optional*):
            Each clip's transcript in text ids, padded with -100 (a row of -100: no transcript); the CTC
            adapter's training targets (`audio_ctc_loss`). Other adapters ignore it.
        token_modality (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            0 text, 1 speech, -1 padding. Used by `by_token_modality` routing and to split the expert
            load by modality. Defaults to what the inputs say (audio input and codec codes are speech).
        routing_mode (`str`, *optional*):
            Overrides `config.routing_mode` for this call (see `RoutingMode`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids or inputs_embeds.")
        mode = routing_mode if isinstance(routing_mode, RoutingMode) else RoutingMode.parse(
            routing_mode or self.config.routing_mode
        )
        if mode.needs_speech_experts and not self.config.speech_experts:
            raise ValueError(
                f"routing_mode={mode.value!r} needs speech experts; none are assigned. Pass speech_experts when "
                "converting, or run the assignment step first."
            )
        modality = None
        if "output_router_logits" in kwargs:  # DeepTalkForCausalLM always says; the layers need not carry it
            wants_records = kwargs.pop("output_router_logits")
        else:
            wants_records = self.config.output_router_logits
        ctc_loss = hidden = None
        if inputs_embeds is None:
            inputs_embeds, ctc_loss, hidden = self.embed_inputs_and_ctc_loss(
                input_ids, input_features, audio_feature_lengths, audio_input_mask, audio_transcript_ids
            )
        elif input_features is not None:
            raise ValueError(
                "input_features are spliced into input_ids' embeddings: pass input_ids, not inputs_embeds."
            )

        if use_cache is None:
            use_cache = getattr(self.config.text_config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        # a dict lookup, not getattr: the decode hot path pays nothing for models without the CTC adapter
        stored = getattr(cache, "__dict__", {}).get("deeptalk_hidden_placeholders") if cache is not None else None
        if hidden is not None or stored is not None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            hidden = self._hidden_placeholders(hidden, stored, cache, past_seen_tokens, inputs_embeds.shape[1])
            attention_mask, position_ids = self._skip_hidden(hidden, attention_mask, position_ids, past_seen_tokens)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (positions + past_seen_tokens).unsqueeze(0)
        if token_modality is not None or mode is RoutingMode.BY_TOKEN_MODALITY or wants_records:
            modality = self.token_modality_from_inputs(
                input_ids, inputs_embeds, attention_mask, token_modality, audio_input_mask
            )
        masks = self._attention_masks(inputs_embeds, attention_mask, cache, position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer, mask in zip(self.layers, masks):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                routing_mode=mode,
                token_modality=modality,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return DeepTalkModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, token_modality=modality, audio_ctc_loss=ctc_loss
        )

    def routing_statistics(self, router_logits, mode: RoutingMode, token_modality, want_aux: bool, want_load: bool):
        """`(aux_loss, expert_load)` from recorded router logits: the balance loss averaged over MoE
        layers, and the `[layers, 2, experts]` per-modality load."""
        stats = [block.routing_statistics(logits, mode, token_modality, want_aux, want_load)
                 for block, logits in zip(self.moe_blocks(), router_logits)]
        aux = torch.stack([a for a, _ in stats]).mean() if want_aux else None
        load = torch.stack([load for _, load in stats]) if want_load else None
        return aux, load


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


# --------------------------------------------------------------------------------------------------
# 7. Losses over the stream layout
# --------------------------------------------------------------------------------------------------
def shifted_stream_targets(logits: torch.Tensor, labels: torch.LongTensor, layout: SpeechTokenLayout, stream: int):
    """`(stream_logits [B, T-1, V_s], targets [B, T-1])`: stream `stream`'s slice of the logits at each
    position and the next position's label as an index into that slice (-100 = ignored). THE one
    place that slices logits by stream, shifts and masks; losses, DPO and metrics build on it."""
    start, end = layout.stream_range(stream)
    target = labels[:, stream, 1:]
    valid = target != IGNORE_INDEX
    local = torch.where(valid, target - start, IGNORE_INDEX)
    return logits[:, :-1, start:end], local


def stream_token_log_probs(logits: torch.Tensor, labels: torch.LongTensor, layout: SpeechTokenLayout):
    """`(log_probs, valid)`, each `[B, 1 + N, T-1]`: each labelled token's log-probability within its
    stream's vocabulary, and which positions are labelled."""
    log_probs, valid = [], []
    for stream in range(layout.num_streams):
        stream_logits, target = shifted_stream_targets(logits, labels, layout, stream)
        mask = target != IGNORE_INDEX
        logp = F.log_softmax(stream_logits.float(), dim=-1)
        log_probs.append(logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask)
        valid.append(mask)
    return torch.stack(log_probs, dim=1), torch.stack(valid, dim=1)


def stream_num_items(labels: torch.LongTensor) -> torch.Tensor:
    """`[1 + N]` labelled next-token targets per stream in a multi-stream batch (the per-stream
    `num_items_in_batch` for exact gradient accumulation)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum(dim=(0, 2))


# --------------------------------------------------------------------------------------------------
# 8. Causal LM
# --------------------------------------------------------------------------------------------------
class DeepTalkForCausalLM(DeepTalkPreTrainedModel, GenerationMixin):
    """DeepTalk decoder with a language-modelling head over the extended vocabulary.

    Build one from a pre-trained transformers MoE LLM with [`DeepTalkForCausalLM.from_text_moe`].
    """

    # module names: the text rows (`weight`) and, in a speech model, the audio rows (`audio_weight`) tie pairwise
    _tied_weights_keys = {"lm_head": "model.embed_tokens"}
    accepts_loss_kwargs = True

    def __init__(self, config: DeepTalkConfig):
        super().__init__(config)
        self.model = DeepTalkModel(config)
        self.vocab_size = config.text_config.vocab_size  # the whole extended vocabulary
        hidden = config.text_config.hidden_size
        if config.speech_layout is None:
            self.lm_head = nn.Linear(hidden, self.vocab_size, bias=False)
        else:
            text_rows = config.text_vocab_size
            self.lm_head = DeepTalkLMHead(hidden, text_rows, self.vocab_size - text_rows)
        self.post_init()

    def init_parallel_plans(self):
        super().init_parallel_plans()
        if self.config.speech_layout is None:  # tied to (or shaped like) the vocabulary-sharded embedding
            self._tp_plan.setdefault("lm_head", "colwise_gather_output")

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def moe_blocks(self) -> list[DeepTalkSparseMoeBlock]:
        return self.model.moe_blocks()

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        if self.config.speech_layout is not None:
            raise ValueError(
                "This model has a speech vocabulary after its text block: resizing would shift every audio id. "
                "Add text tokens before add_speech (add_speech grows the text block to the layout's text_vocab_size)."
            )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        routing_mode: str | RoutingMode | None = None,
        output_router_logits: bool | None = None,
        output_expert_load: bool | None = None,
        input_features: torch.FloatTensor | None = None,
        audio_feature_lengths: torch.LongTensor | None = None,
        audio_input_mask: torch.BoolTensor | None = None,
        audio_transcript_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        audio_ctc_loss_only: bool = False,
        **kwargs,
    ) -> DeepTalkCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)` or `(batch_size, 1 + N, sequence_length)`):
            Next-token labels (-100 = ignored), shifted inside the loss like transformers' causal LMs.
            Multi-stream labels give the paper's loss: the mean of the text CE and the N audio-stream
            CEs, each over its own slice of the vocabulary.
        output_router_logits (`bool`, *optional*):
            Return router logits and the load-balancing `aux_loss` (added to the loss, weighted by
            `config.router_aux_loss_coef`).
        output_expert_load (`bool`, *optional*):
            Return `expert_load`, the per-layer count of selections per expert by token modality.
        input_ids, input_features, audio_feature_lengths, audio_input_mask, audio_transcript_ids, token_modality,
        routing_mode:
            See [`DeepTalkModel.forward`]. With labels, the CTC adapter's `audio_ctc_loss` is added to the loss
            times `config.audio_ctc_loss_weight`.
        audio_ctc_loss_only (`bool`, *optional*, defaults to `False`):
            Train the CTC adapter alone: `loss` is its `audio_ctc_loss` on `audio_transcript_ids`, the LLM is not run
            and there are no logits (phase 1's `loss_type="ctc"`).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        mode = RoutingMode.parse(routing_mode or self.config.routing_mode)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
        if audio_ctc_loss_only:
            return self._audio_ctc_loss_only(input_ids, input_features, audio_feature_lengths, audio_input_mask,
                                             audio_transcript_ids, labels, loss_kwargs)
        record = bool(output_router_logits or output_expert_load)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            token_modality=token_modality,
            routing_mode=mode,
            input_features=input_features,
            audio_feature_lengths=audio_feature_lengths,
            audio_input_mask=audio_input_mask,
            audio_transcript_ids=audio_transcript_ids,
            output_router_logits=record,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = stream_losses = None
        if labels is not None:
            loss, stream_losses = self.language_modeling_loss(logits, labels, **loss_kwargs)
        aux_loss = expert_load = None
        if record:
            aux_loss, expert_load = self.model.routing_statistics(
                outputs.router_logits,
                mode,
                outputs.token_modality,
                bool(output_router_logits),
                bool(output_expert_load),
            )
        if loss is not None and aux_loss is not None:
            share = self._batch_share(labels, loss_kwargs)
            loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device) * share
        ctc_loss = outputs.audio_ctc_loss
        if loss is not None and ctc_loss is not None:
            share = self._batch_share(labels, loss_kwargs)
            loss = loss + self.config.audio_ctc_loss_weight * ctc_loss.to(loss.device, loss.dtype) * share
        return DeepTalkCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
            expert_load=expert_load,
            stream_losses=stream_losses,
            audio_ctc_loss=ctc_loss,
        )

    def language_modeling_loss(self, logits, labels, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                               shift_labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(loss, stream_losses)`. Text labels `[B, T]`: transformers' causal-LM loss over the whole
        vocabulary (`num_items_in_batch`, `shift_labels` honoured). Multi-stream labels `[B, 1 + N, T]`:
        each stream's CE over its own slice, normalised by that stream's target count
        (`num_items_in_batch[s]` across accumulated micro-batches when given), averaged over the streams
        that have targets."""
        if labels.dim() == 2:
            loss = self.loss_function(logits, labels, self.vocab_size, num_items_in_batch=num_items_in_batch,
                                      ignore_index=ignore_index, shift_labels=shift_labels)
            return loss, None
        layout = self.config.layout
        if layout is None or labels.shape[1] != layout.num_streams:
            raise ValueError(
                f"labels have {labels.shape[1]} streams but the model has {self.config.num_streams} "
                f"(1 text + {self.config.num_audio_streams} audio)."
            )
        if shift_labels is not None:
            raise ValueError("shift_labels is for text labels [batch, seq]; multi-stream labels are shifted here.")
        if num_items_in_batch is not None and (
            not torch.is_tensor(num_items_in_batch) or num_items_in_batch.numel() != layout.num_streams
        ):
            raise ValueError(
                f"Multi-stream labels need num_items_in_batch per stream (shape [{layout.num_streams}], see "
                "`stream_num_items`); DeepTalk's trainers pass it. A single count cannot weight the streams' losses."
            )
        pairs = [shifted_stream_targets(logits, labels, layout, stream) for stream in range(layout.num_streams)]
        out_of_block = torch.stack([((t != IGNORE_INDEX) & ((t < 0) | (t >= lg.shape[-1]))).any() for lg, t in pairs])
        if out_of_block.any():  # one check (one sync) for all streams
            bad = out_of_block.nonzero().flatten().tolist()
            raise ValueError(
                f"labels of stream(s) {bad} hold ids outside their vocabulary blocks "
                f"{[layout.stream_range(s) for s in bad]}: build labels with the processor's layout "
                "(global ids per stream)."
            )
        sums = [F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), t.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum") for lg, t in pairs]
        counts = [(t != IGNORE_INDEX).sum() for _, t in pairs]
        sums = torch.stack(sums)
        counts = torch.stack(counts).to(sums.dtype)
        totals = counts if num_items_in_batch is None else num_items_in_batch.to(sums.device, sums.dtype)
        present = totals > 0
        loss = (sums / totals.clamp(min=1)).masked_fill(~present, 0.0).sum() / present.sum().clamp(min=1)
        stream_losses = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        return loss, stream_losses.detach()

    def _audio_ctc_loss_only(self, input_ids, input_features, audio_feature_lengths, audio_input_mask,
                             audio_transcript_ids, labels, loss_kwargs) -> DeepTalkCausalLMOutputWithPast:
        if self.config.audio_adapter != "ctc":
            raise ValueError(f"audio_ctc_loss_only needs the CTC adapter (config.audio_adapter='ctc'), not "
                             f"{self.config.audio_adapter!r}: train this adapter through the LLM's loss.")
        if input_features is None or audio_transcript_ids is None:
            raise ValueError("audio_ctc_loss_only needs input_features and audio_transcript_ids: clips with their "
                             "transcripts (an audio part's 'transcript' in DeepTalkProcessor).")
        _, ctc_loss, _ = self.model.embed_inputs_and_ctc_loss(input_ids, input_features, audio_feature_lengths,
                                                              audio_input_mask, audio_transcript_ids)
        # weighted by this micro-batch's share of the accumulated batch, as the LM loss normalises itself
        return DeepTalkCausalLMOutputWithPast(loss=ctc_loss * self._batch_share(labels, loss_kwargs),
                                              audio_ctc_loss=ctc_loss)

    @staticmethod
    def _batch_share(labels, loss_kwargs) -> torch.Tensor | float:
        """This micro-batch's share of the accumulated targets: the weight of its balance loss, so that
        gradient accumulation and data parallelism add the balance loss up once, as a larger batch would."""
        total = loss_kwargs.get("num_items_in_batch")
        if total is None or labels is None:
            return 1.0
        local = (labels[..., 1:] != IGNORE_INDEX).sum()
        return local / torch.as_tensor(total).sum().clamp(min=1)

    def stream_logits(self, logits: torch.Tensor, stream: int) -> torch.Tensor:
        """The slice of `logits` over `stream`'s block of the vocabulary (0 = text, 1..N = audio)."""
        start, end = self.config.stream_range(stream)
        return logits[..., start:end]

    def generate(self, *args, **kwargs):
        """transformers' `generate` on the text stream. A speech model scores its whole extended vocabulary;
        a text answer may only pick text ids (`TextIdsOnly`), as the text stream does when it speaks."""
        if self.config.speech_layout is not None:
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(TextIdsOnly(self.config.text_vocab_size))
            kwargs["logits_processor"] = processors
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, inputs_embeds=None, is_first_iteration=False, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        audio_inputs = [name for name in AUDIO_INPUT_NAMES if name in model_inputs]
        if audio_inputs and cache is not None and cache.get_seq_length() > 0:  # audio is encoded once, at prefill
            for name in audio_inputs:
                del model_inputs[name]
        return model_inputs

    # ---- speech ------------------------------------------------------------------------------
    def add_speech(
        self,
        layout: SpeechTokenLayout | dict,
        *,
        audio_config=None,
        audio_adapter_stride: int | None = None,
        audio_pad_to_30s: bool | None = None,
        audio_adapter: str | None = None,
        audio_adapter_dropout: float | None = None,
        mean_resizing: bool = True,
    ):
        """Give a converted text model its speech vocabulary (`layout`, e.g. `processor.layout`) and,
        with `audio_config`, its ears (a Whisper encoder and the adapter: `audio_adapter` "stack" or "ctc",
        `audio_adapter_dropout`; see `DeepTalkConfig`).

        The text block first grows to `layout.text_vocab_size` if the tokenizer gained tokens (new
        rows as transformers' `resize_token_embeddings` makes them); then one block of
        `codebook_size + len(audio_special_tokens)` rows per audio stream is added to the embedding
        and the head as separate `audio_weight` parameters. With `mean_resizing` the new rows are drawn
        around the text rows' mean, as transformers does; else from N(0, initializer_range) (the paper).
        Text rows are untouched: text logits stay the source's.
        """
        if self.config.speech_layout is not None:
            raise ValueError("This model already has a speech vocabulary (speech_layout is set).")
        layout = layout if isinstance(layout, SpeechTokenLayout) else SpeechTokenLayout(**layout)
        current = self.config.text_config.vocab_size
        if layout.text_vocab_size < current:
            raise ValueError(
                f"The layout's text block ({layout.text_vocab_size} ids) would cut the model's text vocabulary "
                f"({current}); build the processor from this model's tokenizer."
            )
        if layout.text_vocab_size > current:
            self.resize_token_embeddings(layout.text_vocab_size, mean_resizing=mean_resizing)
        updates = {"speech_layout": layout.to_dict()}
        if audio_config is not None:
            updates["audio_config"] = audio_config.to_dict() if hasattr(audio_config, "to_dict") else dict(audio_config)
        if audio_adapter_stride is not None:
            updates["audio_adapter_stride"] = audio_adapter_stride
        if audio_pad_to_30s is not None:
            updates["audio_pad_to_30s"] = audio_pad_to_30s
        if audio_adapter is not None:
            updates["audio_adapter"] = audio_adapter
        if audio_adapter_dropout is not None:
            updates["audio_adapter_dropout"] = audio_adapter_dropout
        text_config = {**self.config.text_config.to_dict(), "vocab_size": layout.vocab_size}
        checked = DeepTalkConfig(**{**self.config.to_dict(), **updates, "text_config": text_config})  # validates first
        self.config.text_config.vocab_size = layout.vocab_size
        speech_settings = ("speech_layout", "audio_config", "audio_adapter_stride", "audio_pad_to_30s", "audio_adapter",
                           "audio_adapter_dropout")
        for name in speech_settings:
            setattr(self.config, name, getattr(checked, name))
        self.vocab_size = layout.vocab_size

        new_rows = layout.vocab_size - layout.text_vocab_size
        text_embedding = self.model.embed_tokens.weight
        self.model._build_speech_input(_new_rows(text_embedding, new_rows, mean_resizing, self.config))
        head = self.lm_head
        with torch.device("meta"):
            self.lm_head = DeepTalkLMHead(head.in_features, head.weight.shape[0], new_rows)
        self.lm_head.weight = head.weight
        self.lm_head.audio_weight = (
            self.model.embed_tokens.audio_weight if self.config.tie_word_embeddings
            else nn.Parameter(_new_rows(head.weight, new_rows, mean_resizing, self.config))
        )
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)
        if hasattr(self.model, "audio_encoder"):
            self.model.audio_encoder.to(text_embedding.device)
            self.model.audio_adapter.to(text_embedding.device)
        self.model.init_parallel_plans()  # the table and the head now hold two row blocks: not vocabulary-sharded
        self.init_parallel_plans()
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
        MoE layer, with new router rows, and make them the speech bank.

        New experts start as copies of existing experts of the same layer (chosen with `seed`); their
        router rows are drawn from N(0, initializer_range). Free routing therefore changes: the new rows
        take probability mass from the source's experts, the "router disturbance" the paper blames for
        MoExtend's lower scores. DeepSeek's group-limited top-k keeps its groups over the source's experts.
        """
        if self.config.num_added_experts:
            raise ValueError("This model already has added experts; add them once.")
        if self.config.speech_experts:
            raise ValueError(
                "MoExtend makes the NEW experts the speech bank, but this model already has speech experts assigned."
            )
        if isinstance(num_new, bool) or not isinstance(num_new, int) or num_new < 1:
            raise ValueError(f"num_new={num_new!r} must be a whole number >= 1.")
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
            for name in ("is_speech_expert", "local_index", "packed_index"):
                buffer = getattr(block, name)
                setattr(block, name, buffer.new_zeros(block.num_experts))
            block.load_source_experts(
                torch.cat([gate_up, gate_up[copies]]), torch.cat([down, down[copies]]), expert_modality=modality
            )
        self.config.num_added_experts = num_new
        self.config.speech_experts = [
            list(range(old_count, old_count + num_new)) for _ in self.config.moe_layer_indices
        ]
        self.config.num_speech_experts = num_new
        return self

    # ---- conversion ----------------------------------------------------------------------------
    @classmethod
    def from_text_moe(cls, source, speech_experts=None, *, progress: bool = True, **config_overrides):
        """Convert a pre-trained transformers MoE LLM into a DeepTalk model (see
        `deeptalk.conversion.from_text_moe`; needs the deeptalk package, not only this remote-code file)."""
        try:
            from deeptalk.conversion import from_text_moe
        except ImportError:
            raise ImportError(
                "Converting a text MoE into DeepTalk is tooling of the deeptalk package: `pip install deeptalk`, then "
                "`deeptalk.DeepTalkForCausalLM.from_text_moe(...)` or `deeptalk convert SRC OUT`."
            ) from None
        return from_text_moe(source, speech_experts, progress=progress, model_class=cls, **config_overrides)

    # ---- speaking (remote code: generation_deeptalk.py, codec_deeptalk.py) --------------------------
    def generate_speech(self, processor, conversation: list[dict], codec=None, **decoding):
        """A text + speech answer to `conversation` (chat messages ending with a user turn, e.g. a spoken
        question `{"type": "audio", "audio": "question.wav"}`): a `SpeechAnswer` with `.text`, `.codes` and,
        given the model's `codec` (see `load_codec`), `.waveform`. `decoding` options are the fields of
        `SpeechDecodingConfig` (strategy, max_steps, audio_top_k, seed, voice, ...)."""
        from .generation_deeptalk import generate_speech_answer

        return generate_speech_answer(self, processor, conversation, codec=codec, **decoding)

    def load_codec(self, path: str | os.PathLike | None = None, **kwargs):
        """The speech codec saved with this model (`codec/` in its folder or Hub repo), or the one at `path`."""
        from .codec_deeptalk import load_codec

        if path is None:
            if not self.name_or_path:
                raise ValueError("This model was not loaded from a folder or Hub repo: pass the codec's path.")
            path = os.path.join(self.name_or_path, "codec")
            if not os.path.isdir(path):  # a Hub repo: fetch its codec/ folder
                from huggingface_hub import snapshot_download

                path = os.path.join(snapshot_download(self.name_or_path, allow_patterns=["codec/*"]), "codec")
        return load_codec(path, **kwargs)


class _ForwardSignature(inspect.Signature):
    """A forward's signature that keeps its bound-method form: `inspect.signature(model.forward)` drops
    `self` with `replace(parameters=...)`, which validates every parameter again on each call."""

    __slots__ = ("_bound",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bound = inspect.Signature(tuple(self.parameters.values())[1:], return_annotation=self.return_annotation)

    def replace(self, **changes):
        if changes.keys() == {"parameters"} and tuple(changes["parameters"]) == tuple(self._bound.parameters.values()):
            return self._bound
        return super().replace(**changes)


# generate() reads `inspect.signature(model.forward)` at every step of a model registered for remote code
# (transformers' `cache_position` check): store the signature on the decorated forward, where `inspect`
# stops at once, instead of unwrapping the decorators and rebuilding it from the code object each time.
for _model_class in (DeepTalkModel, DeepTalkForCausalLM):
    _forward = _model_class.forward
    _signature = inspect.signature(_forward)
    _forward.__signature__ = _ForwardSignature(
        _signature.parameters.values(), return_annotation=_signature.return_annotation
    )
del _model_class, _forward, _signature


class TextIdsOnly(LogitsProcessor):
    """Only ids below `limit` (the text block) can be picked: audio ids get -inf."""

    def __init__(self, limit: int):
        self.limit = int(limit)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] <= self.limit:
            return scores
        return scores.masked_fill(torch.arange(scores.shape[-1], device=scores.device) >= self.limit, float("-inf"))


def _new_rows(reference: torch.Tensor, count: int, mean_resizing: bool, config: DeepTalkConfig) -> torch.Tensor:
    """`count` new rows for a table whose existing rows are `reference`."""
    std = config.get_text_config().initializer_range
    if not mean_resizing:
        noise = torch.randn(count, reference.shape[1], device=reference.device, dtype=torch.float32)
        return noise.mul_(std).to(reference.dtype)
    old = reference.detach().float()
    mean = old.mean(dim=0)
    centered = old - mean
    covariance = centered.T @ centered / max(old.shape[0] - 1, 1)
    # transformers' vocabulary expansion: new rows close to the mean, spread like the old rows (1e-9 * covariance)
    noise = torch.randn(count, old.shape[1], device=old.device) @ torch.linalg.cholesky(
        1e-9 * covariance + 1e-12 * torch.eye(old.shape[1], device=old.device)
    ).T
    return (mean + noise).to(reference.dtype)


__all__ = [
    "DeepTalkForCausalLM",
    "DeepTalkModel",
    "DeepTalkPreTrainedModel",
    "DeepTalkSparseMoeBlock",
    "DeepTalkExperts",
    "RouterSpec",
    "allowed_experts",
    "route_tokens",
    "shifted_stream_targets",
    "stream_token_log_probs",
    "stream_num_items",
]
