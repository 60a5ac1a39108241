"""Routing travels with each call: no per-model routing state that another call could change."""

import threading

import torch
from conftest import convert, random_ids


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_forward_between_a_checkpointed_forward_and_its_backward_leaves_the_gradients_unchanged(tiny_source):
    model = convert(tiny_source("qwen3_moe"), experts=(1, 5)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(shape=(2, 12))
    speech = torch.zeros_like(ids)
    speech[:, 6:] = 1

    def step(interleave: bool):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, routing_mode="by_token_modality", token_modality=speech,
                     output_router_logits=True).loss
        if interleave:  # another mode and other modalities, between the forward and its recomputation
            with torch.no_grad():
                model(ids.flip(0), routing_mode="text_only", token_modality=1 - speech)
        loss.backward()
        return _grads(model)

    alone, interleaved = step(False), step(True)
    assert alone.keys() == interleaved.keys() and len(alone) > 0
    for name in alone:
        assert torch.equal(alone[name], interleaved[name]), name


def test_two_threads_sharing_a_model_get_the_answers_they_get_alone(tiny_source):
    model = convert(tiny_source("deepseek_v2"), experts=(0, 3)).eval()
    jobs = [(random_ids(shape=(1, 9), seed=s), mode) for s, mode in enumerate(["free", "speech_only", "text_only"] * 3)]

    def run(ids, mode):
        with torch.no_grad():
            out = model(ids, routing_mode=mode, output_expert_load=True, output_router_logits=True)
        return out.logits, out.expert_load, out.aux_loss

    alone = [run(*job) for job in jobs]
    together = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def worker(i):
        start.wait()
        for _ in range(3):
            together[i] = run(*jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (logits, load, aux), (logits2, load2, aux2) in zip(alone, together):
        assert torch.equal(logits, logits2) and torch.equal(load, load2) and torch.equal(aux, aux2)


def test_the_model_keeps_no_routing_state(tiny_source):
    model = convert(tiny_source("olmoe"))
    before = {k: v for k, v in vars(model.model).items() if not k.startswith("_")}
    with torch.no_grad():
        model(random_ids(), routing_mode="speech_only", output_expert_load=True)
    after = {k: v for k, v in vars(model.model).items() if not k.startswith("_")}
    assert before.keys() == after.keys()
    assert not any("routing" in name for name in vars(model.model))
