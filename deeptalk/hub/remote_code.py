"""Check that an exported folder works with `trust_remote_code=True` where deeptalk is not installed.

Each check runs a real, fresh Python process in which `import deeptalk` fails (the module is blocked in
`sys.modules` before anything else runs), loads the folder through transformers' Auto classes with
`trust_remote_code=True` and hands its results back in safetensors + JSON files:

* `logits_via_remote_code`: `AutoModelForCausalLM` on given ids -> logits;
* `speak_via_remote_code`: `AutoModelForCausalLM` + `AutoProcessor` + the folder's `codec/`
  (`model.load_codec()`), then `model.generate_speech` on a spoken question -> text, layout, waveform;
* `pipeline_via_remote_code`: a stock `transformers.pipeline(task, model=folder)` on given inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_PRELUDE = r"""
import sys
sys.modules["deeptalk"] = None  # make `import deeptalk` fail: the folder must stand on its own
try:
    import deeptalk  # noqa: F401
    raise SystemExit("deeptalk is importable in the remote-code check process")
except ImportError:
    pass
import json, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor
folder, io_dir = sys.argv[1], sys.argv[2]
inputs = json.load(open(io_dir + "/inputs.json"))
torch.set_num_threads(inputs["num_threads"])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
"""

_LOGITS = _PRELUDE + r"""
ids = load_file(io_dir + "/inputs.safetensors")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
save_file({"logits": logits.contiguous()}, io_dir + "/outputs.safetensors")
json.dump({"modules": {"model": type(model).__module__}}, open(io_dir + "/outputs.json", "w"))
"""

_SPEAK = _PRELUDE + r"""
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
codec = model.load_codec()
question = [{"role": "user", "content": [{"type": "audio", "audio": inputs["audio"]}]}]
answer = model.generate_speech(processor, question, codec=codec, **inputs["decoding"])
save_file({"layout": answer.layout.contiguous(), "waveform": answer.waveform.contiguous()},
          io_dir + "/outputs.safetensors")
modules = {"model": type(model).__module__, "processor": type(processor).__module__, "codec": type(codec).__module__}
json.dump({"text": answer.text, "sampling_rate": answer.sampling_rate, "modules": modules},
          open(io_dir + "/outputs.json", "w"))
"""


_PIPELINE = _PRELUDE + r"""
from transformers import pipeline
pipe = pipeline(inputs["task"], model=folder, trust_remote_code=True)
outputs = pipe(inputs["inputs"], **inputs["call_kwargs"])
save_file({}, io_dir + "/outputs.safetensors")
json.dump({"outputs": outputs, "modules": {"model": type(pipe.model).__module__}}, open(io_dir + "/outputs.json", "w"))
"""


def _run_clean_child(script: str, folder, inputs: dict, tensors: dict | None, timeout: float) -> tuple[dict, dict]:
    """Run `script` on `folder` in a fresh process without deeptalk; return its (tensors, JSON) outputs."""
    with tempfile.TemporaryDirectory() as io_dir:
        json.dump({"num_threads": torch.get_num_threads(), **inputs}, open(os.path.join(io_dir, "inputs.json"), "w"))
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(io_dir, "inputs.safetensors"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        result = subprocess.run(
            [sys.executable, "-c", script, str(Path(folder).resolve()), io_dir],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=io_dir,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"Using {folder} with trust_remote_code=True in a clean process failed:\n{result.stderr[-4000:]}"
            )
        outputs = json.load(open(os.path.join(io_dir, "outputs.json")))
        return load_file(os.path.join(io_dir, "outputs.safetensors")), outputs


def logits_via_remote_code(folder: str | os.PathLike, input_ids: torch.Tensor,
                           timeout: float = 300) -> tuple[torch.Tensor, str]:
    """Logits of `folder`'s model on `input_ids`, computed in a fresh process without deeptalk.

    Returns `(logits, class_module)`; `class_module` is where the model class came from (a
    `transformers_modules.*` module when the remote code was used). Raises `RuntimeError` with the
    child's output if loading fails.
    """
    tensors, info = _run_clean_child(_LOGITS, folder, {}, {"input_ids": input_ids}, timeout)
    return tensors["logits"], info["modules"]["model"]


@dataclass
class RemoteSpeechAnswer:
    """What `speak_via_remote_code` got back from the clean process."""

    text: str
    layout: torch.Tensor  # [1 + N, steps]
    waveform: torch.Tensor  # [samples] float32
    sampling_rate: int
    modules: dict[str, str]  # "model" / "processor" / "codec" -> the module each class came from


def speak_via_remote_code(folder: str | os.PathLike, audio: str | os.PathLike, timeout: float = 300,
                          **decoding) -> RemoteSpeechAnswer:
    """Answer the spoken question in the audio file `audio` with `folder`'s model, processor and codec, loaded
    with `trust_remote_code=True` in a fresh process without deeptalk (this process's torch thread count).
    `decoding` options are `SpeechDecodingConfig` fields (JSON values). Raises `RuntimeError` with the
    child's output if anything fails."""
    audio = Path(audio).resolve()
    if not audio.is_file():
        raise FileNotFoundError(f"{audio} does not exist: give the spoken question as an audio file (WAV, FLAC, ...).")
    tensors, info = _run_clean_child(_SPEAK, folder, {"audio": str(audio), "decoding": decoding}, None, timeout)
    return RemoteSpeechAnswer(text=info["text"], layout=tensors["layout"], waveform=tensors["waveform"],
                              sampling_rate=info["sampling_rate"], modules=info["modules"])


def pipeline_via_remote_code(folder: str | os.PathLike, task: str, inputs, timeout: float = 300,
                             **call_kwargs) -> tuple[object, str]:
    """`transformers.pipeline(task, model=folder, trust_remote_code=True)(inputs, **call_kwargs)` in a fresh
    process without deeptalk (inputs and outputs as JSON). Returns `(outputs, model_class_module)`."""
    _, info = _run_clean_child(_PIPELINE, folder, {"task": task, "inputs": inputs, "call_kwargs": call_kwargs},
                               None, timeout)
    return info["outputs"], info["modules"]["model"]
