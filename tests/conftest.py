import os

# Nothing may be fetched from the Hub in tests; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread avoids OpenMP stalls on tiny ops (and leaves the second core to
# subprocess tests).
torch.set_num_threads(1)


@pytest.fixture
def tiny_source():
    """Factory: a tiny random source MoE LLM of one family (fp32, eval)."""
    from deeptalk.tiny import tiny_text_moe

    return tiny_text_moe


def speech_map(config, experts=(1, 5)):
    """The same speech experts in every MoE layer of a DeepTalk config."""
    return [list(experts) for _ in config.moe_layer_indices]


def convert(source, experts=(1, 5), **overrides):
    import deeptalk
    from deeptalk.configuration_deeptalk import DeepTalkConfig

    layers = DeepTalkConfig(text_config=source.config.to_dict()).moe_layer_indices
    mapping = None if experts is None else [list(experts) for _ in layers]
    model = deeptalk.DeepTalkForCausalLM.from_text_moe(source, speech_experts=mapping, progress=False, **overrides)
    return model.eval()


def random_ids(vocab_size=128, shape=(2, 10), seed=0):
    return torch.randint(3, vocab_size, shape, generator=torch.Generator().manual_seed(seed))
