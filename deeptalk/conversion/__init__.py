"""Tooling that turns other checkpoints into DeepTalk's (not shipped as remote code).

- `from_text_moe`: a transformers MoE LLM -> `DeepTalkForCausalLM` (expert banks split by the speech map).
- `upgrade_folder`: a folder saved by deeptalk 0.1 (format 1) -> the current format.
"""

from .text_moe import from_text_moe
from .upgrade import upgrade_folder

__all__ = ["from_text_moe", "upgrade_folder"]
