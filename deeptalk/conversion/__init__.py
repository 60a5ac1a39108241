"""Tooling that turns other checkpoints into DeepTalk's (not shipped as remote code).

- `from_text_moe`: a transformers MoE LLM -> `DeepTalkForCausalLM` (expert banks split by the speech map);
  `convert_folder`: the same, folder to folder, with the source's tokenizer and a chat template (`deeptalk convert`).
- `upgrade_folder`: a folder saved by deeptalk 0.1 (format 1) -> the current format.
"""

from .text_moe import convert_folder, from_text_moe, load_source_tokenizer
from .upgrade import upgrade_folder

__all__ = ["convert_folder", "from_text_moe", "load_source_tokenizer", "upgrade_folder"]
