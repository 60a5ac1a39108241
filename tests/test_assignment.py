"""Adaptive modality expert assignment: load measurement, the selection rule, the random baseline,
assignment through the model, and the report files."""

import json
import warnings

import pytest
import torch
from conftest import convert, random_ids

from deeptalk.configuration_deeptalk import SpeechTokenLayout
from deeptalk.trainers.assignment import (
    ModalityLoad,
    assign_speech_experts,
    measure_modality_load,
    random_speech_experts,
    save_load_report,
    select_speech_experts,
)

TOL = 1e-4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hand_load(text_counts, speech_counts, text_tokens=100, speech_tokens=100, top_k=2):
    return ModalityLoad(text_counts=torch.tensor(text_counts), speech_counts=torch.tensor(speech_counts),
                        text_tokens=text_tokens, speech_tokens=speech_tokens, top_k=top_k)


# ---- the selection rule on hand-made loads ----------------------------------------------------
def test_high_text_load_loses_to_low_text_load():
    # per 100 tokens, top-2 (rows sum to 200 slots)
    load = hand_load(
        text_counts=[[90, 5, 50, 55], [5, 90, 50, 55]],
        speech_counts=[[80, 70, 20, 30], [80, 70, 20, 30]],
    )
    # layer 0: expert 0 has the highest speech load but text uses it too (0.8*0.1=0.08); expert 1
    # (0.7*0.95=0.665) wins. Layer 1 (same speech load, text swapped): expert 0 wins.
    assert select_speech_experts(load, 1) == [[1], [0]]
    assert torch.allclose(load.score()[0], torch.tensor([0.08, 0.665, 0.1, 0.135], dtype=torch.float64))
    assert select_speech_experts(load, 2) == [[1, 3], [0, 3]]
    assert [len(x) for x in select_speech_experts(load, 3)] == [3, 3]
    with pytest.raises(ValueError, match="between 1 and 3"):
        select_speech_experts(load, 4)
    with pytest.raises(ValueError, match="between 1 and 3"):
        select_speech_experts(load, 0)


def test_layers_are_independent():
    base_text = [[10, 10, 10, 10, 80, 80]]
    layer_a = [[60, 10, 50, 0, 40, 40]]
    layer_b = [[0, 50, 0, 90, 30, 30]]
    load_ab = hand_load(base_text * 2, layer_a + layer_b)
    load_aa = hand_load(base_text * 2, layer_a * 2)
    # changing layer 1 does not change layer 0's choice
    assert select_speech_experts(load_ab, 2)[0] == select_speech_experts(load_aa, 2)[0] == [0, 2]
    assert select_speech_experts(load_ab, 2)[1] == [1, 3]


def test_ties_go_to_the_lower_index_and_lists_are_sorted():
    load = hand_load([[20, 20, 20, 20, 20, 20, 40, 40]], [[0, 50, 0, 50, 0, 50, 25, 25]])
    assert select_speech_experts(load, 2) == [[1, 3]]  # 1, 3, 5 tie
    load = hand_load([[0] * 8], [[10] * 8], text_tokens=1)
    assert select_speech_experts(load, 3) == [[0, 1, 2]]


