"""DeepTalkConfig: the expert->modality map, routing mode and validation messages."""

import re

import pytest

from deeptalk import DeepTalkConfig
from deeptalk.tiny import tiny_text_moe_config

LAYOUT = dict(text_vocab_size=128, num_audio_streams=2, codebook_size=16, eot_id=2, pad_t_id=0)


def make(family="deepseek_v2", **kwargs):
    return DeepTalkConfig(text_config=tiny_text_moe_config(family), **kwargs)


def test_moe_layers_follow_each_family():
    assert make("deepseek_v2").moe_layer_indices == [1, 2]  # first layer dense (first_k_dense_replace=1)
    assert make("qwen2_moe").moe_layer_indices == [1, 2]  # mlp_only_layers=[0]
    assert make("qwen3_moe").moe_layer_indices == [0, 1, 2]
    assert make("mixtral").num_routed_experts == 8


def test_round_trip_keeps_map_mode_and_family(tmp_path):
    config = make(speech_experts=[[1, 5], [0, 7]], routing_mode="text_only")
    config.save_pretrained(tmp_path)
    loaded = DeepTalkConfig.from_pretrained(tmp_path)
    assert loaded.speech_experts == [[1, 5], [0, 7]]
    assert loaded.num_speech_experts == 2
    assert loaded.routing_mode == "text_only"
    assert loaded.family == "deepseek_v2"
    assert loaded.expert_modality(1) == [1, 0, 0, 0, 0, 0, 0, 1]
    raw = (tmp_path / "config.json").read_text()
    assert '"speech_experts"' in raw and '"routing_mode": "text_only"' in raw


def test_router_loss_switches_live_on_the_text_config_where_trl_reads_them():
    config = make(output_router_logits=True, router_aux_loss_coef=0.02)
    text = config.get_text_config()
    assert text.output_router_logits is True and text.router_aux_loss_coef == 0.02
    text.router_aux_loss_coef = 0.5  # what TRL's SFTTrainer does
    text.output_router_logits = False
    assert config.router_aux_loss_coef == 0.5 and config.output_router_logits is False


def test_unassigned_map_defaults_to_six_speech_experts_and_free_routing():
    config = DeepTalkConfig(text_config=tiny_text_moe_config("qwen3_moe", num_experts=16))
    assert config.speech_experts is None and config.num_speech_experts == 6
    assert config.expert_modality(0) == [0] * 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"speech_experts": [[1, 1], [2, 3]]}, "repeats an expert"),
        ({"speech_experts": [[1, 9], [2, 3]]}, "outside the source's range 0..7"),
        ({"speech_experts": [[1, 2]]}, "has 1 lists but the deepseek_v2 source has 2 MoE layers"),
        ({"speech_experts": [[1, 2], [3]]}, "lists 1 experts but num_speech_experts=2"),
        ({"speech_experts": [list(range(8)), list(range(8))]}, "both modalities need one"),
        ({"num_speech_experts": 0}, "must be between 1 and 7"),
        ({"routing_mode": "audio_first"}, "Unknown routing mode 'audio_first'. Choose one of: 'free'"),
        ({"routing_mode": "speech_only"}, "needs speech experts, but none are assigned"),
        ({"routing_mode": "by_token_modality"}, "needs speech experts, but none are assigned"),
        ({"speech_layout": dict(LAYOUT, delays=[1])}, "1 delays for 2 audio streams"),
        ({"speech_layout": dict(LAYOUT, codebook_size=0)}, "must be >= 1"),
        ({"speech_layout": LAYOUT}, "spans 168 ids but text_config.vocab_size is 128"),
        # the expert map takes integers only: coercing 1.5, True or "3" would route to the wrong experts
        ({"speech_experts": [[1.5, 2], [3, 4]]}, "speech_experts[0][0] = 1.5 is not an expert index"),
        ({"speech_experts": [[True, 2], [3, 4]]}, "speech_experts[0][0] = True is not an expert index"),
        ({"speech_experts": [["3", 2], [3, 4]]}, "speech_experts[0][0] = '3' is not an expert index"),
        ({"speech_experts": [[None, 2], [3, 4]]}, "speech_experts[0][0] = None is not an expert index"),
        ({"speech_experts": [[[1], 2], [3, 4]]}, "speech_experts[0][0] = [1] is not an expert index"),
        ({"speech_experts": {"0": [1, 2]}}, "must be a list with one list of expert indices per MoE layer"),
        ({"speech_experts": [{"a": 1}, [3, 4]]}, "speech_experts[0] must be a list of expert indices"),
        ({"num_speech_experts": 2.0}, "num_speech_experts must be a whole number"),
        ({"num_audio_streams": 0}, "format 1, this release reads format 2"),
        ({"audio_adapter_stride": 0}, "must be >= 1"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(**kwargs)


def test_unsupported_family_is_named():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="cannot wrap a 'llama' model"):
        DeepTalkConfig(text_config=LlamaConfig(num_hidden_layers=1))
    with pytest.raises(ValueError, match="model_type='nonsense'"):
        DeepTalkConfig(text_config={"model_type": "nonsense"})
