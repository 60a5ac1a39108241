"""Tensor/expert-parallel plans of converted models name what the model holds (transformers matches a
plan key against module and parameter names with each layer index written as `*`)."""

import re

import pytest
from conftest import convert

from deeptalk import DeepTalkProcessor
from deeptalk.processing.tokenizer import train_demo_tokenizer
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config


def generic_names(model) -> set[str]:
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    return {re.sub(r"\d+", "*", name) for name in names}


def speech_model(family):
    tokenizer = train_demo_tokenizer(["how much is nine minus six", "three"])
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, 2, 16)
    model = convert(tiny_text_moe(family, vocab_size=len(tokenizer)))
    return model.add_speech(audio_config=tiny_whisper_config(), **processor.model_speech_kwargs())


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe"])
@pytest.mark.parametrize("speech", [False, True], ids=["text", "speech"])
def test_every_plan_entry_matches_the_model(family, speech):
    model = speech_model(family) if speech else convert(tiny_text_moe(family))
    present = generic_names(model)
    for plan_name in ("tp_plan", "ep_plan"):
        plan = getattr(model, plan_name)
        stale = sorted(key for key in plan if key not in present)
        assert not stale, f"{family} {plan_name}: entries matching nothing in the model: {stale}"
    tp, ep = model.tp_plan, model.ep_plan
    for bank in ("text_bank", "speech_bank"):  # both banks of every MoE layer are split, and nothing else is named experts
        assert tp[f"model.layers.*.mlp.{bank}"] == "moe_tp_experts" and ep[f"model.layers.*.mlp.{bank}"] == "ep_dispatch_experts"
    assert not [key for key in {**tp, **ep} if ".mlp.experts" in key or key.endswith(".mlp.gate")]
    if any(key.startswith("model.embed_tokens") for key in tp) or not speech:  # vocabulary-sharded or vocabulary-shaped
        assert tp["lm_head"] == "colwise_gather_output"
    if speech:  # two row blocks (text, audio) cannot be split as one vocabulary
        assert not [key for key in tp if key.startswith(("model.embed_tokens", "lm_head"))]