def test_normalisations():
    load = hand_load([[90, 5, 50, 55]], [[80, 70, 20, 30]], text_tokens=100, speech_tokens=100, top_k=2)
    # per token (default): fraction of tokens using expert j, rows sum to top_k
    assert torch.allclose(load.text_load.sum(-1), torch.tensor([2.0], dtype=torch.float64))
    assert torch.allclose(load.speech_load[0], torch.tensor([0.8, 0.7, 0.2, 0.3], dtype=torch.float64))
    # per slot: rows sum to 1
    slot = ModalityLoad.from_dict({**load.to_dict(), "normalization": "slot"})
    assert torch.allclose(slot.text_load.sum(-1), torch.tensor([1.0], dtype=torch.float64))
    assert torch.allclose(load.load("speech", "slot"), load.speech_load / 2)
    # the rule is invariant to scaling ρA (here: 10x speech counts, same tokens) ...
    scaled = hand_load([[90, 5, 50, 55]], [[800, 700, 200, 300]], speech_tokens=100)
    assert select_speech_experts(scaled, 1) == select_speech_experts(load, 1)
    # ... but not to rescaling ρT: per slot, 1 - ρT is near 1 and speech load dominates
    assert select_speech_experts(load, 1) == [[1]]
    assert select_speech_experts(load, 1, normalization="slot") == [[1]]
    skew = hand_load([[100, 0, 50, 50]], [[100, 40, 30, 30]])
    assert select_speech_experts(skew, 1) == [[1]]  # expert 0 is used by every text token: score 0
    assert select_speech_experts(skew, 1, normalization="slot") == [[0]]  # 0.5*(1-0.5) > 0.2*(1-0)


def test_unmeasured_modality_is_an_error():
    load = hand_load([[1, 1, 0, 0]], [[0, 0, 0, 0]], speech_tokens=0)
    with pytest.raises(ValueError, match="No speech tokens"):
        select_speech_experts(load, 1)


def test_loads_add():
    a = hand_load([[1, 2, 3, 4]], [[4, 3, 2, 1]], text_tokens=5, speech_tokens=5)
    b = hand_load([[1, 1, 1, 1]], [[0, 0, 0, 0]], text_tokens=2, speech_tokens=0)
    c = a + b
    assert c.text_counts.tolist() == [[2, 3, 4, 5]] and c.text_tokens == 7 and c.speech_tokens == 5


# ---- measuring on tiny converted models -------------------------------------------------------
def text_and_speech_batches(num_batches=2, shape=(3, 12)):
    """Text data: ids 3..63, all text, with right padding in row 0. Speech data: ids 64..127; the
    last 8 positions are speech, the first 4 a 'text prompt' that must not count towards ρA."""
    text, speech = [], []
    for i in range(num_batches):
        ids = torch.randint(3, 64, shape, generator=torch.Generator().manual_seed(i))
        mask = torch.ones(shape, dtype=torch.long)
        mask[0, -3:] = 0
        text.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
                     "token_modality": torch.zeros(shape, dtype=torch.long)})
        ids = torch.randint(64, 128, shape, generator=torch.Generator().manual_seed(100 + i))
        modality = torch.ones(shape, dtype=torch.long)
        modality[:, :4] = 0
        speech.append({"input_ids": ids, "token_modality": modality})
    return text, speech


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_measured_counts_match_tokens_times_top_k(family, tiny_source):
    model = convert(tiny_source(family), experts=None)
    text, speech = text_and_speech_batches()
    load = measure_modality_load(model, text, speech, progress=False)
    top_k = model.config.text_config.num_experts_per_tok
    layers, experts = len(model.config.moe_layer_indices), model.config.num_routed_experts

    assert load.text_tokens == 2 * (3 * 12 - 3)  # padding excluded
    assert load.speech_tokens == 2 * 3 * 8  # only the speech positions of speech data
    assert load.text_counts.shape == load.speech_counts.shape == (layers, experts)
    assert (load.text_counts.sum(-1) == load.text_tokens * top_k).all()
    assert (load.speech_counts.sum(-1) == load.speech_tokens * top_k).all()
    assert (load.text_load.sum(-1) - top_k).abs().max() < 1e-9
    assert (load.text_load <= 1).all() and (load.speech_load <= 1).all()
    assert not torch.equal(load.text_counts, load.speech_counts)  # different id distributions
    assert load.top_k == top_k and load.moe_layer_indices == model.config.moe_layer_indices
    assert load.text_batches == load.speech_batches == 2

    # the speech counts are exactly the speech slots of the model's own expert_load
    with torch.no_grad():
        direct = sum(
            model(b["input_ids"], token_modality=b["token_modality"], output_expert_load=True).expert_load[:, 1]
            for b in speech
        )
    assert torch.equal(load.speech_counts, direct.long())

    only_first = measure_modality_load(model, text, speech, max_batches=1, progress=False)
    assert only_first.text_batches == 1 and only_first.speech_tokens == 3 * 8


