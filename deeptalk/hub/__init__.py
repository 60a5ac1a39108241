"""Hub export: remote-code folders, the rendered model card, push, and a gradio Space to talk with the model."""

from .push import export_for_hub, push_to_hub, render_model_card
from .remote_code import logits_via_remote_code
from .space import create_space, push_space

__all__ = [
    "create_space",
    "export_for_hub",
    "logits_via_remote_code",
    "push_space",
    "push_to_hub",
    "render_model_card",
]
