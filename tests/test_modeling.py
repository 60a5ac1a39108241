"""DeepTalkForCausalLM: conversion equality, routing modes, banks, losses, generation, save/load."""

import json

import pytest
import torch
from conftest import convert, random_ids
from transformers import AutoModelForCausalLM

import deeptalk
from deeptalk.modeling_deeptalk import DeepTalkSparseMoeBlock, RouterSpec, route_tokens
from deeptalk.tiny import TINY_FAMILIES

TOL = 1e-4


# ---- conversion -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize(
    "experts", [(1, 5), (0, 2, 3, 7), (6, 7), None], ids=["2-speech", "4-speech", "speech-last", "unassigned"]
)
def test_free_mode_conversion_equals_source(family, experts, tiny_source):
    source = tiny_source(family)
    model = convert(source, experts)
    ids = random_ids()
    with torch.no_grad():
        assert (model(ids).logits - source(ids).logits).abs().max() <= TOL


def test_group_limited_routing_keeps_source_groups(tiny_source):
    """DeepSeek's groups are defined over source indices: put speech experts in different groups."""
    source = tiny_source("deepseek_v2")  # 8 experts, 4 groups of 2, top-2 groups
    assert source.config.topk_method == "group_limited_greedy"
    model = convert(source, experts=(0, 3, 4, 7))
    ids = random_ids(shape=(3, 16))
    with torch.no_grad():
        assert (model(ids).logits - source(ids).logits).abs().max() <= TOL


def test_tied_head_is_kept_tied(tiny_source):
    source = tiny_source("qwen3_moe", tie_word_embeddings=True)
    model = convert(source)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert (model(random_ids()).logits - source(random_ids()).logits).abs().max() <= TOL


def test_untied_head_stays_untied(tiny_source):
    model = convert(tiny_source("deepseek_v2"))
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_conversion_copies_from_an_instance(tiny_source):
    source = tiny_source("olmoe")
    model = convert(source)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    assert not torch.equal(model.get_input_embeddings().weight, source.get_input_embeddings().weight)


def test_banks_hold_the_source_experts(tiny_source):
    source = tiny_source("qwen3_moe")
    model = convert(source, experts=(1, 5))
    block = model.moe_blocks()[0]
    fused = source.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(block.speech_bank.gate_up_proj, fused[[1, 5]])
    assert torch.equal(block.text_bank.gate_up_proj, fused[[0, 2, 3, 4, 6, 7]])
    gate_up, _ = block.source_order_experts()
    assert torch.equal(gate_up, fused)


def test_set_speech_experts_moves_experts_without_changing_free_logits(tiny_source):
    model = convert(tiny_source("deepseek_v2"), experts=None)
    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
        model.set_speech_experts([[2, 3, 6], [0, 1, 4]])
        after = model(ids).logits
    assert model.config.speech_experts == [[2, 3, 6], [0, 1, 4]] and model.config.num_speech_experts == 3
    assert model.moe_blocks()[1].speech_bank.gate_up_proj.shape[0] == 3
    assert (before - after).abs().max() <= TOL
    with pytest.raises(ValueError, match="repeats an expert"):
        model.set_speech_experts([[2, 2, 6], [0, 1, 4]])


# ---- routing modes --------------------------------------------------------------------------
def _load(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, output_expert_load=True, **kwargs).expert_load  # [layers, modality, experts]


def test_each_routing_mode_restricts_the_chosen_experts(tiny_source):
    model = convert(tiny_source("qwen3_moe"), experts=(1, 5))
    ids = random_ids(shape=(4, 16))
    speech = torch.zeros(8, dtype=torch.bool)
    speech[[1, 5]] = True

    free = _load(model, ids).sum(1)
    assert free[:, speech].sum() > 0 and free[:, ~speech].sum() > 0

    speech_only = _load(model, ids, routing_mode="speech_only").sum(1)
    assert speech_only[:, ~speech].sum() == 0
    assert (speech_only[:, speech] == ids.numel()).all()  # 2 speech experts, top-2: every token uses both

    text_only = _load(model, ids, routing_mode="text_only").sum(1)
    assert text_only[:, speech].sum() == 0 and text_only.sum() == 3 * ids.numel() * 2

    modality = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(1))
    by_token = _load(model, ids, routing_mode="by_token_modality", token_modality=modality)
    assert by_token[:, 0, speech].sum() == 0  # text tokens never reach speech experts
    assert by_token[:, 1, ~speech].sum() == 0  # speech tokens never reach text experts
    assert by_token[:, 1].sum() == 3 * int(modality.sum()) * 2