def test_measuring_restores_mode_and_forces_free_routing(tiny_source):
    model = convert(tiny_source("olmoe"), experts=(1, 5), routing_mode="speech_only").train()
    text, speech = text_and_speech_batches(num_batches=1)
    load = measure_modality_load(model, text, speech, progress=False)
    assert model.training
    speech_only_experts = torch.zeros(8, dtype=torch.bool)
    speech_only_experts[[1, 5]] = True
    assert load.text_counts[:, ~speech_only_experts].sum() > 0  # free routing, not speech_only


def test_speech_positions_are_derived_from_multi_stream_ids(tiny_source):
    layout = SpeechTokenLayout(text_vocab_size=128, num_audio_streams=1, codebook_size=16, eot_id=2, pad_t_id=0)
    model = convert(tiny_source("qwen3_moe"), experts=None).add_speech(layout).eval()
    cfg = model.config
    start, _ = cfg.stream_range(1)
    pad_a = layout.audio_special_id("<|pad_a|>", 0)
    ids = torch.empty(2, 2, 10, dtype=torch.long)
    ids[:, 0] = random_ids(shape=(2, 10))
    ids[:, 1] = pad_a
    ids[:, 1, 5:9] = start + torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))  # codec codes
    audio_in = torch.zeros(2, 10, dtype=torch.bool)
    audio_in[1, 0:2] = True  # spliced-audio placeholders are speech too
    batch = {"input_ids": ids, "audio_input_mask": audio_in, "attention_mask": torch.ones(2, 10, dtype=torch.long),
             "labels": ids.clone(), "messages": ["not a tensor"]}
    load = measure_modality_load(model, [batch], [batch], progress=False)
    top_k = cfg.text_config.num_experts_per_tok
    assert load.speech_tokens == 2 * 4 + 2
    assert load.text_tokens == 20 - load.speech_tokens
    assert (load.speech_counts.sum(-1) == load.speech_tokens * top_k).all()


def test_speech_data_without_speech_tokens_warns(tiny_source):
    model = convert(tiny_source("mixtral"), experts=None)
    with pytest.warns(UserWarning, match="no speech tokens"):
        load = measure_modality_load(model, [random_ids()], [random_ids(seed=1)], progress=False)
    assert load.speech_tokens == 0 and load.text_tokens == 20


# ---- assignment through the model -------------------------------------------------------------
@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
def test_adaptive_assignment_moves_the_chosen_experts_and_keeps_free_logits(family, tiny_source):
    model = convert(tiny_source(family), experts=None)
    text, speech = text_and_speech_batches()
    load = measure_modality_load(model, text, speech, progress=False)
    ids = random_ids(shape=(2, 16))
    before_experts = [block.source_order_experts() for block in model.moe_blocks()]
    with torch.no_grad():
        before = model(ids, routing_mode="free").logits

    speech_experts = assign_speech_experts(model, load, num_speech_experts=3)

    assert speech_experts == select_speech_experts(load, 3)
    assert model.config.speech_experts == speech_experts and model.config.num_speech_experts == 3
    for block, chosen, (gate_up, down) in zip(model.moe_blocks(), speech_experts, before_experts):
        assert block.bank_members[1] == chosen
        assert block.bank_members[0] == [e for e in range(model.config.num_routed_experts) if e not in chosen]
        assert torch.equal(block.speech_bank.gate_up_proj, gate_up[chosen])
        assert torch.equal(block.speech_bank.down_proj, down[chosen])
    with torch.no_grad():
        after = model(ids, routing_mode="free").logits
    assert (before - after).abs().max() <= TOL


