"""Every training phase under every engine: DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, each one real
`accelerate launch` of 2 CPU processes (gloo) with the shipped `deeptalk/recipes/accelerate/*.yaml`
(only `--num_processes 2` changed) running all five phases in sequence (tests/scripts/scale_out_phases.py:
the `deeptalk train` path with the tiny_cpu recipes, bf16 as the shipped configs say, gradient
checkpointing and 2 accumulated micro-batches as the paper's recipes). Per phase and engine: >= 2 optimizer
steps; the parameters the phase table freezes are bit-identical in the saved folder; the optimizer holds
exactly the trainable parameters; the saved folder loads with `from_pretrained` in the model's own dtypes;
resuming from the step-2 checkpoint under the same engine gives the same losses; in the joint phase some
micro-batch has audio on one rank and none on the other. Under ZeRO-3 the DPO phase runs once more on a model
that DeepSpeed partitioned as it loaded (zero.Init), the Python API's way to load a large model.

FSDP: accelerate attaches FSDP only on accelerator devices, so on CPU the shipped fsdp.yaml becomes DDP
(and `deeptalk train` refuses it, tested below). The FSDP cell therefore installs a small test-side shim
(tests/scripts/fsdp_cpu_shim.py) that switches accelerate's CPU state to FSDP with the plugin accelerate
builds from the same launcher environment. Everything after that is accelerate's and transformers' own FSDP2
code, the code GPU users run: `fully_shard` per `_no_split_modules` class, the bf16 mixed-precision policy,
full-state-dict gathering at save, sharded checkpoints and their loading on resume.

DeepSpeed runs on CPU with DS_ACCELERATOR=cpu; its first run JIT-compiles its shared-memory comm op and
CPU Adam (about 10 minutes on 2 cores) into torch's extension cache (TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions), which the ZeRO-3 launch and later runs reuse. Without deepspeed those cells skip.
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

SCRIPTS = Path(__file__).parent / "scripts"
CONFIGS = Path(__file__).parent.parent / "deeptalk" / "recipes" / "accelerate"
sys.path.insert(0, str(SCRIPTS))
from scale_out_setup import PHASES, write_model_and_data

# bf16: what the shipped accelerate configs say; checkpointing and accumulation: what the paper's recipes use
OVERRIDES = ["bf16=true", "gradient_checkpointing=true", "gradient_accumulation_steps=2", "per_device_train_batch_size=1"]
ENGINES = {  # engine -> (shipped config, accelerate's distributed type, extra environment)
    "ddp": ("ddp.yaml", "DistributedType.MULTI_CPU", {}),
    "zero2": ("deepspeed_zero2.yaml", "DistributedType.DEEPSPEED", {"DS_ACCELERATOR": "cpu"}),
    "zero3": ("deepspeed_zero3.yaml", "DistributedType.DEEPSPEED", {"DS_ACCELERATOR": "cpu"}),
    "fsdp": ("fsdp.yaml", "DistributedType.FSDP", {"SCALE_OUT_FORCE_FSDP": "1"}),
}
# what the phase table (deeptalk/trainers/freezing.py) freezes and trains, by parameter name
FROZEN = {
    "align": ["model.layers.1.mlp.text_bank.gate_up_proj", "model.layers.1.mlp.router.weight", "model.embed_tokens.weight",
              "lm_head.weight", "model.audio_encoder.conv1.weight", "model.layers.0.mlp.gate_proj.weight"],
    "experts_speech": ["model.layers.1.mlp.text_bank.gate_up_proj", "model.layers.2.mlp.router.weight", "model.embed_tokens.weight",
                       "lm_head.weight", "model.audio_encoder.conv1.weight", "model.audio_adapter.proj_in.weight",
                       "model.layers.1.self_attn.kv_b_proj.weight"],
    "experts_text": ["model.layers.1.mlp.speech_bank.gate_up_proj", "model.layers.2.mlp.router.weight",
                     "model.audio_encoder.conv1.weight", "model.audio_adapter.proj_in.weight"],
    "joint": ["model.audio_encoder.conv1.weight", "model.audio_adapter.proj_in.weight"],
    "dpo": ["model.audio_encoder.conv1.weight", "model.audio_adapter.proj_in.weight"],
}
TRAINED = {
    "align": ["model.audio_adapter.proj_in.weight", "model.audio_adapter.proj_out.weight"],  # ASR: no audio labels
    "experts_speech": ["model.layers.1.mlp.speech_bank.gate_up_proj", "model.layers.0.mlp.gate_proj.weight", "lm_head.audio_weight"],
    "experts_text": ["model.layers.1.mlp.text_bank.gate_up_proj", "model.embed_tokens.weight"],
    "joint": ["model.layers.1.mlp.text_bank.gate_up_proj", "model.layers.1.mlp.speech_bank.gate_up_proj",
              "model.layers.1.mlp.router.weight", "model.layers.1.self_attn.kv_b_proj.weight"],
    "dpo": ["model.layers.1.mlp.speech_bank.gate_up_proj", "model.layers.1.mlp.router.weight", "lm_head.audio_weight"],
}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str, *command: str, env: dict, timeout: int):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
              "--num_processes", "2", "--main_process_port", str(free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")])), **env}
    return subprocess.run(launch + list(command), capture_output=True, text=True, timeout=timeout, env=env, check=False)


def tensors(folder: Path) -> dict:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_model_and_data(tmp_path_factory.mktemp("scale_out"))


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_phase_under_engine(engine, workdir, tmp_path):
    config, distributed_type, env = ENGINES[engine]
    if env.get("DS_ACCELERATOR") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed: pip install 'deeptalk[deepspeed]' to run the ZeRO cells")
    start = time.perf_counter()
    phases = list(PHASES) + (["dpo@zero_init"] if engine == "zero3" else [])
    result = accelerate_launch(config, str(SCRIPTS / "scale_out_phases.py"), str(workdir), str(tmp_path), ",".join(phases),
                               *OVERRIDES, env=env, timeout=2400)
    assert result.returncode == 0, result.stderr[-6000:]
    timings = {"launch_s": round(time.perf_counter() - start, 1)}
    source = tensors(workdir / "model")
    for phase in phases:
        reports = [json.loads((tmp_path / phase / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        timings[phase] = round(reports[0]["phase_seconds"], 1)
        check_phase(phase, reports, source, tmp_path / phase, distributed_type)
    print(f"\n{engine}: {json.dumps(timings)}")


def check_phase(phase: str, reports: list, source: dict, output: Path, distributed_type: str):
    first, second = reports
    where = f"{phase} under {distributed_type}"
    # loaded partitioned by ZeRO-3 (zero.Init), the fp32 routers arrive in bf16: DeepSpeed keeps only buffers in fp32
    phase, zero_init = phase.partition("@")[0], phase.endswith("@zero_init")
    rounded_at_load = {name for name in source if ".router." in name} if zero_init else set()
    assert [r["engine"] for r in reports] == [distributed_type] * 2, where
    assert [r["world_size"] for r in reports] == [2, 2], where
    # trained: 4 optimizer steps, finite losses the ranks agree on
    assert first["global_step"] == 4 and first["logged_steps"] == [1, 2, 3, 4], where
    assert all(math.isfinite(loss) and abs(loss) < 100 for loss in first["losses"]), (where, first["losses"])
    assert first["losses"] == second["losses"], where
    # the optimizer holds exactly the trainable parameters, counted from the saved input model too
    trainable_in_source = sum(source[name].numel() for name in first["trainable"])
    for report in reports:
        assert report["optimizer_all_trainable"], where
        assert report["optimizer_numel"] == report["trainable_numel"] == trainable_in_source, where
    # the phase table: these stay bit-identical, these train
    saved = tensors(output)
    assert set(saved) == set(source), where
    assert set(FROZEN[phase]) <= set(first["frozen"]) and set(TRAINED[phase]) <= set(first["trainable"]), where
    for name in set(first["frozen"]) - rounded_at_load:
        assert saved[name].dtype == source[name].dtype and torch.equal(saved[name], source[name]), f"{where}: {name} changed"
    for name in rounded_at_load:
        assert saved[name].dtype == torch.bfloat16, where
    for name in TRAINED[phase]:
        assert not torch.equal(saved[name].float(), source[name].float()), f"{where}: {name} did not train"
    # a folder from_pretrained loads, in the model's own dtypes, with its code, config and processor
    assert {n: t.dtype for n, t in saved.items() if n not in rounded_at_load} == {
        n: t.dtype for n, t in source.items() if n not in rounded_at_load}, where
    files = {p.name for p in output.iterdir()}
    assert {"config.json", "modeling_deeptalk.py", "processor_config.json", "tokenizer.json", "deeptalk_phases.json"} <= files
    assert not [f for f in files if f.startswith("_fsdp")], where  # FSDP2's generated class is not the model's code
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deeptalk.DeepTalkForCausalLM", where
    from transformers import AutoModelForCausalLM, AutoProcessor

    import deeptalk  # noqa: F401

    loaded = AutoModelForCausalLM.from_pretrained(output)
    assert torch.equal(loaded.lm_head.audio_weight.detach(), saved["lm_head.audio_weight"].to(loaded.lm_head.audio_weight.dtype))
    assert AutoProcessor.from_pretrained(output).layout == loaded.config.layout
    # resuming from the step-2 checkpoint under the same engine continues the same loss curve
    resumed = first["resumed"]
    assert resumed["global_step"] == 4 and resumed["logged_steps"] == [1, 2, 3, 4], where
    assert resumed["losses"][2:] == pytest.approx(first["losses"][2:], rel=1e-3), where
    # ranks whose batch holds no audio train alongside ranks whose batch does
    if phase == "joint":
        assert any(a != b for a, b in zip(first["had_audio"], second["had_audio"])), where
    if phase == "experts_text":
        assert not any(first["had_audio"] + second["had_audio"]), where


def test_fsdp_asked_for_on_cpu_is_refused(workdir, tmp_path):
    """Without the shim, accelerate would run the shipped fsdp.yaml as DDP on CPU: `deeptalk train` says so."""
    result = accelerate_launch("fsdp.yaml", "-m", "deeptalk", "train", "experts", "--recipe", "tiny_cpu/experts_speech",
                               "--model", str(workdir / "model"), "--data", str(workdir / "speech.jsonl"),
                               "--output", str(tmp_path / "out"), "--set", "bf16=true", "max_steps=1", env={}, timeout=900)
    assert result.returncode != 0
    assert "The launch asks for FSDP" in result.stderr and "DDP over gloo on CPU" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_deeptalk_train_under_ddp_prints_its_completion_line_once(workdir, tmp_path):
    result = accelerate_launch("ddp.yaml", "-m", "deeptalk", "train", "experts", "--recipe", "tiny_cpu/experts_speech",
                               "--model", str(workdir / "model"), "--data", str(workdir / "speech.jsonl"),
                               "--output", str(tmp_path / "out"), "--set", "bf16=true", "max_steps=2",
                               "per_device_train_batch_size=2", env={}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("deeptalk train experts:")]
    assert lines == [f"deeptalk train experts: 2 steps on 8 conversations -> {tmp_path / 'out'}"], result.stdout[-2000:]
