"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: phase 2 (speech experts) on
CPU with gloo; every rank writes its losses and a checksum of what it trained."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

import deeptalk  # noqa: E402
from deeptalk import DeepTalkDataCollator, DeepTalkProcessor  # noqa: E402
from deeptalk.data import load_demo_corpus  # noqa: E402
from deeptalk.processing.tokenizer import train_demo_tokenizer  # noqa: E402
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config  # noqa: E402
from deeptalk.trainers import DeepTalkExpertsConfig, DeepTalkExpertsTrainer  # noqa: E402


def main(output_dir: str):
    torch.manual_seed(0)
    corpus = load_demo_corpus("spoken_qa")["train"].select(range(16))
    tokenizer = train_demo_tokenizer([r["question_text"] + " " + r["answer_text"] for r in corpus])
    processor = DeepTalkProcessor.from_codec_layout(tokenizer, 2, 16)
    gen = torch.Generator().manual_seed(0)
    conversations = [
        [{"role": "user", "content": [{"type": "audio", "audio": r["question_audio"]}]},
         {"role": "assistant", "content": [
             {"type": "text", "text": r["answer_text"]},
             {"type": "audio", "audio_codes": torch.randint(0, 16, (2, 4), generator=gen)},
         ]}]
        for r in corpus
    ]
    dataset = Dataset.from_dict(processor.encode_batch(conversations))
    source = tiny_text_moe("qwen3_moe", vocab_size=len(tokenizer))
    model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, speech_experts=[[1, 5]] * 3, progress=False)
    whisper = tiny_whisper_config()
    model.add_speech(audio_config=whisper, **processor.model_speech_kwargs())
    args = DeepTalkExpertsConfig(output_dir=output_dir, modality="speech", max_steps=3, per_device_train_batch_size=2,
                                 use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                                 ddp_backend="gloo")
    trainer = DeepTalkExpertsTrainer(model, args, train_dataset=dataset, data_collator=DeepTalkDataCollator(processor))
    trainer.train()
    rank = trainer.args.process_index
    bank = torch.cat([b.speech_bank.gate_up_proj.detach().flatten() for b in model.moe_blocks()])
    report = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "speech_bank_sum": float(bank.double().sum()),
        "speech_bank_abs_sum": float(bank.double().abs().sum()),
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