def test_assignment_rejects_a_load_of_another_model(tiny_source):
    model = convert(tiny_source("qwen3_moe"), experts=None)
    load = hand_load([[1] * 8] * 2, [[1] * 8] * 2)  # qwen3 tiny has 3 MoE layers
    with pytest.raises(ValueError, match="another model"):
        assign_speech_experts(model, load, 2)
    with pytest.raises(ValueError, match="needs a ModalityLoad"):
        assign_speech_experts(model, None, 2)
    with pytest.raises(ValueError, match="strategy"):
        assign_speech_experts(model, load, 2, strategy="nonsense")


def test_random_baseline_is_seeded(tiny_source):
    model = convert(tiny_source("olmoe"), experts=None)
    cfg = model.config
    a = random_speech_experts(cfg, 3, seed=0)
    assert a == random_speech_experts(cfg, 3, seed=0) == random_speech_experts(model, 3, seed=0)
    assert a != random_speech_experts(cfg, 3, seed=1)
    assert len(a) == len(cfg.moe_layer_indices)
    assert all(layer == sorted(layer) and len(set(layer)) == 3 and 0 <= min(layer) and max(layer) < 8 for layer in a)

    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
        chosen = assign_speech_experts(model, strategy="random", num_speech_experts=3, seed=0)
        after = model(ids).logits
    assert chosen == a and model.config.speech_experts == a
    assert (before - after).abs().max() <= TOL


# ---- serialisation and report -----------------------------------------------------------------
def test_json_round_trip(tmp_path):
    load = hand_load([[90, 5, 50, 55], [5, 90, 50, 55]], [[80, 70, 20, 30], [1, 2, 3, 4]], speech_tokens=75)
    again = ModalityLoad.from_json(load.to_json())
    assert torch.equal(again.text_counts, load.text_counts) and torch.equal(again.speech_counts, load.speech_counts)
    assert (again.text_tokens, again.speech_tokens, again.top_k) == (100, 75, 2)
    path = tmp_path / "load.json"
    load.to_json(path)
    assert torch.equal(ModalityLoad.from_json(path).speech_load, load.speech_load)
    assert torch.equal(ModalityLoad.from_json(str(path)).score(), load.score())


def test_report_files(tmp_path, tiny_source):
    model = convert(tiny_source("deepseek_v2"), experts=None)
    text, speech = text_and_speech_batches(num_batches=1)
    load = measure_modality_load(model, text, speech, progress=False)
    speech_experts = assign_speech_experts(model, load, num_speech_experts=2)
    paths = save_load_report(load, speech_experts, tmp_path / "model", strategy="adaptive")

    report = json.loads(paths["json"].read_text())
    assert paths["json"].name == "modality_load.json"
    assert report["speech_experts"] == speech_experts and report["strategy"] == "adaptive"
    assert report["text_counts"] == load.text_counts.tolist()
    assert report["token"]["speech_load"][0] == pytest.approx(load.speech_load[0].tolist())
    assert report["slot"]["score"] is not None
    assert torch.equal(ModalityLoad.from_json(paths["json"]).text_counts, load.text_counts)

    pytest.importorskip("matplotlib")
    assert paths["png"].name == "modality_load.png"
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE


def test_report_without_speech_tokens_still_writes(tmp_path):
    load = hand_load([[1, 1, 0, 0]], [[0, 0, 0, 0]], speech_tokens=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib is installed in the test venv: no warning expected
        paths = save_load_report(load, None, tmp_path)
    assert json.loads(paths["json"].read_text())["token"]["speech_load"] is None
    assert paths["png"].exists()


def test_moextend_strategy_adds_new_experts():
    from conftest import convert

    from deeptalk.tiny import tiny_text_moe
    from deeptalk.trainers.assignment import assign_speech_experts

    model = convert(tiny_text_moe("olmoe"), experts=None)
    speech = assign_speech_experts(model, None, num_speech_experts=2, strategy="moextend", seed=1)
    assert speech == [[8, 9]] * len(model.moe_blocks()) and model.config.num_routed_experts == 10
