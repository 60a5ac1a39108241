# Copyright 2026 The deeptalk authors. Apache-2.0.
"""Helpers shared by the benchmark scripts: machine info and foreign CPU load.

The scripts are run as ``python benchmarks/<script>.py``, so this folder is ``sys.path[0]`` and they
import ``from _common import ...``. Nothing heavy is imported at module level (``machine_info``
imports torch and transformers when called), so a script can set its environment (e.g.
``HF_HUB_OFFLINE``) before or after importing this module, and a driver process that never calls
``machine_info`` does not load torch.
"""

from __future__ import annotations

import os
import platform
import time

NOISY_FOREIGN_LOAD = 0.25  # cores used by other processes above which a timed block is flagged
EXPERTS_IMPLS = ("grouped_mm", "batched_mm", "eager")  # transformers experts implementations


# --------------------------------------------------------------------------------------------------
# Machine info
# --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_mib() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) // 1024


def machine_info(threads: int, *, mem_total: bool = False, deeptalk_version: bool = True,
                 loadavg: bool = True) -> dict:
    """CPU, thread count and library versions. Options add or leave out keys:
    `mem_total` adds ``mem_total_mib`` (from /proc/meminfo), `deeptalk_version` adds ``deeptalk``,
    `loadavg` adds ``loadavg_start`` (``os.getloadavg()`` now, or None)."""
    import torch
    import transformers

    info = {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": threads}
    if mem_total:
        info["mem_total_mib"] = mem_total_mib()
    info.update(torch=torch.__version__, transformers=transformers.__version__)
    if deeptalk_version:
        import deeptalk

        info["deeptalk"] = getattr(deeptalk, "__version__", "?")
    info.update(python=platform.python_version(), platform=platform.platform())
    if loadavg:
        info["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


# --------------------------------------------------------------------------------------------------
# Foreign CPU load
# --------------------------------------------------------------------------------------------------
class ForeignLoad:
    """How many CPU cores *other* processes kept busy during a block (from /proc/stat minus our own
    CPU time). This container's cores are shared; a block with foreign load is not trustworthy.
    ``cores`` is None when /proc/stat cannot be read."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @classmethod
    def _busy_s(cls):
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / cls.TICK

    @staticmethod
    def _own_s():
        t = os.times()
        return t.user + t.system

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_s(), self._own_s()
        self.cores = None
        return self

    def __exit__(self, *exc):
        busy1 = self._busy_s()
        wall = time.perf_counter() - self.t0
        if busy1 is not None and self.busy0 is not None and wall > 0:
            self.cores = max(0.0, ((busy1 - self.busy0) - (self._own_s() - self.own0)) / wall)
        return False


def wait_for_idle(max_wait_s: float, threshold: float = 0.15, window_s: float = 1.0) -> float | None:
    """Wait (up to `max_wait_s`) until other processes use < `threshold` cores over `window_s`.

    Returns the foreign load of the last window: below `threshold`, or whatever it was when the time
    ran out. With `max_wait_s` <= 0 it returns None at once; when the load cannot be measured it
    returns None after one window (there is nothing to wait for)."""
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    while True:
        with ForeignLoad() as load:
            time.sleep(window_s)
        if load.cores is None or load.cores < threshold or time.monotonic() >= deadline:
            return load.cores


def load_flag(cores: float | None) -> str:
    """Foreign load for a table cell: ``?`` when unknown, ``(!)`` above NOISY_FOREIGN_LOAD."""
    if cores is None:
        return "?"
    return f"{cores:.2f}" + (" (!)" if cores > NOISY_FOREIGN_LOAD else "")


# --------------------------------------------------------------------------------------------------
# Shared model pieces
# --------------------------------------------------------------------------------------------------
WHISPER_SHAPES = {  # d_model, encoder layers, heads, ffn of openai/whisper-* encoders (+ a tiny smoke shape)
    "smoke": (256, 2, 4, 512),
    "tiny": (384, 4, 6, 1536),
    "base": (512, 6, 8, 2048),
    "small": (768, 12, 12, 3072),
    "medium": (1024, 24, 16, 4096),
}


def whisper_config(shape: str):
    """A random-init WhisperConfig with the encoder shape of `shape` (a key of WHISPER_SHAPES)."""
    from transformers import WhisperConfig

    d_model, layers, heads, ffn = WHISPER_SHAPES[shape]
    return WhisperConfig(num_mel_bins=80, d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
                         encoder_ffn_dim=ffn, decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=ffn,
                         vocab_size=100, max_source_positions=1500, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1)


def step_timer(clock=time.perf_counter):
    """A no-op transformers LogitsProcessor that time-stamps every generate() step (it runs right
    after each forward) with `clock`: `timer.stamps` are the per-step times."""
    from transformers import LogitsProcessor

    class StepTimer(LogitsProcessor):
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(clock())
            return scores

    return StepTimer()
