"""Text special tokens of the DeepTalk chat format, and a tiny tokenizer trained on the spot.

Real checkpoints keep their own tokenizer; `add_deeptalk_tokens` adds the chat specials to it (both
defined in `deeptalk/processing_deeptalk.py`, the processor's remote-code file). The demo, tests and
quickstart cannot download one, so `train_demo_tokenizer` fits a byte-level BPE on the texts at hand
in milliseconds (`tokenizers`), wrapped as a transformers fast tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..processing_deeptalk import TEXT_SPECIAL_TOKENS, add_deeptalk_tokens


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer fitted on `texts`, with DeepTalk's specials. For offline demos and
    tests only: real models keep the tokenizer they were trained with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *TEXT_SPECIAL_TOKENS.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token=TEXT_SPECIAL_TOKENS["eot"],
        pad_token=TEXT_SPECIAL_TOKENS["pad_t"],
    )
    add_deeptalk_tokens(tokenizer)  # registers them as special (never split, skipped when decoding)
    return tokenizer


__all__ = ["TEXT_SPECIAL_TOKENS", "add_deeptalk_tokens", "train_demo_tokenizer"]
