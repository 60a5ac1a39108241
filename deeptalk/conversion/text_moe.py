"""Convert a pre-trained transformers MoE LLM into a DeepTalk model.

DeepTalk keeps the family's parameter names (`model.layers.N.self_attn...`, `model.embed_tokens`,
`lm_head`); only each MoE block changes: the family's fused `mlp.experts` is split into
`mlp.text_bank` / `mlp.speech_bank` by the speech map, and its `mlp.gate` becomes `mlp.router` (fp32).

`convert_folder` is `deeptalk convert`: source folder (or Hub id, or `tiny:FAMILY`) in, a folder out
that transformers and TRL use as they are (weights, config, remote code, the source's tokenizer with a
chat template), e.g. `trl sft --model_name_or_path OUT --trust_remote_code`.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from ..configuration_deeptalk import DeepTalkConfig

TINY_PREFIX = "tiny:"


def from_text_moe(
    source: str | os.PathLike | PreTrainedModel,
    speech_experts: list[list[int]] | None = None,
    *,
    progress: bool = True,
    model_class=None,
    **config_overrides,
):
    """Convert a pre-trained transformers MoE LLM into a `DeepTalkForCausalLM`.

    Args:
        source: a `*ForCausalLM` instance of a supported family, or a path / Hub id to load one from
            (extra `from_pretrained` options go in `source_kwargs={...}`).
        speech_experts: one list per MoE layer of the source expert indices that serve speech, or
            `None` to leave the assignment for later (`deeptalk assign`).
        progress: show a progress bar over layers.
        config_overrides: other `DeepTalkConfig` fields (`routing_mode`, `num_speech_experts`,
            `router_aux_loss_coef`, ...).

    With `routing_mode="free"` the result computes the source's logits (tested to 1e-4 in fp32 for every
    family). A source loaded from a path gives its tensors to the result without a copy; a model
    instance is copied, so the source stays usable and independent.
    """
    if model_class is None:
        from ..modeling_deeptalk import DeepTalkForCausalLM as model_class
    source_kwargs = config_overrides.pop("source_kwargs", {})
    owned = isinstance(source, (str, os.PathLike))
    if owned:
        source = AutoModelForCausalLM.from_pretrained(source, **source_kwargs)
    if not isinstance(source, PreTrainedModel):
        raise TypeError(f"source must be a transformers MoE *ForCausalLM or a folder/Hub id, got {type(source).__name__}.")
    text_config = source.config.__class__.from_dict(source.config.to_dict())
    config = DeepTalkConfig(text_config=text_config, speech_experts=speech_experts, **config_overrides)
    config.dtype = source.dtype

    with torch.device("meta"):
        model = model_class(config)
    state = _converted_state_dict(source, model, copy=not owned, progress=progress)
    model.load_state_dict(state, strict=True, assign=True)
    _copy_buffers(source, model)
    for name, param in model.named_parameters():
        if param.is_meta:
            raise RuntimeError(f"Conversion left {name} uninitialised; please report this.")
        param.requires_grad_(True)
    for block in model.moe_blocks():
        block.fill_placement()
    if config.tie_word_embeddings:
        model.tie_weights()
    # keep the source's kernels: a model built on the meta device starts with the defaults
    if source.config._experts_implementation is not None:
        model.set_experts_implementation(source.config._experts_implementation)
    if source.config._attn_implementation is not None:
        model.set_attn_implementation(source.config._attn_implementation)
    model.train(source.training)
    return model


def _converted_state_dict(source, model, copy: bool, progress: bool) -> dict:
    source_state = source.state_dict()
    blocks = {f"model.layers.{i}.mlp.": layer.mlp for i, layer in enumerate(model.model.layers) if layer.is_moe}
    state = {}
    iterator = blocks.items()
    if progress:
        iterator = logging.tqdm(iterator, total=len(blocks), desc="Splitting experts into text/speech banks")
    for prefix, block in iterator:
        gate_up = source_state[prefix + "experts.gate_up_proj"]
        down = source_state[prefix + "experts.down_proj"]
        for bank_name, (bank_gate_up, bank_down) in block.split_source_experts(gate_up, down).items():
            state[f"{prefix}{bank_name}.gate_up_proj"] = bank_gate_up
            state[f"{prefix}{bank_name}.down_proj"] = bank_down
        # `.float()` of an fp32 tensor is the tensor itself: copy explicitly, or training the router
        # would silently train the source model's gate too
        state[prefix + "router.weight"] = source_state[prefix + "gate.weight"].to(torch.float32, copy=copy)
    for name in model.state_dict():
        if name in state:
            continue
        if name not in source_state:
            raise KeyError(f"Source checkpoint has no tensor {name!r}.")
        state[name] = source_state[name].clone() if copy else source_state[name]
    return state


def _copy_buffers(source, model):
    """Non-persistent buffers (rotary frequencies) are not in the state dict: copy them; DeepTalk's own
    tables (placement, stream ids) are filled from the config."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in source_buffers:
            module._buffers[buffer_name] = source_buffers[name].clone()
        else:  # DeepTalk's own (placement, stream tables): real tensors, filled right after
            module._buffers[buffer_name] = torch.zeros_like(buffer, device="cpu").to(source.device)


