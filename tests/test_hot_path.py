"""The decode step's hot path: no host synchronisation in DeepTalk's own code, one experts call per MoE
layer in free mode (no per-step weight copy), and a whole-graph trace for torch.compile."""

import contextlib
import traceback

import pytest
import torch
from conftest import convert, random_ids
from transformers import StaticCache

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def host_syncs_recorded():
    """Record every call that copies a tensor's data to the host (a GPU sync); on CUDA also ask torch to
    error on any other synchronising kernel."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def recorder(name):
        def call(self, *args, **kwargs):
            calls.append((name, "".join(traceback.format_stack(limit=6))))
            return originals[name](self, *args, **kwargs)
        return call

    for name in SYNCS:
        setattr(torch.Tensor, name, recorder(name))
    original_nonzero = torch.nonzero
    torch.nonzero = lambda *a, **k: calls.append(("torch.nonzero", "")) or original_nonzero(*a, **k)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.nonzero = original_nonzero
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")


def _decode_step(model, cache_kind="dynamic"):
    ids = random_ids(shape=(1, 8))
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=16) if cache_kind == "static" else None
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        with host_syncs_recorded() as calls:
            model(token, cache=out.cache, use_cache=True, position_ids=torch.tensor([[8]]))
    return calls


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_decode_step_makes_no_host_sync_in_deeptalk_code(family, cache_kind, tiny_source):
    source = tiny_source(family)
    model = convert(source, experts=(1, 5))
    ours = [(name, stack) for name, stack in _decode_step(model, cache_kind) if "deeptalk" in stack]
    assert not ours, "host syncs in DeepTalk's decode step:\n" + "\n".join(f"{n}:\n{s}" for n, s in ours)
    # and no more syncs overall than the source model's own decode step
    assert len(_decode_step(model, cache_kind)) <= len(_decode_step(source, cache_kind))


def test_free_mode_inference_runs_one_experts_call_per_layer_without_copying_weights(tiny_source):
    model = convert(tiny_source("qwen3_moe"), experts=(1, 5))
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in model.modules()
             if type(m).__name__ == "DeepTalkExperts"]
    ids = random_ids()
    with torch.no_grad():
        model(ids)
        storages = {id(b): b.text_bank.gate_up_proj.untyped_storage().data_ptr() for b in model.moe_blocks()}
        calls.clear()
        model(ids)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(model.moe_blocks())  # the packed module is called; the banks are not
    for block in model.moe_blocks():  # the packed views share the banks' storage: no per-step copy
        packed = block._packed_experts()
        assert packed.gate_up_proj.untyped_storage().data_ptr() == storages[id(block)]
        assert block.speech_bank.gate_up_proj.untyped_storage().data_ptr() == storages[id(block)]



@pytest.mark.parametrize("experts", [(1, 5), (6, 7), None], ids=["2-speech", "speech-last", "unassigned"])
def test_the_packed_experts_follow_every_bank_weight_and_cast(experts, tiny_source):
    """The packed module is cached by the first no-grad call; a bank weight re-pointed since (`.data = ...`,
    as engines and loaders do) or a dtype cast must be seen by the next call, which then equals the
    per-bank path that gradient mode runs."""
    ids = random_ids()
    for bank in ("text_bank", "speech_bank"):
        for name in ("gate_up_proj", "down_proj"):
            model = convert(tiny_source("qwen3_moe"), experts=experts)
            with torch.no_grad():
                model(ids)  # caches the packed module of every block
            for block in model.moe_blocks():
                param = getattr(getattr(block, bank), name)
                param.data = torch.randn_like(param) * 0.5
            with torch.no_grad():
                no_grad = model(ids).logits
            torch.testing.assert_close(no_grad, model(ids).logits.detach(), msg=f"{bank}.{name}")
    model.set_experts_implementation("batched_mm")  # grouped_mm has no float64 kernel
    model.double()
    with torch.no_grad():
        no_grad = model(ids).logits
    assert no_grad.dtype == torch.float64
    torch.testing.assert_close(no_grad, model(ids).logits.detach())
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in model.modules()
             if type(m).__name__ == "DeepTalkExperts"]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(model.moe_blocks())  # still one experts call per layer


def test_a_bank_wrapped_after_inference_is_run_through_its_wrapper(tiny_source):
    """The packed module is cached by the first no-grad call; a bank that PEFT wraps afterwards must be run
    through its adapter (the packed raw weights would skip it), with or without gradients."""
    from peft import LoraConfig, get_peft_model

    model = convert(tiny_source("qwen3_moe"), experts=(1, 5))
    ids = random_ids()
    with torch.no_grad():
        base = model(ids).logits  # caches the packed module of every block
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["text_bank.gate_up_proj"])
    adapted = get_peft_model(model, lora)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # a zero-initialised adapter would change nothing
            torch.nn.init.normal_(param, std=0.5)
    with torch.no_grad():
        no_grad = adapted(ids).logits
    with_grad = adapted(ids).logits.detach()
    assert (with_grad - base).abs().max() > 1e-3
    torch.testing.assert_close(no_grad, with_grad)


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen3_moe"])
def test_the_decode_step_traces_as_one_graph(family, tiny_source):
    """`fullgraph=True` with dynamo's eager backend: the whole step traces without a graph break (what
    `_can_compile_fullgraph` promises), in seconds; inductor code generation is left to the benchmark."""
    model = convert(tiny_source(family), experts=(1, 5))
    ids = random_ids(shape=(1, 8))
    position = torch.tensor([[8]])
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True, backend="eager")
    logits = []
    with torch.no_grad():
        for forward in (model, step):
            cache = StaticCache(config=model.config.text_config, max_cache_len=16)
            out = model(ids, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            logits.append(forward(token, cache=cache, use_cache=True, position_ids=position).logits)
    torch.testing.assert_close(logits[1], logits[0])


def test_a_speech_decode_step_makes_no_host_sync_in_deeptalk_code(tiny_source):
    from deeptalk.configuration_deeptalk import SpeechTokenLayout

    layout = SpeechTokenLayout(text_vocab_size=128, num_audio_streams=3, codebook_size=16, eot_id=2, pad_t_id=0)
    model = convert(tiny_source("deepseek_v2"), experts=(1, 5)).add_speech(layout).eval()
    prompt = layout.pad_column()[None, :, None].repeat(1, 1, 8)
    prompt[0, 0] = random_ids(shape=(1, 8))[0]
    column = torch.tensor([5, *(layout.stream_offset(i + 1) + 3 for i in range(3))]).view(1, -1, 1)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        with host_syncs_recorded() as calls:
            model(column, cache=out.cache, use_cache=True, position_ids=torch.tensor([[8]]))
    ours = [(name, stack) for name, stack in calls if "deeptalk" in stack]
    assert not ours, "host syncs in DeepTalk's speech decode step:\n" + "\n".join(f"{n}:\n{s}" for n, s in ours)
