# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Wall and CPU seconds of the quickstart's first phase (teaching the original LLM) at 1 and 2 torch threads.

The same seeded model trains `--steps` steps at each thread count in turn, in one process; a weight checksum shows
whether the thread count changed the result::

    python benchmarks/quickstart_threads.py --threads 1 2 1 2 --steps 80
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 1, 2])
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from deeptalk.quickstart import (
        QuickstartSettings,
        _train_original_llm,
        torch_threads,
    )
    from deeptalk.recipes.demo_data import (
        build_demo_data,
        build_demo_processor,
        build_demo_tokenizer,
        fit_demo_codec,
    )
    from deeptalk.tiny import tiny_text_moe_config

    tokenizer, codec = build_demo_tokenizer(), fit_demo_codec()
    processor = build_demo_processor(tokenizer, codec)
    data = build_demo_data(processor, codec, tasks=("text_qa",))
    output = os.path.join("deeptalk_output", "bench_threads")
    settings = QuickstartSettings(output_dir=output, text_pretrain_steps=args.steps)
    config = tiny_text_moe_config(settings.family, vocab_size=len(tokenizer), hidden_size=settings.hidden_size,
                                  num_hidden_layers=settings.num_hidden_layers, num_experts=settings.num_experts,
                                  top_k=settings.top_k, pad_token_id=processor.layout.pad_t_id,
                                  eos_token_id=processor.layout.eot_id, bos_token_id=tokenizer.bos_token_id)
    for threads in args.threads:
        torch.manual_seed(settings.seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch_threads(threads):
            wall, cpu = time.perf_counter(), time.process_time()
            _train_original_llm(model, processor, data, settings, lambda message: None)
            row = {"threads": threads, "steps": args.steps, "wall_s": round(time.perf_counter() - wall, 1),
                   "cpu_s": round(time.process_time() - cpu, 1),
                   "weight_checksum": float(sum(p.double().sum() for p in model.parameters())),
                   "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
