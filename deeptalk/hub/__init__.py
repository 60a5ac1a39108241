"""Hub export: remote-code folders (and, later, push and the Space)."""

from .remote_code import logits_via_remote_code

__all__ = ["logits_via_remote_code"]
