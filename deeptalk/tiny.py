"""Tiny, randomly initialised MoE LLM configs of every supported family.

Nothing can be downloaded in tests, CI or the embedded demo, so they build source models from
these configs. Sizes are small enough for a 2-core CPU yet keep each family's features: DeepSeek's
dense first layer, shared experts and group-limited routing; Qwen2-MoE's gated shared expert;
Qwen3-MoE's sparse-step layout; OLMoE's and Mixtral's plain top-k.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

TINY_FAMILIES = ("deepseek_v2", "qwen3_moe", "qwen2_moe", "olmoe", "mixtral")


def tiny_text_moe_config(family: str = "qwen3_moe", *, vocab_size: int = 128, hidden_size: int = 64,
                         num_hidden_layers: int = 3, num_experts: int = 8, top_k: int = 2, **overrides):
    """A tiny config of `family` with `num_experts` routed experts and top-`top_k` routing."""
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  num_experts_per_tok=top_k, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if family == "deepseek_v2":
        cfg = dict(common, intermediate_size=96, moe_intermediate_size=32, num_experts=num_experts,
                   n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.5,
                   topk_method="group_limited_greedy", n_group=4, topk_group=2, num_key_value_heads=4)
    elif family == "qwen3_moe":
        cfg = dict(common, intermediate_size=96, moe_intermediate_size=32, num_experts=num_experts,
                   norm_topk_prob=True, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[])
    elif family == "qwen2_moe":
        cfg = dict(common, intermediate_size=96, moe_intermediate_size=32, num_experts=num_experts,
                   shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=1,
                   mlp_only_layers=[0])
    elif family == "olmoe":
        cfg = dict(common, intermediate_size=32, num_experts=num_experts, norm_topk_prob=False)
    elif family == "mixtral":
        cfg = dict(common, intermediate_size=32, num_local_experts=num_experts)
    else:
        raise ValueError(f"No tiny config for {family!r}; choose one of {TINY_FAMILIES}.")
    cfg.update(overrides)
    return AutoConfig.for_model(family, **cfg)


def tiny_text_moe(family: str = "qwen3_moe", seed: int = 0, **config_kwargs) -> PreTrainedModel:
    """A randomly initialised tiny `*ForCausalLM` of `family` (fp32, eval mode)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_text_moe_config(family, **config_kwargs))
    return model.eval()


def tiny_whisper_config(d_model: int = 32, encoder_layers: int = 1):
    """A tiny random Whisper encoder config (80 mel bins, 30 s window) for offline demos and tests."""
    from transformers import WhisperConfig

    return WhisperConfig(num_mel_bins=80, d_model=d_model, encoder_layers=encoder_layers, encoder_attention_heads=4,
                         encoder_ffn_dim=2 * d_model, vocab_size=100, max_source_positions=1500, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
