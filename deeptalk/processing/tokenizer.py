"""Text special tokens of the DeepTalk chat format, and a tiny tokenizer trained on the spot.

Real checkpoints keep their own tokenizer; `add_deeptalk_tokens` adds the chat specials to it. The
demo, tests and quickstart cannot download one, so `train_demo_tokenizer` fits a byte-level BPE on
the texts at hand in milliseconds (`tokenizers`), wrapped as a transformers fast tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

TEXT_SPECIAL_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "eot": "<|eot|>",  # ends a turn's text (the paper's EOT)
    "pad_t": "<|pad_t|>",  # fills the text stream while speech goes on (PAD_T)
    "audio_in": "<|audio_in|>",  # placeholder for a user audio segment (expanded by the processor)
    "speech_turn": "<|speech_turn|>",  # placeholder for an assistant turn laid out as text + speech
}
"""Special tokens of the text stream. The two placeholders never reach the model: the processor
replaces them by the audio segment and by the delayed text+speech layout."""


def add_deeptalk_tokens(tokenizer) -> int:
    """Add DeepTalk's text specials to `tokenizer` (a pad token too if it has none). Returns how
    many were added; resize the model's text block to `len(tokenizer)` afterwards."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(TEXT_SPECIAL_TOKENS.values())})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = TEXT_SPECIAL_TOKENS["pad_t"]
    return added


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
