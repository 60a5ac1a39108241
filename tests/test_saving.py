"""deeptalk.saving: output paths validated before work, folders and files replaced atomically, kill -9 safe."""

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deeptalk import saving
from deeptalk.saving import atomic_directory, atomic_write_json, atomic_write_text, check_output_path

SCRIPT = Path(__file__).parent / "scripts" / "kill_during_save.py"


def hidden(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


def fill(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def contents(folder):
    return {p.name: p.read_text() for p in sorted(Path(folder).iterdir())}


# ---------------------------------------------------------------------------------------------- validation
def test_output_that_is_a_file_or_a_non_empty_folder(tmp_path):
    (tmp_path / "model.bin").write_text("x")
    with pytest.raises(ValueError, match=r"'.*model\.bin' is an existing file, not a folder"):
        check_output_path(tmp_path / "model.bin")
    fill(tmp_path / "out", {"config.json": "{}", "model.safetensors": ""})
    with pytest.raises(ValueError, match=r"out' already exists and is not empty \(2 entries: config\.json, "
                                         r"model\.safetensors\)\. Pass overwrite=True \(--overwrite\)"):
        check_output_path(tmp_path / "out")
    assert check_output_path(tmp_path / "out", overwrite=True) == str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert check_output_path(tmp_path / "empty") == str(tmp_path / "empty")
    assert check_output_path(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")  # parents are made
    assert not (tmp_path / "new").exists()  # ...but only when saving, not when checking
    with pytest.raises(ValueError, match="non-empty path"):
        check_output_path("  ")


def test_output_equal_to_inside_or_containing_the_input(tmp_path):
    source = fill(tmp_path / "source", {"config.json": "{}"})
    (tmp_path / "link").symlink_to(source)
    for out, forbid, message in [
        (source, [source], "is the input"),
        (tmp_path / "link", [source], "is the input"),  # compared after resolving links, either side
        (source, [tmp_path / "link", None], "is the input"),
        (tmp_path / "link" / "converted", [source], "is inside the input"),
        (tmp_path, [source], "contains the input"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_output_path(out, overwrite=True, forbid=forbid)
    with pytest.raises(ValueError, match="is the input"):
        check_output_path(source, overwrite=True, forbid=str(source))  # one path, not a list, works too
    with pytest.raises(ValueError, match="is a symbolic link"):
        check_output_path(tmp_path / "link", overwrite=True)
    check_output_path(tmp_path / "other", forbid=[source, "Qwen/Qwen3-30B-A3B"])


def test_unwritable_parent_and_a_file_in_the_way(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot be created: '.*a_file' is a file, not a folder"):
        check_output_path(tmp_path / "a_file" / "out")
    if os.geteuid() == 0:  # root may write anywhere on a writable filesystem; sysfs refuses new entries to all
        locked = Path("/sys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(ValueError, match=r"cannot be written: '.*' is not writable \(.+\)\. Choose a folder"):
        check_output_path(locked / "deeptalk-out" / "model")
    with pytest.raises(ValueError, match="is not writable"):
        check_output_path(locked / "results.json", kind="file")


def test_nearest_writable_folder_names_the_folder_it_probed(tmp_path):
    assert saving.nearest_writable_folder(str(tmp_path / "new" / "deeper")) == str(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError) as refused:
        saving.nearest_writable_folder(str(tmp_path / "a_file" / "out"))
    assert refused.value.filename == str(tmp_path / "a_file")
    locked = Path("/sys")  # as in the test above: sysfs refuses new entries, also to root
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(OSError) as refused:
        saving.nearest_writable_folder(str(locked / "out"))
    assert refused.value.filename == str(locked) and refused.value.strerror


def test_file_outputs(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match="is a folder, not a file"):
        check_output_path(tmp_path / "dir.json", kind="file", overwrite=True)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(ValueError, match="already exists. Pass overwrite=True"):
        check_output_path(tmp_path / "r.json", kind="file")
    assert check_output_path(tmp_path / "r.json", kind="file", overwrite=True) == str(tmp_path / "r.json")


# ---------------------------------------------------------------------------------------------- atomic_directory
def test_fresh_save_and_replacing_a_folder(tmp_path):
    out = tmp_path / "models" / "converted"
    with atomic_directory(out) as tmp:
        assert Path(tmp).parent == out.parent and Path(tmp).name.startswith(".converted.deeptalk-partial-")
        fill(Path(tmp), {"config.json": "1", "tokenizer.json": "old tokenizer"})
        assert not out.exists()  # nothing visible until the block ends
    assert contents(out) == {"config.json": "1", "tokenizer.json": "old tokenizer"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # like a folder save_pretrained makes
    with pytest.raises(ValueError, match="not empty"):
        with atomic_directory(out):
            pytest.fail("the block must not run when the output is refused")
    with atomic_directory(out, overwrite=True) as tmp:
        fill(Path(tmp), {"config.json": "2"})
        assert contents(out)["config.json"] == "1"  # the previous folder stays whole while the new one is written
    assert contents(out) == {"config.json": "2"}  # no stale tokenizer next to the new files
    assert hidden(out.parent) == []


def test_long_names_keep_their_hidden_siblings_under_the_name_limit(tmp_path):
    for name in ("m" * 240 + "-a", "m" * 240 + "-b"):  # the same first 100 characters: siblings must not mix
        with atomic_directory(tmp_path / name) as tmp:
            assert len(Path(tmp).name) < 255
            fill(Path(tmp), {"name": name})
    assert contents(tmp_path / ("m" * 240 + "-b")) == {"name": "m" * 240 + "-b"}
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        check_output_path(tmp_path / ("m" * 300))


def test_failed_save_leaves_the_previous_folder(tmp_path):
    out = fill(tmp_path / "out", {"config.json": "previous"})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(out, overwrite=True) as tmp:
            fill(Path(tmp), {"config.json": "half"})
            raise RuntimeError("disk full")
    assert contents(out) == {"config.json": "previous"} and hidden(tmp_path) == []


def test_replacing_without_an_atomic_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "_exchange", lambda a, b: False)  # e.g. a filesystem without RENAME_EXCHANGE
    out = fill(tmp_path / "out", {"a": "previous", "b": "previous"})
    with atomic_directory(out, overwrite=True) as tmp:
        fill(Path(tmp), {"a": "new"})
    assert contents(out) == {"a": "new"} and hidden(tmp_path) == []


def test_leftovers_of_a_killed_save_are_cleaned_and_a_hidden_previous_folder_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    fill(tmp_path / f".out.deeptalk-previous-{pid}-0badc0de", {"config.json": "previous"})
    fill(tmp_path / f".out.deeptalk-partial-{pid}-12345678", {"config.json": "half"})
    live = fill(tmp_path / f".out.deeptalk-partial-{os.getppid()}-87654321", {"config.json": "in progress"})
    with pytest.raises(ValueError, match="not empty"):  # the restored previous folder is not overwritten
        check_output_path(tmp_path / "out")
    assert contents(tmp_path / "out") == {"config.json": "previous"}
    assert hidden(tmp_path) == [live.name]  # a save by a running process is left alone


# ---------------------------------------------------------------------------------------------- files
def test_atomic_write_json_is_strict(tmp_path):
    path = tmp_path / "results" / "eval.json"
    atomic_write_json(path, {"wer": 0.25, "tasks": [1, 2]})
    assert json.loads(path.read_text()) == {"wer": 0.25, "tasks": [1, 2]}
    path.chmod(0o640)
    with pytest.raises(ValueError, match=r"eval\.json' was not written: obj\['tasks'\]\[1\]\['wer'\] is nan.*None"):
        atomic_write_json(path, {"tasks": [{"wer": 0.5}, {"wer": math.nan}]})
    with pytest.raises(ValueError, match=r"obj\['x'\] is inf"):
        atomic_write_json(path, {"x": math.inf})
    with pytest.raises(ValueError, match=r"obj\['when'\] is a set"):
        atomic_write_json(path, {"when": {1}})
    assert json.loads(path.read_text()) == {"wer": 0.25, "tasks": [1, 2]}  # untouched by the refused writes
    atomic_write_text(path, "[]\n")
    assert path.read_text() == "[]\n" and stat.S_IMODE(path.stat().st_mode) == 0o640  # mode kept
    assert hidden(path.parent) == []
    with pytest.raises(ValueError, match="already exists"):
        atomic_write_text(path, "x", overwrite=False)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, SIGKILL and audit hooks as on Linux")
def test_kill_during_save_leaves_the_previous_or_the_new_model(tmp_path):
    """A real tiny model saved through atomic_directory, killed with SIGKILL just before and just after each of
    its filesystem-changing operations and at random instants (tests/scripts/kill_during_save.py)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    report = tmp_path / "report.jsonl"
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "4", str(report)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    for mode, before_commit in [("fresh", "absent"), ("replace", "previous"), ("replace_without_exchange", "previous")]:
        trials = [r for r in rows if r["mode"] == mode and r["kill"] is not None]
        final = next(r for r in rows if r["mode"] == mode and r["kill"] is None)
        at_events = [r for r in trials if r["kill"][0] in ("before", "after")]
        assert len(at_events) == 2 * final["n_events"] >= 16
        assert all(r["ended"] == "SIGKILL" for r in at_events)
        for r in trials:
            # what a reader finds right after the kill: never a mix of the two models
            allowed = {before_commit, "new"} | ({"absent"} if mode == "replace_without_exchange" else set())
            assert r["state"] in allowed, r
            if r["state"] == "absent" and mode == "replace_without_exchange":
                assert any(".deeptalk-previous-" in name for name in r["hidden"]), r
            # and after the next check_output_path: the previous or the new folder, complete, nothing hidden left
            assert r["recovered"] in {before_commit, "new"}, r
            assert r["loads"] is (None if r["recovered"] == "absent" else True), r
            assert r["left_after_recovery"] == [], r
        # kills walk through the save in order: the old state until the commit, the new one after it
        states = [r["recovered"] for r in at_events]
        switch = states.index("new")
        assert 0 < switch and set(states[:switch]) == {before_commit} and set(states[switch:]) == {"new"}
        assert final["state"] == "new" and final["hidden"] == [] and final["loads"] is True
    assert any(r["state"] == "absent" for r in rows if r["mode"] == "replace_without_exchange")  # the window exists


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, SIGKILL and audit hooks as on Linux")
def test_kill_during_the_final_save_of_a_training_run_never_leaves_a_mix(tmp_path):
    """publish_staged moves a final model (sharded) over a previous one (one file) beside a checkpoint, killed
    with SIGKILL before each of its filesystem-changing operations (tests/scripts/kill_during_publish.py)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    report = tmp_path / "report.jsonl"
    run = subprocess.run([sys.executable, str(SCRIPT.with_name("kill_during_publish.py")), str(tmp_path), str(report)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == rows[0]["n_events"] + 1 >= 8
    assert all(r["checkpoint_intact"] for r in rows)
    killed = [r for r in rows if r["ended"] == "SIGKILL"]
    assert len(killed) == rows[0]["n_events"] == len(rows) - 1
    assert {r["state"] for r in killed} <= {"previous", "not a model", "new"}
    assert killed[0]["state"] == "previous" and "not a model" in {r["state"] for r in killed}
    assert all(r["staging_left"] for r in killed if r["state"] == "not a model")  # check_model names the way out
    assert rows[-1] == {**rows[-1], "ended": "completed", "state": "new", "staging_left": False}


def test_latest_complete_checkpoint_skips_partial_ones(tmp_path):
    for step, state in ((2, {"global_step": 2}), (4, {"global_step": 4}), (6, None), (8, "{truncated")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    (tmp_path / "checkpoint-10").write_text("a file, not a checkpoint")
    latest, skipped = saving.latest_complete_checkpoint(tmp_path)
    assert latest == str(tmp_path / "checkpoint-4")
    assert skipped == [str(tmp_path / "checkpoint-8"), str(tmp_path / "checkpoint-6")]
    assert saving.latest_complete_checkpoint(tmp_path / "missing") == (None, [])
