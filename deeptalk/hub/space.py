"""A Hugging Face Space (gradio SDK) that talks with a DeepTalk model.

`create_space` writes a folder that is a complete Space repository:

* ``app.py`` -- the gradio app (from ``space_template/app.py``): record or upload a spoken question
  (or type one); the spoken answer streams back chunk by chunk while it is decoded, the answer text
  streams in, and a heatmap plus a table show which routed experts fired for text tokens and for
  speech tokens in each MoE layer;
* ``requirements.txt`` -- what the app imports besides gradio (gradio itself comes from ``sdk_version``);
* ``packages.txt`` -- ``ffmpeg``, which gradio needs to stream audio;
* ``README.md`` -- the Space card: YAML metadata (title, emoji, ``sdk: gradio``, ``sdk_version`` = the
  installed gradio, ``app_file``, ``models``, ``tags``, ``license``) and a short description;
* ``deeptalk/`` -- a copy of this package (without its demo corpus), since deeptalk is not on PyPI;
  pass ``deeptalk_requirement`` to install it from somewhere instead;
* optionally ``model/`` (``bundle_model=True``) and ``examples/`` (``example_audio``).

With ``push=True`` the folder is uploaded with ``huggingface_hub`` (`push_space`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData

from ..saving import atomic_directory

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).with_name("space_template")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
APP_EXTRAS = ["matplotlib>=3.8", "numpy"]  # what app.py imports beyond deeptalk's own dependencies
SPACE_TAGS = ["deeptalk", "speech", "moe", "speech-to-speech", "modality-specific-experts"]
STRATEGIES = ("single_pass", "batch_parallel")

CARD_BODY = """
# {title}

Talk with [{model_name}]({model_link}), a DeepTalk model: a mixture-of-experts LLM whose routed
experts are split into text experts and speech experts (arXiv 2506.21864).

Record or upload a spoken question (or type one). The spoken answer streams back chunk by chunk while
it is being decoded, the answer text streams in, and the heatmap shows, per MoE layer, which experts the
router selected for text tokens and for speech tokens (speech experts outlined in red).

Settings (Space variables): `DEEPTALK_MODEL` (repo id or folder), `DEEPTALK_MAX_STEPS` (default
{max_steps}), `DEEPTALK_CHUNK_FRAMES` (codec frames per audio chunk, default {chunk_frames}),
`DEEPTALK_STRATEGY` (`single_pass` or `batch_parallel`, default `{strategy}`).

Created with `deeptalk.hub.create_space`.
"""


def installed_gradio_version() -> str:
    """The installed gradio's version: the Space pins the same one (`sdk_version`)."""
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("create_space pins the Space's gradio to the installed one, but gradio is not installed: "
                          "`pip install gradio`, or pass sdk_version='X.Y.Z'.") from None


def space_requirements(deeptalk_requirement: str | None = None) -> list[str]:
    """requirements.txt lines. With a bundled deeptalk copy: deeptalk's own (non-extra) dependencies
    from its installed metadata, so they stay in step with pyproject.toml; else `deeptalk_requirement`.
    gradio is left out on purpose: the Space installs the gradio of `sdk_version`."""
    if deeptalk_requirement is not None:
        return [deeptalk_requirement, *APP_EXTRAS]
    try:
        declared = importlib.metadata.requires("deeptalk") or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("To bundle deeptalk into the Space its dependencies are read from the installed package "
                          "metadata, but deeptalk is not installed: `pip install -e .`, or pass "
                          "deeptalk_requirement='deeptalk @ git+https://...'.") from None
    core = [r for r in declared if "extra ==" not in r]
    names = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in core}
    return core + [r for r in APP_EXTRAS if re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() not in names]


def render_app(model: str, *, title: str, max_steps: int, chunk_frames: int, strategy: str) -> str:
    """app.py: the template with the model and the decoding defaults filled in."""
    source = (TEMPLATE_DIR / "app.py").read_text()
    for placeholder, value in {'"__DEEPTALK_TITLE__"': repr(title), '"__DEEPTALK_MODEL__"': repr(model),
                               "__DEEPTALK_MAX_STEPS__": str(int(max_steps)),
                               "__DEEPTALK_CHUNK_FRAMES__": str(int(chunk_frames)),
                               "__DEEPTALK_STRATEGY__": strategy}.items():
        if placeholder not in source:
            raise RuntimeError(f"The Space template {TEMPLATE_DIR / 'app.py'} lost its placeholder {placeholder}.")
        source = source.replace(placeholder, value)
    return source