def test_speech_only_with_fewer_speech_experts_than_top_k_uses_all_of_them():
    spec = RouterSpec(top_k=4, norm_topk_prob=True)
    logits = torch.randn(5, 8)
    allowed = torch.zeros(1, 8, dtype=torch.bool)
    allowed[0, [2, 6]] = True
    decision = route_tokens(logits, allowed, spec)
    chosen = decision.expert_index
    assert sorted(chosen[0][chosen[0] >= 0].tolist()) == [2, 6]
    assert ((chosen >= 0).sum(1) == 2).all()
    assert torch.allclose(decision.expert_weight.sum(1), torch.ones(5))
    assert (decision.expert_weight[chosen < 0] == 0).all()


def test_masked_text_bank_is_never_used(tiny_source):
    model = convert(tiny_source("deepseek_v2"), experts=(1, 5))
    ids = random_ids()
    with torch.no_grad():
        reference = model(ids, routing_mode="speech_only").logits
        for block in model.moe_blocks():
            block.text_bank.gate_up_proj.fill_(float("nan"))
            block.text_bank.down_proj.fill_(float("nan"))
        poisoned = model(ids, routing_mode="speech_only").logits
        free = model(ids).logits
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, reference)
    assert torch.isnan(free).any()  # the same poison does reach free routing


def test_by_token_modality_routes_speech_positions_to_the_speech_bank(tiny_source):
    model = convert(tiny_source("qwen2_moe"), experts=(1, 5))
    ids = random_ids(shape=(1, 12))
    modality = torch.tensor([[0] * 6 + [1] * 6])
    with torch.no_grad():
        base = model(ids, routing_mode="by_token_modality", token_modality=modality).logits
        for block in model.moe_blocks():
            block.speech_bank.gate_up_proj.mul_(3.0)
        changed = model(ids, routing_mode="by_token_modality", token_modality=modality).logits
    # causal model: the text prefix cannot see the speech positions, so it is untouched
    assert torch.equal(base[:, :6], changed[:, :6])
    assert not torch.allclose(base[:, 6:], changed[:, 6:])


def test_routing_errors_are_clear(tiny_source):
    unassigned = convert(tiny_source("qwen3_moe"), experts=None)
    ids = random_ids()
    with pytest.raises(ValueError, match="needs speech experts"):
        unassigned(ids, routing_mode="speech_only")
    model = convert(tiny_source("qwen3_moe"))
    with pytest.raises(ValueError, match="Unknown routing mode 'speech'. Choose one of"):
        model(ids, routing_mode="speech")
    with pytest.raises(ValueError, match="token_modality has shape"):
        model(ids, routing_mode="by_token_modality", token_modality=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="use 0 \\(text\\), 1 \\(speech\\) or -1"):
        model(ids, routing_mode="by_token_modality", token_modality=torch.full(ids.shape, 2))


# ---- training behaviour ---------------------------------------------------------------------
def test_gradients_reach_only_the_unfrozen_bank(tiny_source):
    model = convert(tiny_source("qwen3_moe"), experts=(1, 5)).train()
    for block in model.moe_blocks():
        block.text_bank.requires_grad_(False)
    ids = random_ids()
    model(ids, labels=ids, output_router_logits=True).loss.backward()
    for block in model.moe_blocks():
        assert block.text_bank.gate_up_proj.grad is None
        assert block.speech_bank.gate_up_proj.grad.abs().sum() > 0


