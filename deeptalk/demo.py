"""The embedded-defaults job (`deeptalk demo`): convert tiny MoE LLMs, check, save, reload.

For every supported family it builds a tiny random source model, converts it with a speech map,
and checks the invariants the rest of the package stands on:

1. conversion equality: `free` routing gives the source's logits (<= 1e-4 in fp32);
2. save/reload: `AutoModelForCausalLM.from_pretrained` of the saved folder gives the same logits;
3. remote code: the folder loads with `trust_remote_code=True` in a process without deeptalk;
4. generation: greedy `generate()` with the KV cache equals generation without it.
"""

from __future__ import annotations

import os
import random

import torch

TOLERANCE = 1e-4


def _demo_speech_map(config, seed: int = 0) -> list[list[int]]:
    """A seeded random speech map with 2 speech experts per MoE layer (the assignment step picks
    real ones from modality load; this demo only needs some split)."""
    rng = random.Random(seed)
    return [sorted(rng.sample(range(config.num_routed_experts), 2)) for _ in config.moe_layer_indices]


def check_family(family: str, output_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    import deeptalk
    from deeptalk.configuration_deeptalk import DeepTalkConfig
    from deeptalk.hub import logits_via_remote_code
    from deeptalk.tiny import tiny_text_moe

    source = tiny_text_moe(family)
    probe = DeepTalkConfig(text_config=source.config.to_dict())
    speech_map = _demo_speech_map(probe)
    model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, speech_experts=speech_map, progress=False).eval()
    input_ids = torch.randint(3, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        source_logits = source(input_ids).logits
        logits = model(input_ids).logits
    folder = os.path.join(output_dir, family)
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids).logits
    remote_logits, remote_module = logits_via_remote_code(folder, input_ids)
    prompt = input_ids[:1, :6]
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    without_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    return {
        "family": family,
        "conversion_max_abs": (logits - source_logits).abs().max().item(),
        "reload_max_abs": (reloaded_logits - logits).abs().max().item(),
        "remote_code_max_abs": (remote_logits - logits).abs().max().item(),
        "remote_code_module": remote_module,
        "generate_cache_equal": bool(torch.equal(with_cache, without_cache)),
        "folder": folder,
        "speech_map": speech_map,
    }


def run_demo(output_dir: str = "deeptalk_output/demo", families=None) -> bool:
    from deeptalk.tiny import TINY_FAMILIES

    families = families or list(TINY_FAMILIES)
    print(f"DeepTalk foundation demo: tiny random MoE LLMs -> DeepTalk, written to {output_dir}/")
    header = f"{'family':<12} {'convert Δ':>10} {'reload Δ':>10} {'remote Δ':>10}  gen(cache)==gen(no cache)"
    print(header)
    print("-" * len(header))
    ok = True
    for family in families:
        result = check_family(family, output_dir)
        passed = (
            result["conversion_max_abs"] <= TOLERANCE
            and result["reload_max_abs"] <= TOLERANCE
            and result["remote_code_max_abs"] <= TOLERANCE
            and result["remote_code_module"].startswith("transformers_modules")
            and result["generate_cache_equal"]
        )
        ok &= passed
        print(f"{family:<12} {result['conversion_max_abs']:>10.2e} {result['reload_max_abs']:>10.2e} "
              f"{result['remote_code_max_abs']:>10.2e}  {result['generate_cache_equal']}  "
              f"{'OK' if passed else 'FAILED'}")
    print(f"\nΔ = max |logits difference| (tolerance {TOLERANCE:g}); 'remote' = loaded with trust_remote_code=True "
          "in a fresh process where deeptalk cannot be imported.")
    print("Each folder is Hub-ready (safetensors, config with speech map and routing mode, remote code). "
          "Convert a real checkpoint with: deeptalk convert <hub-id-or-folder> <out> --speech-experts map.json")
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return ok