def render_space_card(*, title: str, model: str | None, model_is_repo: bool, emoji: str, license: str,
                      tags: Sequence[str], sdk_version: str, short_description: str, max_steps: int,
                      chunk_frames: int, strategy: str) -> SpaceCard:
    """README.md: the Space's YAML metadata and a short description."""
    card_data = SpaceCardData(
        title=title,
        emoji=emoji,
        colorFrom="indigo",
        colorTo="pink",
        sdk="gradio",
        sdk_version=sdk_version,
        app_file="app.py",
        pinned=False,
        license=license,
        models=[model] if model_is_repo else None,
        tags=list(dict.fromkeys([*SPACE_TAGS, *tags])),
        short_description=short_description,
    )
    body = CARD_BODY.format(title=title, model_name=model if model_is_repo else "the bundled model",
                            model_link=f"https://huggingface.co/{model}" if model_is_repo else "model",
                            max_steps=max_steps, chunk_frames=chunk_frames, strategy=strategy)
    return SpaceCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def create_space(
    folder: str | os.PathLike | None,
    model: str | os.PathLike,
    *,
    title: str = "DeepTalk: talk with a speech MoE",
    emoji: str = "🗣️",
    license: str = "apache-2.0",
    tags: Sequence[str] = (),
    short_description: str = "Speech in, streamed speech out, experts per modality",
    max_steps: int = 200,
    chunk_frames: int = 8,
    strategy: str = "single_pass",
    example_audio: Sequence[str | os.PathLike] = (),
    bundle_model: bool = False,
    deeptalk_requirement: str | None = None,
    sdk_version: str | None = None,
    push: bool = False,
    repo_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload DeepTalk Space",
    overwrite: bool = False,
) -> Path:
    """Write a gradio Space for `model` into `folder` (see the module docstring) and return its path.

    Args:
        folder: where to write the Space: a new or empty folder, or any with `overwrite=True` (the previous
            folder is replaced once the new one is complete). None: a temporary folder, only with `push=True`
            (it is deleted after the upload and the returned path no longer exists).
        model: Hub repo id or local folder of a DeepTalk model saved with its processor and its codec
            in `<model>/codec`. The app loads it at start; the `DEEPTALK_MODEL` variable overrides it.
        bundle_model: copy a local `model` folder into the Space (`model/`), so a pushed Space carries
            it. Without it a local folder is referenced by its absolute path: fine to run here, not on
            the Hub.
        example_audio: spoken questions copied into `examples/` and offered as clickable examples.
        max_steps, chunk_frames, strategy: the app's decoding defaults (`DEEPTALK_MAX_STEPS`,
            `DEEPTALK_CHUNK_FRAMES`, `DEEPTALK_STRATEGY` override them).
        deeptalk_requirement: a pip requirement for deeptalk (e.g. `"deeptalk @ git+https://..."`);
            None bundles a copy of the installed package instead.
        sdk_version: gradio version of the Space; default: the installed gradio's.
        push, repo_id, private, token, commit_message: upload the folder to the Space `repo_id`
            (`push_space`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if push and not repo_id:
        raise ValueError("create_space(push=True) needs repo_id='user/space-name' (the Space to upload to).")
    if folder is None and not push:
        raise ValueError("Give a folder to write the Space into (folder=None is only for push=True).")
    model = str(model)
    model_is_local = os.path.isdir(model)
    if push and model_is_local and not bundle_model:
        raise ValueError(f"The model {model!r} is a local folder, which a Space on the Hub cannot read. Push the model "
                         "first (deeptalk.hub.push_to_hub) and pass its repo id, or pass bundle_model=True to copy it "
                         "into the Space.")
    if bundle_model and not model_is_local:
        raise ValueError(f"bundle_model=True copies a local model folder, but {model!r} is not a folder.")
    sdk_version = sdk_version or installed_gradio_version()

    def write(target: Path) -> None:
        if bundle_model:
            shutil.copytree(model, target / "model")
            app_model = "model"  # relative to app.py
        else:
            app_model = str(Path(model).resolve()) if model_is_local else model
        (target / "app.py").write_text(render_app(app_model, title=title, max_steps=max_steps,
                                                  chunk_frames=chunk_frames, strategy=strategy))
        (target / "requirements.txt").write_text("\n".join(space_requirements(deeptalk_requirement)) + "\n")
        (target / "packages.txt").write_text("ffmpeg\n")
        if deeptalk_requirement is None:
            shutil.copytree(PACKAGE_DIR, target / "deeptalk",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "demo_corpus"))
        if example_audio:
            (target / "examples").mkdir()
            for path in example_audio:
                shutil.copy(path, target / "examples" / Path(path).name)
        card = render_space_card(title=title, model=model, model_is_repo=not model_is_local, emoji=emoji,
                                 license=license, tags=tags, sdk_version=sdk_version,
                                 short_description=short_description, max_steps=max_steps,
                                 chunk_frames=chunk_frames, strategy=strategy)
        card.save(target / "README.md")

    def upload(target: Path) -> None:
        url = push_space(target, repo_id, private=private, token=token, commit_message=commit_message)
        logger.info("Pushed the Space to %s (%s)", f"https://huggingface.co/spaces/{repo_id}", url)

    if folder is None:
        with tempfile.TemporaryDirectory() as scratch:
            write(Path(scratch))
            upload(Path(scratch))
        return Path(scratch)
    with atomic_directory(folder, overwrite=overwrite, what="the Space folder") as staging:
        write(Path(staging))  # a kill leaves the previous folder or none, never half a Space
    if push:
        upload(Path(folder))
    return Path(folder)


def push_space(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
               commit_message: str = "Upload DeepTalk Space") -> str:
    """Create the Space `repo_id` (gradio SDK; kept if it exists) and upload `folder` to it.
    Returns the commit URL; the Space itself is at https://huggingface.co/spaces/<repo_id>."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(folder),
                               commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
