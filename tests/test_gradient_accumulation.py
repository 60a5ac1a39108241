"""Exact gradient accumulation: 4 accumulated micro-batches of 1 give the same logged loss and the same
update as one batch of 4 (SGD, no clipping, balance loss off), in every phase trainer."""

import pytest
import torch
from test_dpo import _pairs
from test_trainers import COMMON, setup, speech_model  # noqa: F401  (module fixture + builders)

from deeptalk.trainers import (
    DeepTalkAlignmentConfig,
    DeepTalkAlignmentTrainer,
    DeepTalkExpertsConfig,
    DeepTalkExpertsTrainer,
)
from deeptalk.trainers.dpo import DeepTalkSpeechDPOConfig, DeepTalkSpeechDPOTrainer
from deeptalk.trainers.joint import DeepTalkJointConfig, DeepTalkJointTrainer

EXACT = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
             max_steps=1)


def one_step(phase, processor, dataset, collator, tmp_path, batch_size, accumulation):
    model = speech_model(processor)
    model.config.router_aux_loss_coef = 0.0
    common = {**COMMON, **EXACT, "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": accumulation,
              "output_dir": str(tmp_path / f"{phase}-{batch_size}")}
    if phase == "experts":
        trainer = DeepTalkExpertsTrainer(model, DeepTalkExpertsConfig(modality="speech", **common),
                                         train_dataset=dataset, data_collator=collator)
    elif phase == "align":
        trainer = DeepTalkAlignmentTrainer(model, DeepTalkAlignmentConfig(**common), train_dataset=dataset,
                                           data_collator=collator)
    elif phase == "joint":
        trainer = DeepTalkJointTrainer(model, DeepTalkJointConfig(**common), train_dataset=dataset,
                                       data_collator=collator, processing_class=processor)
    else:
        trainer = DeepTalkSpeechDPOTrainer(model, DeepTalkSpeechDPOConfig(**common), train_dataset=_pairs(processor, 4),
                                           processing_class=processor)
    trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trainer.state.log_history[0]["loss"], params


@pytest.mark.parametrize("phase", ["experts", "align", "joint", "dpo"])
def test_accumulated_micro_batches_equal_one_large_batch(phase, setup, tmp_path):  # noqa: F811
    processor, dataset, collator = setup
    dataset = dataset.select(range(4))
    big_loss, big = one_step(phase, processor, dataset, collator, tmp_path, batch_size=4 if phase != "dpo" else 2,
                             accumulation=1)
    small_loss, small = one_step(phase, processor, dataset, collator, tmp_path, batch_size=1 if phase != "dpo" else 1,
                                 accumulation=4 if phase != "dpo" else 2)
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    assert big.keys() == small.keys() and big
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6, msg=name)
