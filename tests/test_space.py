"""The gradio Space: the folder `create_space` writes, the push up to the network boundary, the app's
expert view, and the app itself served by a real process and driven in headless Chromium.

The browser test needs gradio, playwright (python), ffmpeg (gradio encodes streamed audio with it) and
a Chromium at /usr/bin/chromium; it skips, saying how to install them, where one is missing.
"""

import importlib.metadata
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import convert

from deeptalk.data import load_demo_corpus
from deeptalk.hub import create_space
from deeptalk.tiny import tiny_text_moe, tiny_whisper_config

CHROMIUM = "/usr/bin/chromium"
MAX_STEPS = 24  # the tiny model never ends on its own: keep the browser test short
CHUNK_FRAMES = 4
SPEECH_EXPERTS = (1, 5)
FOLLOW_UP = "is seven bigger than three"
INSTALL_HINT = "`pip install -e .[test]` (gradio, playwright) and `apt-get install chromium ffmpeg`"


def _question_audio() -> str:
    return load_demo_corpus("spoken_qa", decode_audio=False)["test"][0]["question_audio"]


def _load_app(space: Path):
    """The Space's app.py as a module (its `__main__` block, which loads the model, does not run)."""
    spec = importlib.util.spec_from_file_location("deeptalk_space_app", space / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _card_metadata(space: Path) -> dict:
    return yaml.safe_load((space / "README.md").read_text(encoding="utf-8").split("---")[1])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random DeepTalk speech model saved with its processor and codec (`<dir>/codec`)."""
    from deeptalk.recipes.demo_data import build_demo_processor, build_demo_tokenizer, fit_demo_codec

    folder = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_demo_tokenizer()
    codec = fit_demo_codec(iters=3)
    processor = build_demo_processor(tokenizer, codec)
    model = convert(tiny_text_moe("deepseek_v2", vocab_size=len(tokenizer)), experts=SPEECH_EXPERTS)
    torch.manual_seed(0)
    model.add_speech(audio_config=tiny_whisper_config(), **processor.model_speech_kwargs())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    codec.save_pretrained(folder / "codec")
    return folder


# ------------------------------------------------------------------------------------- the folder
def test_create_space_writes_app_requirements_and_card(tmp_path):
    pytest.importorskip("gradio", reason=f"create_space pins the installed gradio; install it: {INSTALL_HINT}")
    question = _question_audio()
    space = create_space(tmp_path / "space", "someone/deeptalk-tiny", tags=["demo"], example_audio=[question],
                         max_steps=77, chunk_frames=5)

    metadata = _card_metadata(space)
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    assert metadata["sdk_version"] == importlib.metadata.version("gradio")
    assert metadata["models"] == ["someone/deeptalk-tiny"]
    assert {"deeptalk", "speech", "demo"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0" and metadata["title"] and metadata["emoji"]
    assert len(metadata["short_description"]) <= 60  # the Hub's limit

    requirements = (space / "requirements.txt").read_text().split()
    names = {r.split(">")[0].split("=")[0].split("<")[0] for r in requirements}
    assert {"torch", "transformers", "soundfile", "matplotlib", "numpy"} <= names
    assert "gradio" not in names  # the Space installs the gradio of sdk_version
    assert (space / "packages.txt").read_text().split() == ["ffmpeg"]

    app_source = (space / "app.py").read_text()
    compile(app_source, "app.py", "exec")
    assert "DEFAULT_MODEL = 'someone/deeptalk-tiny'" in app_source and "__DEEPTALK_" not in app_source
    app = _load_app(space)
    assert (app.MAX_STEPS, app.CHUNK_FRAMES, app.STRATEGY) == (77, 5, "single_pass")
    assert [Path(p).name for p in app.EXAMPLES] == [Path(question).name]

    # deeptalk is not on PyPI: the Space carries its code, without the 14 MB demo corpus
    assert (space / "deeptalk" / "generation" / "chat.py").is_file()
    assert not list((space / "deeptalk").rglob("demo_corpus")) and not list((space / "deeptalk").rglob("__pycache__"))

    installed = create_space(tmp_path / "installed", "someone/deeptalk-tiny",
                             deeptalk_requirement="deeptalk @ git+https://example.com/deeptalk.git")
    assert (installed / "requirements.txt").read_text().splitlines()[0] == "deeptalk @ git+https://example.com/deeptalk.git"
    assert not (installed / "deeptalk").exists()


def test_local_model_folder_referenced_or_bundled(tmp_path, monkeypatch):
    pytest.importorskip("gradio", reason=f"create_space pins the installed gradio; install it: {INSTALL_HINT}")
    model = tmp_path / "model"
    (model / "codec").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    referenced = create_space(tmp_path / "referenced", model)
    assert f"DEFAULT_MODEL = {str(model.resolve())!r}" in (referenced / "app.py").read_text()
    assert "models" not in _card_metadata(referenced)  # a local folder is no Hub model
    bundled = create_space(tmp_path / "bundled", model, bundle_model=True)
    assert (bundled / "model" / "config.json").is_file() and (bundled / "model" / "codec").is_dir()
    assert "DEFAULT_MODEL = 'model'" in (bundled / "app.py").read_text()
    monkeypatch.delenv("DEEPTALK_MODEL", raising=False)
    assert _load_app(bundled).model_location() == str(bundled.resolve() / "model")


def test_push_stops_at_the_network_boundary(tmp_path, monkeypatch):
    """Up to huggingface_hub's HfApi, which is replaced by a recorder: what would be created and
    uploaded. Nothing here talks to the Hub."""
    pytest.importorskip("gradio", reason=f"create_space pins the installed gradio; install it: {INSTALL_HINT}")
    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs, sorted(os.listdir(kwargs["folder_path"]))))
            return "https://huggingface.co/spaces/me/talk/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    space = create_space(tmp_path / "space", "someone/deeptalk-tiny", push=True, repo_id="me/talk", token="t")
    assert calls[0] == ("init", "t")
    assert calls[1] == ("create_repo", "me/talk", {"repo_type": "space", "space_sdk": "gradio", "private": False,
                                                   "exist_ok": True})
    name, upload, files = calls[2]
    assert name == "upload_folder" and upload["repo_id"] == "me/talk" and upload["repo_type"] == "space"
    assert Path(upload["folder_path"]) == space
    assert {"app.py", "README.md", "requirements.txt", "packages.txt", "deeptalk"} <= set(files)

    with pytest.raises(ValueError, match="repo_id"):
        create_space(tmp_path / "x", "someone/deeptalk-tiny", push=True)
    with pytest.raises(ValueError, match="bundle_model=True"):
        create_space(tmp_path / "y", tmp_path / "space", push=True, repo_id="me/talk")


# ------------------------------------------------------------------------ the app's non-UI functions
def test_expert_view_and_audio_chunks(tmp_path):
    pytest.importorskip("gradio", reason=f"the app imports gradio; install it: {INSTALL_HINT}")
    app = _load_app(create_space(tmp_path / "space", "someone/deeptalk-tiny"))
    load = torch.zeros(2, 2, 6, dtype=torch.long)  # [MoE layers, (text, speech), routed experts]
    load[0, 0] = torch.tensor([9, 0, 3, 0, 0, 4])
    load[0, 1] = torch.tensor([0, 7, 0, 0, 0, 1])
    load[1, 1, 2] = 5  # layer 1: no text token reached it

    rows = app.expert_table(load, layer_indices=[1, 2], speech_experts=[[1, 5], [1, 5]], top=2)
    assert rows == [[1, "e0 x9, e5 x4", "e1 x7, e5 x1", "25%", "100%"],
                    [2, "-", "e2 x5", "-", "0%"]]
    assert app.expert_table(load.numpy(), top=1) == [[0, "e0 x9", "e1 x7"], [1, "-", "e2 x5"]]
    with pytest.raises(ValueError, match="num_moe_layers, 2, num_routed_experts"):
        app.expert_table(torch.zeros(2, 6))

    figure = app.expert_heatmap(load, layer_indices=[1, 2], speech_experts=[[1, 5], [1, 5]])
    text_axis, speech_axis = figure.axes[:2]
    np.testing.assert_allclose(text_axis.images[0].get_array(), [[9 / 16, 0, 3 / 16, 0, 0, 4 / 16], [0] * 6])
    np.testing.assert_allclose(speech_axis.images[0].get_array()[1], [0, 0, 1, 0, 0, 0])
    assert len(speech_axis.patches) == 4  # speech experts outlined, 2 per layer
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue()[:4] == b"\x89PNG"

    waveform = np.sin(np.linspace(0, 20, 1600)).astype(np.float32) * 0.5
    with wave.open(io.BytesIO(app.wav_bytes(waveform, 16000))) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (16000, 1, 2)
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2") / 32767
    np.testing.assert_allclose(pcm, waveform, atol=1e-4)  # no per-chunk peak normalisation


# --------------------------------------------------------------------------- the app in a browser
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(server: subprocess.Popen, url: str, log: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"The Space app exited with code {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"The Space app did not serve {url} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def served_space(tiny_model_dir, tmp_path):
    """create_space for the tiny model, then `python app.py` as a real server on a free port; the
    server is always terminated afterwards."""
    for module in ("gradio", "playwright"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed; the Space browser test needs {INSTALL_HINT}")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"No Chromium at {CHROMIUM}; install it with `apt-get install chromium` (see {INSTALL_HINT})")
    if shutil.which("ffmpeg") is None:
        pytest.skip(f"No ffmpeg, which gradio needs to stream audio; `apt-get install ffmpeg` (see {INSTALL_HINT})")
    space = create_space(tmp_path / "space", "someone/deeptalk-tiny", max_steps=200, chunk_frames=CHUNK_FRAMES)
    port = _free_port()
    env = {**os.environ, "DEEPTALK_MODEL": str(tiny_model_dir), "DEEPTALK_MAX_STEPS": str(MAX_STEPS),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_serving(server, url, log)
        yield url, space, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_space_app_in_a_browser(served_space, tiny_model_dir, tmp_path):
    """Upload the shipped spoken question, press Ask: the answer text streams in, the spoken answer
    streams into the audio player (AAC segments over HLS), and the expert view appears. Then a typed
    follow-up in the same conversation. Both answers equal what SpeechChat answers in this process."""
    from playwright.sync_api import sync_playwright

    from deeptalk.generation import SpeechChat

    url, space, log = served_space
    question = _question_audio()
    chat = SpeechChat.from_pretrained(str(tiny_model_dir))
    expected = chat(audio=question, max_steps=MAX_STEPS)
    expected_follow_up = chat(text=FOLLOW_UP, history=expected.history, max_steps=MAX_STEPS)
    assert expected.text.strip() and expected.waveform.size > 0, "the tiny model should say something for this test"

    segments = []
    screenshot = tmp_path / "space_app.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: segments.append(request.url) if request.url.endswith(".aac") else None)
            page.goto(url)
            page.locator("#question-audio input[type=file]").set_input_files(question)
            page.wait_for_selector("#question-audio audio[src]", state="attached", timeout=15_000)
            # record every value the answer box and the status line show, to see the reply arrive in pieces
            page.evaluate("""() => { window.shown = {text: [], status: []}; setInterval(() => {
                for (const [key, selector] of [['text', '#reply-text textarea'], ['status', '#reply-status']]) {
                    const element = document.querySelector(selector);
                    const value = element && (element.value !== undefined ? element.value : element.innerText);
                    const seen = window.shown[key];
                    if (value && seen[seen.length - 1] !== value) seen.push(value);
                } }, 5); }""")
            page.click("#ask")
            page.wait_for_function("document.querySelector('#reply-status').innerText.includes('decoder steps')",
                                   timeout=60_000)  # the status line is written with the final reply
            page.wait_for_selector("#expert-plot img", timeout=15_000)
            page.wait_for_function("(() => { const a = document.querySelector('#reply-audio audio');"
                                   " return a && a.src && a.duration > 0; })()", timeout=15_000)
            answer = page.locator("#reply-text textarea").input_value()
            shown = page.evaluate("window.shown")
            status = page.locator("#reply-status").inner_text()
            table = page.locator("#expert-table table").inner_text()
            audio_src = page.locator("#reply-audio audio").get_attribute("src")
            question_cleared = page.locator("#question-audio audio[src]").count() == 0
            download = page.locator("#reply-audio a.download-link").get_attribute("href")
            response = page.request.get(download)  # the whole streamed answer, as one file
            streamed = response.body() if response.ok else b""
            page.screenshot(path=str(screenshot), full_page=True)

            page.locator("#question-text textarea").fill(FOLLOW_UP)
            page.click("#ask")
            page.wait_for_function("text => document.querySelector('#reply-text textarea').value.trim() === text",
                                   arg=expected_follow_up.text.strip(), timeout=60_000)
            page.wait_for_function("document.querySelector('#reply-status').innerText.includes('decoder steps')",
                                   timeout=15_000)
            follow_up_status = page.locator("#reply-status").inner_text()
        finally:
            browser.close()

    if os.environ.get("DEEPTALK_TEST_ARTIFACTS"):
        target = Path(os.environ["DEEPTALK_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / screenshot.name)
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
    assert answer.strip() == expected.text.strip(), (answer, expected.text)
    # streamed: the text grew in pieces, and audio played while the reply was still being decoded
    assert len(shown["text"]) >= 2 and all(answer.startswith(v.strip()) for v in shown["text"]), shown
    statuses = [v for v in shown["status"] if "audio" in v]  # without gradio's progress timer ("0.4s")
    assert statuses[0].startswith("first audio after") and "decoder steps" in statuses[-1], shown
    assert f"{expected.steps} decoder steps" in status and "s of speech" in status, status
    assert audio_src and segments, "the player fetched no AAC segment of the streamed answer"
    assert len(streamed) > 0
    assert question_cleared, "the spoken question should be cleared once asked"
    assert "text tokens: top experts" in table and "speech -> speech experts" in table
    assert table.count("\n") >= 2  # a header and one row per MoE layer
    assert f"{expected_follow_up.steps} decoder steps" in follow_up_status, follow_up_status
    assert "Traceback" not in log.read_text()
