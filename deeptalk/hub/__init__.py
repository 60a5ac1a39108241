"""Hub export: remote-code folders, the rendered model card, push (and, later, the Space)."""

from .push import export_for_hub, push_to_hub, render_model_card
from .remote_code import logits_via_remote_code

__all__ = ["export_for_hub", "logits_via_remote_code", "push_to_hub", "render_model_card"]
