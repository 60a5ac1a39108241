"""DeepTalk behaves like an in-tree transformers MoE model where transformers' generic tests look.

Regression tests for the defects transformers' own `CausalLMModelTest` found (see
`scripts/run_transformers_generic_tests.py`, which runs that external suite): weights missing from a
checkpoint initialised, `return_dict=False`, `shift_labels`, the deprecated `past_key_values` name,
and resolvable return annotations with one recorded router-logit tensor per MoE layer.
"""

import ast
import importlib.util
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.loss.loss_utils import ForCausalLMLoss

from deeptalk import DeepTalkConfig, DeepTalkForCausalLM, DeepTalkModel
from deeptalk.configuration_deeptalk import SpeechTokenLayout
from deeptalk.modeling_deeptalk import (
    DeepTalkCausalLMOutputWithPast,
    DeepTalkModelOutputWithPast,
    DeepTalkRouter,
    DeepTalkSparseMoeBlock,
)
from deeptalk.tiny import tiny_text_moe_config

FAMILIES = ("qwen3_moe", "deepseek_v2")
SPEECH_EXPERTS = [1, 5]
INIT_STD = 0.05  # not the constructors' default (0.02): the values must come from the config


def deeptalk_config(family: str, speech: bool = False, **overrides) -> DeepTalkConfig:
    """A tiny DeepTalk config with a speech bank (experts 1 and 5 of every MoE layer), optionally with
    a speech vocabulary (two audio streams)."""
    text_config = tiny_text_moe_config(family, initializer_range=INIT_STD, **overrides)
    layout = None
    if speech:
        layout = SpeechTokenLayout(text_vocab_size=text_config.vocab_size, num_audio_streams=2, codebook_size=16,
                                   eot_id=3, pad_t_id=4)
        text_config.vocab_size = layout.vocab_size
    layers = DeepTalkConfig(text_config=text_config.to_dict()).moe_layer_indices
    return DeepTalkConfig(text_config=text_config.to_dict(), speech_experts=[SPEECH_EXPERTS for _ in layers],
                          speech_layout=layout)


def tiny_model(family: str, seed: int = 0, **kwargs) -> DeepTalkForCausalLM:
    torch.manual_seed(seed)
    return DeepTalkForCausalLM(deeptalk_config(family, **kwargs)).eval()


