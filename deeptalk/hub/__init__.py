"""Hub export: remote-code folders, the rendered model card, push, and a gradio Space to talk with the model."""

from .push import export_for_hub, push_to_hub, render_model_card
from .remote_code import RemoteSpeechAnswer, logits_via_remote_code, pipeline_via_remote_code, speak_via_remote_code
from .space import create_space, push_space

__all__ = [
    "RemoteSpeechAnswer",
    "create_space",
    "export_for_hub",
    "logits_via_remote_code",
    "pipeline_via_remote_code",
    "push_space",
    "push_to_hub",
    "render_model_card",
    "speak_via_remote_code",
]
