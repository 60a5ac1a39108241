"""Writes what tests/scripts/scale_out_phases.py trains on: a tiny DeepSeek-V2-family speech model
(bf16, as `deeptalk train` loads it under a bf16 recipe) with its processor, and one JSON Lines file
per phase from the shipped demo corpus (`python scale_out_setup.py FOLDER`)."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

STREAMS, CODEBOOK = 2, 16
# phase name in the matrix -> (deeptalk train phase, tiny_cpu recipe, data file)
PHASES = {
    "align": ("align", "tiny_cpu/align", "asr.jsonl"),
    "experts_speech": ("experts", "tiny_cpu/experts_speech", "speech.jsonl"),
    "experts_text": ("experts", "tiny_cpu/experts_text", "text.jsonl"),
    "joint": ("joint", "tiny_cpu/joint", "mixed.jsonl"),
    "dpo": ("dpo", "tiny_cpu/dpo", "pairs.jsonl"),
}


def write_model_and_data(folder: str | os.PathLike, examples: int = 8) -> Path:
    import deeptalk
    from deeptalk import DeepTalkProcessor
    from deeptalk.data import load_demo_corpus
    from deeptalk.processing.tokenizer import train_demo_tokenizer
    from deeptalk.tiny import tiny_text_moe, tiny_whisper_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spoken = load_demo_corpus("spoken_qa", decode_audio=False)["train"].select(range(examples))
    asr = load_demo_corpus("asr", decode_audio=False)["train"].select(range(examples))
    texts = load_demo_corpus("text_qa", decode_audio=False)["train"].select(range(examples))
    tokenizer = train_demo_tokenizer([r["question_text"] + " " + r["answer_text"] for r in spoken] + [r["text"] for r in asr]
                                     + [r["question_text"] + " " + r["answer_text"] for r in texts])
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, STREAMS, CODEBOOK)
    source = tiny_text_moe("deepseek_v2", vocab_size=len(tokenizer))
    layers = deeptalk.DeepTalkConfig(text_config=source.config.to_dict()).moe_layer_indices
    model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, speech_experts=[[1, 5] for _ in layers], progress=False)
    model.add_speech(audio_config=tiny_whisper_config(), **processor.model_speech_kwargs())
    # bf16 like the paper's checkpoints; the routers stay fp32 (`_keep_in_fp32_modules_strict`) with values that
    # bf16 cannot hold, so an engine that rounds them shows
    routers = [block.router.weight.detach().clone() for block in model.moe_blocks()]
    model.to(torch.bfloat16)
    for block, weight in zip(model.moe_blocks(), routers):
        block.router.weight.data = weight
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")

    gen = torch.Generator().manual_seed(0)

    def codes():
        return torch.randint(0, CODEBOOK, (STREAMS, 3), generator=gen).tolist()

    def spoken_turn(r):
        return {"role": "assistant", "content": [{"type": "text", "text": r["answer_text"]}, {"type": "audio", "audio_codes": codes()}]}

    def user_audio(path):
        return {"role": "user", "content": [{"type": "audio", "audio": path}]}

    rows = {
        "asr.jsonl": [{"messages": [user_audio(r["audio"]), {"role": "assistant", "content": r["text"]}]} for r in asr],
        "speech.jsonl": [{"messages": [user_audio(r["question_audio"]), spoken_turn(r)]} for r in spoken],
        "text.jsonl": [{"messages": [{"role": "user", "content": r["question_text"]}, {"role": "assistant", "content": r["answer_text"]}]}
                       for r in texts],
        "pairs.jsonl": [{"prompt": [user_audio(r["question_audio"])], "chosen": spoken_turn(r), "rejected": spoken_turn(r)} for r in spoken],
    }
    # phase 3 mixes text-only and spoken dialogues (the paper's joint data), so that ranks' batches differ
    rows["mixed.jsonl"] = [row for pair in zip(rows["speech.jsonl"], rows["text.jsonl"]) for row in pair]
    for name, content in rows.items():
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in content))
    return folder


if __name__ == "__main__":
    write_model_and_data(sys.argv[1])