def ids(batch=2, length=7, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- 1. weights missing from a checkpoint are initialised -------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("speech", [False, True], ids=["text", "speech"])
def test_missing_weights_are_initialised_from_the_config(family, speech):
    """`from_pretrained` with an empty state dict initialises every DeepTalk parameter (router, both banks,
    audio rows) from N(0, initializer_range) through `_init_weights`, and fills the placement buffers."""
    config = deeptalk_config(family, speech=speech)
    model = DeepTalkForCausalLM.from_pretrained(None, config=config, state_dict={})
    checked = []
    for name, param in model.named_parameters():
        if name.endswith(("router.weight", "_bank.gate_up_proj", "_bank.down_proj", "audio_weight")):
            assert torch.isfinite(param).all(), name
            assert 0.8 * INIT_STD < param.float().std().item() < 1.2 * INIT_STD, (name, param.std().item())
            checked.append(name)
    assert any("router" in n for n in checked) and any("speech_bank" in n for n in checked)
    assert any("audio_weight" in n for n in checked) == speech
    for block in model.moe_blocks():
        assert block.is_speech_expert.nonzero().flatten().tolist() == SPEECH_EXPERTS
        assert block.packed_index[SPEECH_EXPERTS].tolist() == [6, 7]  # after the 6 text experts
    if speech:
        assert model.model.stream_pad_ids[0].item() == -1 and (model.model.stream_pad_ids[1:] >= 128).all()
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()


# ---- 2. return_dict=False ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_return_dict_false_returns_tuples(family):
    model = tiny_model(family)
    input_ids = ids()
    with torch.no_grad():
        as_dict = model(input_ids, labels=input_ids)
        as_tuple = model(input_ids, labels=input_ids, return_dict=False)
        base = model.model(input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    torch.testing.assert_close(base[0], model.model(input_ids).last_hidden_state)
    with torch.no_grad():
        assert model(input_ids, return_dict=False)[0].shape == (2, 7, 128)  # no labels: logits first


# ---- 3. shift_labels -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_shift_labels_reach_the_loss(family):
    """Pre-shifted targets (sequence/context parallelism) are used as given, as in transformers' causal LMs."""
    model = tiny_model(family)
    input_ids, other = ids(seed=0), ids(seed=1)
    with torch.no_grad():
        plain = model(input_ids, labels=input_ids).loss
        shifted = model(input_ids, labels=input_ids, shift_labels=other).loss
        logits = model(input_ids).logits
    assert not torch.allclose(plain, shifted)
    torch.testing.assert_close(shifted, ForCausalLMLoss(logits, input_ids, 128, shift_labels=other))
    torch.testing.assert_close(plain, ForCausalLMLoss(logits, input_ids, 128))


# ---- 4. the deprecated `past_key_values` name --------------------------------------------------------
def _deprecation_warnings(model, input_ids):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids, past_key_values=DynamicCache(config=model.config.get_text_config()), use_cache=True)
    return [w for w in caught if "past_key_values" in str(w.message)], out


@pytest.mark.parametrize("family", FAMILIES)
def test_past_key_values_name_warns_like_the_family(family):
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(tiny_text_moe_config(family)).eval()
    model = tiny_model(family)
    input_ids = ids()
    with torch.no_grad():
        family_warnings, _ = _deprecation_warnings(source, input_ids)
        ours, out = _deprecation_warnings(model, input_ids)
        base_warnings, _ = _deprecation_warnings(model.model, input_ids)
    assert len(family_warnings) == 1 and len(ours) == 1 and len(base_warnings) == 1
    assert ours[0].category is family_warnings[0].category
    # each model names its own forward, as the family's does (not a warning from somewhere inside)
    assert f"{type(source).__name__}.forward" in str(family_warnings[0].message)
    assert "DeepTalkForCausalLM.forward" in str(ours[0].message) and "`cache`" in str(ours[0].message)
    assert "DeepTalkModel.forward" in str(base_warnings[0].message)
    assert out.cache.get_seq_length() == input_ids.shape[1]  # the old name still delivers the cache


# ---- top-level config switches a causal LM's users and transformers' tests set -------------------------
def test_top_level_vocab_size_and_use_cache_reach_the_text_config():
    model = tiny_model("qwen3_moe")
    assert model.config.vocab_size == model.config.text_config.vocab_size == 128
    model.config.use_cache = False  # what Trainer does under gradient checkpointing
    assert model.config.text_config.use_cache is False
    with torch.no_grad():
        assert model(ids()).cache is None
        model.config.use_cache = True
        assert model(ids()).cache.get_seq_length() == 7
    assert "use_cache" not in model.config.to_dict() and "vocab_size" not in model.config.to_dict()


# ---- 6. return annotations and recorded router logits -----------------------------------------------
def test_return_annotations_are_the_output_classes():
    """transformers' tests read the raw return annotation (`forward.__annotations__`, not resolved) to learn
    which outputs a head returns; a string annotation hides `router_logits` from them."""
    assert DeepTalkForCausalLM.forward.__annotations__["return"] is DeepTalkCausalLMOutputWithPast
    assert DeepTalkModel.forward.__annotations__["return"] is DeepTalkModelOutputWithPast
    assert typing.get_type_hints(DeepTalkForCausalLM.forward)["return"] is DeepTalkCausalLMOutputWithPast
    assert typing.get_type_hints(DeepTalkModel.forward)["return"] is DeepTalkModelOutputWithPast
    assert "router_logits" in DeepTalkCausalLMOutputWithPast.__dataclass_fields__
    assert DeepTalkForCausalLM._can_record_outputs["router_logits"].target_class is DeepTalkRouter


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("from_config", [False, True], ids=["argument", "config"])
def test_router_logits_recorded_once_per_moe_layer(family, from_config):
    model = tiny_model(family)
    input_ids = ids()
    kwargs = {"output_router_logits": True}
    if from_config:
        model.config.output_router_logits, kwargs = True, {}
    moe_layers = [m for m in model.modules() if isinstance(m, DeepTalkSparseMoeBlock)]
    seen = []
    hooks = [block.router.register_forward_hook(lambda _m, _i, output: seen.append(output)) for block in moe_layers]
    with torch.no_grad():
        out = model(input_ids, **kwargs)
    for hook in hooks:
        hook.remove()
    assert len(moe_layers) == len(model.config.moe_layer_indices) >= 2
    assert len(out.router_logits) == len(moe_layers) == len(seen)
    for recorded, computed in zip(out.router_logits, seen):  # each layer's own router output, in layer order
        assert recorded.shape == (input_ids.numel(), model.config.num_routed_experts)
        torch.testing.assert_close(recorded, computed)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    with torch.no_grad():
        assert model(input_ids, output_router_logits=False).router_logits is None


# ---- the runner of transformers' generic tests (the suite itself is external, see its docstring) -----
RUNNER = Path(__file__).resolve().parent.parent / "scripts" / "run_transformers_generic_tests.py"


def test_generic_test_runner_refuses_a_folder_without_the_suite(tmp_path):
    (tmp_path / "tests").mkdir()
    result = subprocess.run([sys.executable, str(RUNNER), "--transformers-tests", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert str(tmp_path) in result.stderr and "causal_lm_tester.py" in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["tests"]  # nothing written


def test_generic_test_module_names_both_families_and_every_skip_reason(tmp_path):
    spec = importlib.util.spec_from_file_location("generic_runner", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    package = runner.write_test_module(tmp_path, [1, 5])
    source = (package / "test_modeling_deeptalk.py").read_text()
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"DeepTalkQwen3MoeModelTest", "DeepTalkDeepseekV2ModelTest"} <= classes
    assert "SPEECH_EXPERTS = (1, 5)" in source
    for reasons in (runner.SKIPS, *runner.FAMILY_SKIPS.values()):
        assert all(isinstance(reason, str) and len(reason) > 20 for reason in reasons.values())
    with pytest.raises(SystemExit, match="exists"):  # never overwrites a module another run is using
        runner.write_test_module(tmp_path, [1, 5])
