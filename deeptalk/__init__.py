"""deeptalk: DeepTalk (arXiv 2506.21864) -- a speech-in/speech-out MoE LLM with modality-specific experts.

`import deeptalk` makes `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoProcessor` load
DeepTalk folders without `trust_remote_code`. Saved folders also carry the remote-code files
(`auto_map`), so they load without this package with `trust_remote_code=True`.

The import itself is cheap (no torch, no transformers), so `deeptalk --help` answers at once:

* the public names (`deeptalk.DeepTalkForCausalLM`, ...) are imported on first access (PEP 562);
* the Auto classes are registered as soon as `transformers` is imported in the same process -- before
  `import deeptalk` (then right away) or after it (an import hook waits for `transformers` to finish
  importing, and for any deeptalk module still being imported, then registers). Every way to reach an
  Auto class goes through `import transformers`, so the registration is in place before the first
  `from_pretrained`, and a process that never imports transformers never pays for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC = {
    "DeepTalkConfig": "configuration_deeptalk",
    "ROUTING_MODES": "configuration_deeptalk",
    "SUPPORTED_FAMILIES": "configuration_deeptalk",
    "DeepTalkForCausalLM": "modeling_deeptalk",
    "DeepTalkModel": "modeling_deeptalk",
    "DeepTalkPreTrainedModel": "modeling_deeptalk",
    "route_tokens": "modeling_deeptalk",
    "DeepTalkProcessor": "processing.processing_deeptalk",
    "DeepTalkDataCollator": "processing.processing_deeptalk",
}
# submodules reachable as attributes after a bare `import deeptalk` (as when the package imported them eagerly)
_SUBMODULES = ("configuration_deeptalk", "modeling_deeptalk", "processing", "tiny", "data", "evaluation", "generation",
               "hub", "recipes", "trainers", "quickstart", "demo", "cli")

__all__ = [
    "ROUTING_MODES",
    "SUPPORTED_FAMILIES",
    "DeepTalkConfig",
    "DeepTalkDataCollator",
    "DeepTalkForCausalLM",
    "DeepTalkModel",
    "DeepTalkPreTrainedModel",
    "DeepTalkProcessor",
    "route_tokens",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))


def register_auto_classes() -> None:
    """Register DeepTalk with transformers' Auto classes (idempotent; imports torch and transformers)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

    from .configuration_deeptalk import DeepTalkConfig
    from .modeling_deeptalk import DeepTalkForCausalLM, DeepTalkModel
    from .processing.processing_deeptalk import DeepTalkProcessor

    AutoConfig.register(DeepTalkConfig.model_type, DeepTalkConfig, exist_ok=True)
    AutoModel.register(DeepTalkConfig, DeepTalkModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepTalkConfig, DeepTalkForCausalLM, exist_ok=True)
    AutoProcessor.register(DeepTalkConfig, DeepTalkProcessor, exist_ok=True)
    # Every save_pretrained also writes `auto_map` and copies the two self-contained files, so a saved
    # folder is Hub-ready and loads with `trust_remote_code=True` where deeptalk is not installed.
    DeepTalkConfig.register_for_auto_class()
    DeepTalkModel.register_for_auto_class("AutoModel")
    DeepTalkForCausalLM.register_for_auto_class("AutoModelForCausalLM")


_lock = threading.Lock()
_state = "pending"  # -> "running" -> "done"


def _initializing(module) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register_when_ready(just_loaded: str | None = None) -> None:
    """Register once transformers is imported and no deeptalk submodule is half-imported (registering
    imports deeptalk's modeling and processing modules, which must not meet a partial module)."""
    global _state
    # never wait here: this runs inside imports, and a thread blocked on it could hold a module lock we need
    if not _lock.acquire(blocking=False):
        return
    try:
        if _state != "pending" or "transformers" not in sys.modules:
            return
        for name, module in list(sys.modules.items()):
            if name.startswith(__name__ + ".") and name != just_loaded and _initializing(module):
                return  # retried when that module finishes (its loader is wrapped)
        _state = "running"
        try:
            register_auto_classes()
        except BaseException:
            _state = "pending"
            raise
        _state = "done"
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
    finally:
        _lock.release()


class _ThenRegister(importlib.abc.Loader):
    """Wraps a module's loader: runs it, then tries the registration."""

    def __init__(self, loader, fullname: str):
        self._loader, self._fullname = loader, fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_when_ready(just_loaded=self._fullname)

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _AutoRegistrationFinder(importlib.abc.MetaPathFinder):
    """Watches the imports of `transformers` and of deeptalk's own submodules until the registration is done."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader, fullname)
                return spec
        return None


_finder = _AutoRegistrationFinder()
if "transformers" in sys.modules:
    _register_when_ready()
if _state == "pending":
    sys.meta_path.insert(0, _finder)
