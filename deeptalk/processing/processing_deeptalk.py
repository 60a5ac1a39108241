"""`DeepTalkProcessor` and `DeepTalkDataCollator`: conversations with speech and text -> the model's
multi-stream inputs.

Defined in `deeptalk/processing_deeptalk.py`, the remote-code file saved folders carry; see its docstring
for the conversation format, the layout and the labels.
"""

from ..processing_deeptalk import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DeepTalkDataCollator,
    DeepTalkProcessor,
)

# A saved processor carries `processing_deeptalk.py` and an `auto_map`, so `AutoProcessor.from_pretrained(
# folder, trust_remote_code=True)` builds it where deeptalk is not installed.
DeepTalkProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["DEFAULT_CHAT_TEMPLATE", "IGNORE_INDEX", "DeepTalkDataCollator", "DeepTalkProcessor"]