def load_source_tokenizer(source: str | os.PathLike):
    """The tokenizer of the source model at `source`, refused with a clear error when there is none.

    transformers builds a tokenizer with a single token from a folder that holds only a model (the family's
    tokenizer class, no vocabulary): a converted folder with it would train and generate on nothing."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"{source}: the source's tokenizer could not be loaded ({err}). DeepTalk keeps the source "
                         "model's tokenizer: give a folder or Hub id that holds it.") from None
    if len(tokenizer) <= max(1, len(set(tokenizer.all_special_ids))):
        raise ValueError(
            f"{source} has no tokenizer: loading it gave one with {len(tokenizer)} token(s) and no vocabulary. Copy "
            "the source model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into the folder, or give "
            "the Hub id the model came from."
        )
    return tokenizer


def convert_folder(
    source: str | os.PathLike,
    output: str | os.PathLike,
    speech_experts: list[list[int]] | None = None,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **config_overrides,
):
    """Convert the MoE LLM at `source` and write a folder that transformers and TRL load as they are.

    `source` is a folder or Hub id of a supported family (its tokenizer is required), or `tiny:FAMILY` for a
    tiny random one with the demo corpus's tokenizer (offline). `output` gets the weights, the config (expert
    map, `auto_map`), the remote-code files and the tokenizer; a tokenizer without a chat template gets
    DeepTalk's role-tagged one (`<|user|>...<|eot|><|assistant|>`, the processor's text format), so chat
    (`messages`) data works with TRL's SFT. `dtype` (e.g. "bfloat16") loads the source in that dtype
    (default: as saved). Other options are those of `from_text_moe`. Returns the converted model.
    """
    import torch

    from ..processing_deeptalk import DEFAULT_CHAT_TEMPLATE
    from ..saving import atomic_directory, check_output_path

    source_name = os.fspath(source)
    tiny_family = source_name[len(TINY_PREFIX):] if source_name.startswith(TINY_PREFIX) else None
    local_source = None if tiny_family is not None or not os.path.exists(source_name) else source_name
    check_output_path(output, overwrite=overwrite, forbid=[local_source], what="output")
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'.")
    if tiny_family is not None:
        from ..recipes import build_demo_tokenizer
        from ..tiny import TINY_FAMILIES, tiny_text_moe

        if tiny_family not in TINY_FAMILIES:
            raise ValueError(f"{source_name}: no tiny config for {tiny_family!r}; choose one of {TINY_FAMILIES}.")
        tokenizer = build_demo_tokenizer()
        special_ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
        source_model = tiny_text_moe(tiny_family, vocab_size=len(tokenizer), **special_ids)
    else:  # tokenizer and config before the (large) weights: bad input fails fast
        from transformers import AutoConfig

        tokenizer = load_source_tokenizer(source_name)
        vocab_size = AutoConfig.from_pretrained(source_name).get_text_config().vocab_size
        if len(tokenizer) > vocab_size:
            raise ValueError(f"{source_name}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                             f"only {vocab_size}; the tokenizer does not belong to this model.")
        # loaded by from_text_moe itself, which then moves the tensors instead of copying them
        source_model = source_name
        config_overrides["source_kwargs"] = {"dtype": getattr(torch, dtype) if dtype else "auto"}
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = from_text_moe(source_model, speech_experts, progress=progress, **config_overrides)
    with atomic_directory(output, overwrite=overwrite, forbid=[local_source], what="output") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model
