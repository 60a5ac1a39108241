"""The release: a wheel builds from a copy of this checkout, installs into a fresh virtual environment with its
package data, and the installed `deeptalk` answers `--help` and runs `deeptalk quickstart --fast` from a folder
outside the repository.

The fresh environment gets only the wheel (`--no-deps`); its dependencies come from this Python's environment,
appended to its `sys.path` by a `.pth` file after the install (so pip never sees them, and the `.pth` files of
this environment, such as an editable install of deeptalk, are not run there). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                 "deeptalk_output", "outputs")

# Read by the installed package in a fresh process: every kind of package data, and where it was found.
PACKAGE_DATA_PROBE = r"""
import importlib.metadata, json, os, sys
import deeptalk
from deeptalk.data import demo_corpus_manifest, load_demo_corpus
from deeptalk.hub.push import TEMPLATE as MODEL_CARD_TEMPLATE
from deeptalk.trainers.recipes import RECIPES_DIR, load_recipe

package = os.path.dirname(deeptalk.__file__)
corpus = load_demo_corpus("spoken_qa", decode_audio=False)
print(json.dumps({
    "file": deeptalk.__file__,
    "version": deeptalk.__version__,
    "metadata_version": importlib.metadata.version("deeptalk"),
    "recipes": sorted(os.path.relpath(os.path.join(d, f), RECIPES_DIR) for d, _, fs in os.walk(RECIPES_DIR)
                      for f in fs if f.endswith(".yaml")),
    "joint_phase": load_recipe("tiny_cpu/joint")["phase"],
    "corpus_test_rows": len(corpus["test"]),
    "corpus_audio_exists": os.path.isfile(corpus["test"][0]["question_audio"]),
    "corpus_manifest": bool(demo_corpus_manifest()),
    "model_card": os.path.isfile(MODEL_CARD_TEMPLATE),
    "space_app": os.path.isfile(os.path.join(package, "hub", "space_template", "app.py")),
    "error_rate": sorted(os.listdir(os.path.join(package, "evaluation", "error_rate"))),
    "remote_code": sorted(f for f in os.listdir(package) if f.endswith("_deeptalk.py")),
}))
"""


def _run(argv, *, cwd, env, timeout=600):
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(map(str, argv))}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin folder, clean environment) with the freshly built wheel installed."""
    pytest.importorskip("build", reason="`build` is in the test extra: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("release")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=IGNORED, symlinks=True)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "DEEPTALK_HOME", "PYTHONHOME"}}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist"), str(source)],
         cwd=root, env=env)
    (wheel,) = (root / "dist").glob("deeptalk-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=root, env=env)
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=root, env=env).stdout.strip())
    (purelib / "_deeptalk_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return {"wheel": wheel, "python": python, "bin": venv / "bin", "env": env, "purelib": purelib,
            "outside": root / "elsewhere"}


def test_wheel_carries_the_version_and_package_data(installed):
    assert installed["wheel"].name.startswith("deeptalk-0.2.0-"), installed["wheel"].name
    outside = installed["outside"]
    outside.mkdir(exist_ok=True)
    report = json.loads(_run([str(installed["python"]), "-c", PACKAGE_DATA_PROBE], cwd=outside,
                             env=installed["env"]).stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(installed["purelib"]), report["file"]  # the wheel, not the checkout
    assert report["version"] == report["metadata_version"] == "0.2.0"
    recipes = {"tiny_cpu/joint.yaml", "deepseek_v2_lite/dpo.yaml", "accelerate/deepspeed_zero3.yaml"}
    assert recipes <= set(report["recipes"])
    assert report["joint_phase"] == "joint"
    assert report["corpus_test_rows"] > 0 and report["corpus_audio_exists"] and report["corpus_manifest"]
    assert report["model_card"] and report["space_app"]
    assert "error_rate.py" in report["error_rate"]
    assert report["remote_code"] == ["codec_deeptalk.py", "configuration_deeptalk.py", "generation_deeptalk.py",
                                     "modeling_deeptalk.py", "processing_deeptalk.py"]


def test_installed_command_runs_the_quickstart_outside_the_repository(installed):
    outside = installed["outside"]
    outside.mkdir(exist_ok=True)
    deeptalk = str(installed["bin"] / "deeptalk")
    assert "quickstart" in _run([deeptalk, "--help"], cwd=outside, env=installed["env"]).stdout

    # phase 1 on the CTC loss alone: the flag reaches the phase (the default path is tests/test_quickstart.py's)
    _run([deeptalk, "quickstart", "--fast", "--align-loss", "ctc"], cwd=outside, env=installed["env"], timeout=1200)
    output = outside / "deeptalk_output" / "quickstart"
    summary = json.loads((output / "summary.json").read_text())
    assert 0.0 <= summary["final_text_qa_accuracy"] <= 1.0
    assert (output / "model" / "model.safetensors").is_file() and (output / "model" / "codec").is_dir()
    assert (output / "modality_load.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((output / "model" / "config.json").read_text())
    assert config["model_type"] == "deeptalk" and config["speech_experts"]
    phases = json.loads((output / "model" / "deeptalk_phases.json").read_text())
    assert phases[0]["phase"] == "align" and phases[0]["loss_type"] == "ctc"
