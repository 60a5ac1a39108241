"""kill -9 during `deeptalk convert --overwrite` into a folder that already holds a model leaves the previous
model or the new one, each complete and loadable with its own logits -- never the new config with the old
weights (what a non-atomic save left)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import os, signal, sys
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
target, kill_at = os.path.realpath(sys.argv[1]), int(sys.argv[2])
parent = os.path.dirname(target)
count = 0
def hook(event, args):
    global count
    if event == "open":
        path, mode, flags = args
        mutates = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE)
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "ctypes.call_function"):
        path, mutates = args[0] if args else "", True
    else:
        return
    if mutates and isinstance(path, (str, bytes, os.PathLike)) and os.fspath(path).startswith(parent) if not isinstance(path, bytes) else False:
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from deeptalk.cli import main
code = main(["convert", "tiny:qwen3_moe", target, "--overwrite", "--speech-experts", sys.argv[3]])
print("MUTATIONS", count)
sys.exit(code)
"""


def snapshot(folder):
    if not os.path.isdir(folder):
        return None
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def convert(target, experts, kill_at=0):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, str(target), str(kill_at), json.dumps(experts)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_killed_convert_leaves_the_old_or_the_new_model(tmp_path):
    import shutil

    target, saved_old, reference = tmp_path / "out", tmp_path / "old", tmp_path / "reference"
    old_experts, new_experts = [[1, 5]] * 3, [[0, 2]] * 3
    assert convert(saved_old, old_experts).returncode == 0
    shutil.copytree(saved_old, reference)
    done = convert(reference, new_experts)  # an uninterrupted overwrite: the new model, and how many steps it takes
    assert done.returncode == 0, done.stderr[-2000:]
    old, new = snapshot(saved_old), snapshot(reference)
    total = int(done.stdout.split("MUTATIONS")[-1])
    # a kill early, midway, and at each of the last steps (where the new folder takes the old one's place)
    kill_points = sorted({1, total // 2, total - 2, total - 1, total})
    seen = set()
    for kill_at in kill_points:
        shutil.rmtree(target, ignore_errors=True)
        for leftover in tmp_path.glob(".out.deeptalk-*"):  # a killed save's hidden sibling (the next save
            shutil.rmtree(leftover)                          # would clean it: remove it so the step count holds)
        shutil.copytree(saved_old, target)
        result = convert(target, new_experts, kill_at)
        assert result.returncode == -9, (kill_at, total, result.stderr[-2000:])
        after = snapshot(target)
        assert after in (old, new), f"a kill at filesystem step {kill_at} of {total} left a mixed folder"
        seen.add("old" if after == old else "new")
    assert seen == {"old", "new"}  # the kills landed both before and after the switch
    assert json.loads((target / "config.json").read_text())["speech_experts"] == new_experts
