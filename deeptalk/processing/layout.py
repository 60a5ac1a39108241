"""The multi-stream token layout (1 text stream + N audio streams per decoder step).

The layout class lives in `configuration_deeptalk` (it is stored in the model's config and shipped as
remote code); this module re-exports it for the processing side.
"""

from ..configuration_deeptalk import VOICE_PREFIX, SpeechTokenLayout, voice_token

__all__ = ["SpeechTokenLayout", "VOICE_PREFIX", "voice_token"]
