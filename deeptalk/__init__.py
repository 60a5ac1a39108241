"""deeptalk: DeepTalk (arXiv 2506.21864) -- a speech-in/speech-out MoE LLM with modality-specific experts.

`import deeptalk` registers the Auto classes, so `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM` load DeepTalk folders without `trust_remote_code`. Saved folders also carry
the remote-code files (`auto_map`), so they load without this package with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_deeptalk import ROUTING_MODES, SUPPORTED_FAMILIES, DeepTalkConfig
from .modeling_deeptalk import DeepTalkForCausalLM, DeepTalkModel, DeepTalkPreTrainedModel, route_tokens
from .processing.processing_deeptalk import DeepTalkDataCollator, DeepTalkProcessor

__version__ = "0.1.0"

AutoConfig.register(DeepTalkConfig.model_type, DeepTalkConfig, exist_ok=True)
AutoModel.register(DeepTalkConfig, DeepTalkModel, exist_ok=True)
AutoModelForCausalLM.register(DeepTalkConfig, DeepTalkForCausalLM, exist_ok=True)
AutoProcessor.register(DeepTalkConfig, DeepTalkProcessor, exist_ok=True)
# Every save_pretrained also writes `auto_map` and copies the two self-contained files, so a saved
# folder is Hub-ready and loads with `trust_remote_code=True` where deeptalk is not installed.
DeepTalkConfig.register_for_auto_class()
DeepTalkModel.register_for_auto_class("AutoModel")
DeepTalkForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "DeepTalkConfig",
    "DeepTalkDataCollator",
    "DeepTalkProcessor",
    "DeepTalkForCausalLM",
    "DeepTalkModel",
    "DeepTalkPreTrainedModel",
    "ROUTING_MODES",
    "SUPPORTED_FAMILIES",
    "route_tokens",
]