def test_speech_only_mode_sends_no_gradient_to_the_text_bank(tiny_source):
    model = convert(tiny_source("deepseek_v2"), experts=(1, 5)).train()
    ids = random_ids()
    model(ids, labels=ids, routing_mode="speech_only").loss.backward()
    for block in model.moe_blocks():
        assert block.text_bank.gate_up_proj.grad is None or block.text_bank.gate_up_proj.grad.abs().sum() == 0
        assert block.speech_bank.down_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("mode, expected", [("free", 2.0), ("speech_only", 2.0), ("text_only", 2.0)])
def test_aux_loss_is_top_k_for_uniform_routing(tiny_source, mode, expected):
    model = convert(tiny_source("qwen3_moe"), experts=(1, 5, 6))
    with torch.no_grad():
        for block in model.moe_blocks():
            block.router.weight.zero_()  # uniform router probabilities
    ids = random_ids()
    out = model(ids, labels=ids, routing_mode=mode, output_router_logits=True)
    assert out.aux_loss.item() == pytest.approx(expected, abs=1e-5)
    plain = model(ids, labels=ids, routing_mode=mode, output_router_logits=False)
    assert out.loss.item() == pytest.approx(plain.loss.item() + model.config.router_aux_loss_coef * expected, abs=1e-5)
    assert len(out.router_logits) == len(model.moe_blocks())


def test_aux_loss_ignores_padding(tiny_source):
    model = convert(tiny_source("qwen3_moe"))
    ids = random_ids(shape=(1, 8))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        plain = model(ids, output_router_logits=True).aux_loss
        with_padding = model(padded, attention_mask=mask, output_router_logits=True).aux_loss
    assert with_padding.item() == pytest.approx(plain.item(), abs=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_source):
    ids = random_ids()
    grads = []
    for checkpointing in (False, True):
        model = convert(tiny_source("deepseek_v2")).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids, labels=ids, output_router_logits=True, output_expert_load=True)
        out.loss.backward()
        assert out.expert_load.shape == (2, 2, 8)
        grads.append(model.moe_blocks()[0].speech_bank.gate_up_proj.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- inference ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe"])
def test_generate_with_cache_equals_without(family, tiny_source):
    model = convert(tiny_source(family))
    prompt = random_ids(shape=(2, 6))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_generate_in_by_token_modality_mode_slices_modality_per_step(tiny_source):
    model = convert(tiny_source("qwen3_moe"))
    prompt = random_ids(shape=(1, 6))
    modality = torch.zeros(1, 6, dtype=torch.long)
    out = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0,
                         routing_mode="by_token_modality", token_modality=modality)
    assert out.shape == (1, 7)


def test_experts_implementations_agree(tiny_source, tmp_path):
    convert(tiny_source("qwen2_moe")).save_pretrained(tmp_path)
    ids = random_ids()
    logits = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=impl).eval()
        assert model.moe_blocks()[0].speech_bank.config._experts_implementation == impl
        with torch.no_grad():
            logits[impl] = model(ids).logits
    assert (logits["eager"] - logits["grouped_mm"]).abs().max() <= TOL
    assert (logits["eager"] - logits["batched_mm"]).abs().max() <= TOL


def test_attention_implementations_agree(tiny_source, tmp_path):
    convert(tiny_source("mixtral")).save_pretrained(tmp_path)
    ids = random_ids()
    outs = []
    for attn in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
        assert model.config.text_config._attn_implementation == attn
        with torch.no_grad():
            outs.append(model(ids).logits)
    assert (outs[0] - outs[1]).abs().max() <= TOL


def test_bf16_loading_keeps_router_in_fp32(tiny_source, tmp_path):
    model = convert(tiny_source("deepseek_v2"))
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.moe_blocks()[0].speech_bank.gate_up_proj.dtype == torch.bfloat16
    assert bf16.moe_blocks()[0].router.weight.dtype == torch.float32
    ids = random_ids()
    with torch.no_grad():
        low = bf16(ids).logits.float()
        full = model(ids).logits
    assert torch.isfinite(low).all() and (low - full).abs().max() < 0.05


