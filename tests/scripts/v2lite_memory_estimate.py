"""Parameter counts and an estimate of GPU memory per phase for DeepTalk on DeepSeek-V2-Lite, for
docs/training_at_scale.md. The model is built on the meta device (no weights, no download) from the
DeepSeek-V2-Lite config values, with the paper's speech parts: SNAC's 7 audio streams of 4096 codes,
Whisper-medium's encoder, an adapter of stride 1 and 6 speech experts per MoE layer. The trainable set per
phase is what `apply_phase` trains under the shipped deepseek_v2_lite recipes.

    python tests/scripts/v2lite_memory_estimate.py   (prints a JSON report)
"""

import json

import torch
from transformers import DeepseekV2Config, WhisperConfig

from deeptalk import DeepTalkConfig, DeepTalkForCausalLM
from deeptalk.configuration_deeptalk import SpeechTokenLayout
from deeptalk.trainers.freezing import apply_phase, plan_for_phase

GPUS = 8
RECIPES = {  # phase -> (plan, per-device batch, max length) from deeptalk/recipes/deepseek_v2_lite/*.yaml
    "align": (plan_for_phase("align", train_embeddings="audio_rows"), 18, 500),
    "experts (speech)": (plan_for_phase("experts", "speech", train_embeddings="all"), 14, 1200),
    "experts (text)": (plan_for_phase("experts", "text", train_embeddings="all"), 10, 1000),
    "joint": (plan_for_phase("joint"), 16, 1200),
    "dpo": (plan_for_phase("dpo"), 8 * 2, 1200),  # chosen + rejected rows per device
}


def v2lite_speech_config() -> DeepTalkConfig:
    text = DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        tie_word_embeddings=False, max_position_embeddings=163840,
    )
    text_vocab = 102400 + 64  # the processor's special tokens (paper: 102400 plus 64)
    layout = SpeechTokenLayout(text_vocab_size=text_vocab, num_audio_streams=7, codebook_size=4096, eot_id=102400,
                               pad_t_id=102401)
    whisper_medium = WhisperConfig(d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096,
                                   num_mel_bins=80, max_source_positions=1500)
    config = DeepTalkConfig(text_config={**text.to_dict(), "vocab_size": layout.vocab_size}, speech_layout=layout.to_dict(),
                            audio_config=whisper_medium.to_dict(), audio_adapter_stride=1,
                            speech_experts=[list(range(6)) for _ in range(26)])
    return config


def main():
    config = v2lite_speech_config()
    with torch.device("meta"):
        model = DeepTalkForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    hidden, layers, vocab = config.text_config.hidden_size, config.text_config.num_hidden_layers, config.text_config.vocab_size
    gib = 2**30
    report = {"total_parameters": total, "vocab_size": vocab, "phases": {}}
    for phase, (plan, batch, length) in RECIPES.items():
        trainable = sum(apply_phase(model, plan).values())
        frozen = total - trainable
        reference = total if phase == "dpo" else 0  # DPO's frozen reference copy
        # model states in bytes: bf16 weights (2), bf16 gradients of what trains (2), fp32 master + Adam m, v (12)
        zero2_offload = (2 * (total + reference) + 2 * trainable / GPUS) / gib  # optimizer states on the CPU
        zero3 = (2 * (total + reference) + 2 * trainable + 12 * trainable) / GPUS / gib  # everything sharded, no offload
        # activations with gradient checkpointing: each layer's bf16 input is kept, plus the bf16 logits and the
        # fp32 log-softmax of one stream slice at a time (upper bound: the whole vocabulary in fp32)
        tokens = batch * length
        activations = (2 * tokens * hidden * layers + 2 * tokens * vocab + 4 * tokens * vocab) / gib
        report["phases"][phase] = {
            "trainable": trainable, "frozen": frozen, "cpu_optimizer_GiB_per_node": round(12 * trainable / gib, 1),
            "zero2_offload_model_states_GiB": round(zero2_offload, 1),
            "zero3_no_offload_model_states_GiB": round(zero3, 1),
            "activations_GiB_at_recipe_batch": round(activations, 1), "batch": batch, "max_length": length,
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
