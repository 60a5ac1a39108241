"""Check that an exported folder loads with `trust_remote_code=True` where deeptalk is not installed.

The check runs a real, fresh Python process in which `import deeptalk` fails (the module is blocked
in `sys.modules` before anything else runs), loads the folder through `AutoModelForCausalLM` with
`trust_remote_code=True`, runs it on the given ids and hands the logits back in a safetensors file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_CHILD = r"""
import sys
sys.modules["deeptalk"] = None  # make `import deeptalk` fail: the folder must stand on its own
import json, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
folder, io_dir = sys.argv[1], sys.argv[2]
try:
    import deeptalk  # noqa: F401
    raise SystemExit("deeptalk is importable in the remote-code check process")
except ImportError:
    pass
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = load_file(io_dir + "/inputs.safetensors")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
save_file({"logits": logits.contiguous()}, io_dir + "/logits.safetensors")
json.dump({"class_module": type(model).__module__}, open(io_dir + "/info.json", "w"))
"""


def logits_via_remote_code(folder: str | os.PathLike, input_ids: torch.Tensor, timeout: float = 300) -> tuple[torch.Tensor, str]:
    """Logits of `folder`'s model on `input_ids`, computed in a fresh process without deeptalk.

    Returns `(logits, class_module)`; `class_module` is where the model class came from (a
    `transformers_modules.*` module when the remote code was used). Raises `RuntimeError` with the
    child's output if loading fails.
    """
    import json

    with tempfile.TemporaryDirectory() as io_dir:
        save_file({"input_ids": input_ids.contiguous()}, os.path.join(io_dir, "inputs.safetensors"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(Path(folder).resolve()), io_dir],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=io_dir,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"Loading {folder} with trust_remote_code=True in a clean process failed:\n{result.stderr[-4000:]}"
            )
        logits = load_file(os.path.join(io_dir, "logits.safetensors"))["logits"]
        info = json.load(open(os.path.join(io_dir, "info.json")))
    return logits, info["class_module"]