# ---- save / load ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_and_reload_round_trip(family, tiny_source, tmp_path):
    model = convert(tiny_source(family), routing_mode="text_only")
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"configuration_deeptalk.py", "modeling_deeptalk.py"} <= set(files)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deeptalk" and saved["routing_mode"] == "text_only"
    assert saved["speech_experts"] == model.config.speech_experts
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_deeptalk.DeepTalkForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, deeptalk.DeepTalkForCausalLM)
    ids = random_ids()
    with torch.no_grad():
        assert (reloaded(ids).logits - model(ids).logits).abs().max() <= TOL
    assert all(isinstance(b, DeepTalkSparseMoeBlock) for b in reloaded.moe_blocks())


def test_auto_model_loads_the_base_model(tiny_source, tmp_path):
    from transformers import AutoModel

    convert(tiny_source("olmoe")).save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, deeptalk.DeepTalkModel)
    out = base(random_ids(), output_router_logits=True)
    assert out.last_hidden_state.shape == (2, 10, 64) and len(out.router_logits) == 3


def test_inference_packs_the_banks_into_one_kernel_call_and_training_still_works(tiny_source):
    source = tiny_source("qwen3_moe")
    model = convert(source)
    block = model.moe_blocks()[0]
    ids = random_ids()
    with torch.inference_mode():
        logits = model(ids).logits
    assert (logits - source(ids).logits).abs().max() <= TOL
    text, speech = block.text_bank.gate_up_proj, block.speech_bank.gate_up_proj
    assert text.untyped_storage().data_ptr() == speech.untyped_storage().data_ptr()  # packed, still 2 params
    assert not text.is_inference()
    model.train()
    block.text_bank.requires_grad_(False)
    model(ids, labels=ids).loss.backward()
    assert block.text_bank.gate_up_proj.grad is None and block.speech_bank.gate_up_proj.grad.abs().sum() > 0
    model.eval().to(torch.bfloat16)  # new storages: packed again on the next inference call
    two_calls = model(ids).logits.detach()  # grad enabled: the per-bank path
    with torch.no_grad():
        packed = model(ids).logits
    text, speech = block.text_bank.gate_up_proj, block.speech_bank.gate_up_proj
    assert text.untyped_storage().data_ptr() == speech.untyped_storage().data_ptr()
    assert (packed.float() - two_calls.float()).abs().max() <= 0.02


def test_conversion_keeps_the_source_kernels(tiny_source):
    from transformers import AutoModelForCausalLM as Auto

    from deeptalk.tiny import tiny_text_moe_config

    source = Auto.from_config(
        tiny_text_moe_config("olmoe"), experts_implementation="eager", attn_implementation="eager"
    )
    model = convert(source)
    assert model.config.text_config._experts_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
def test_moextend_adds_new_speech_experts_and_router_rows(family, tiny_source, tmp_path):
    model = convert(tiny_source(family), experts=None)
    ids = random_ids()
    gate_up_before, _ = model.moe_blocks()[0].source_order_experts()
    model.add_new_speech_experts(3, seed=0)
    assert model.config.num_routed_experts == 11 and model.config.num_added_experts == 3
    assert model.config.speech_experts == [[8, 9, 10]] * len(model.moe_blocks())
    block = model.moe_blocks()[0]
    assert block.router.weight.shape[0] == 11 and block.speech_bank.gate_up_proj.shape[0] == 3
    assert torch.equal(block.text_bank.gate_up_proj, gate_up_before)  # the source's experts are all text experts
    with torch.no_grad():
        load = model(ids, routing_mode="speech_only", output_expert_load=True).expert_load.sum(1)
        free = model(ids, output_expert_load=True)
    assert load[:, :8].sum() == 0 and load[:, 8:].sum() > 0  # only the new experts in speech_only
    assert torch.isfinite(free.logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, free.logits)
    with pytest.raises(ValueError, match="add them once"):
        model.add_new_speech_experts(2)
    with pytest.raises(ValueError, match="already has speech experts"):
        convert(tiny_source(family)).add_new_speech_experts(2)
