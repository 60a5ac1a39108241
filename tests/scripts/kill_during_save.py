"""Run by tests/test_saving.py: kill -9 a real save of a tiny model at every filesystem step, and at random
instants, and report what the output folder holds afterwards (one JSON line per kill, written to the report file).

For each mode (a fresh save; replacing a previous model with the atomic exchange; replacing it with the
rename-away fallback used where the filesystem cannot exchange) a forked child saves the new model through
`atomic_directory` and is killed with SIGKILL either by itself, from an audit hook, just before its k-th
filesystem-changing operation, or by this process after a random delay. This process then classifies the
folder (absent / bit-identical to the previous model / bit-identical to the new model / anything else), loads
it and compares its logits with the model it should be, and checks what `check_output_path` recovers.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging  # noqa: E402

from deeptalk import saving  # noqa: E402
from deeptalk.tiny import tiny_text_moe  # noqa: E402

MUTATING_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod",
                   "ctypes.call_function"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def is_mutation(event, args):
    if event == "open":
        _, mode, flags = args
        return (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & WRITE_FLAGS)
    return event in MUTATING_EVENTS


def snapshot(folder):
    if not os.path.isdir(folder):
        return None
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def write_model(model, folder, tag):
    """A folder of several files: the model's own save plus two small files written by hand."""
    model.save_pretrained(folder)
    with open(os.path.join(folder, "deeptalk_note.json"), "w") as f:
        json.dump({"model": tag}, f)
    if tag == "previous":  # a file the new save does not have: it must not survive next to the new weights
        with open(os.path.join(folder, "stale_tokenizer.json"), "w") as f:
            f.write("{}")


def main(workdir, random_kills, report_path):
    torch.set_num_threads(1)

    # rows go to a file of their own: libraries may print to stdout (DeepSpeed's accelerator notice does)
    def report(row):
        with open(report_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # tqdm shares a multiprocessing lock across fork; a child killed while holding it would hang this process
    logging.disable_progress_bar()
    models = {"previous": tiny_text_moe("qwen3_moe", seed=1), "new": tiny_text_moe("qwen3_moe", seed=2)}
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        logits = {tag: m(ids).logits for tag, m in models.items()}
    references = {}
    for tag, model in models.items():
        folder = os.path.join(workdir, f"reference_{tag}")
        write_model(model, folder, tag)
        references[tag] = snapshot(folder)
    assert references["previous"] != references["new"]

    parent = os.path.join(workdir, "out")
    target = os.path.join(parent, "model")
    rng = random.Random(0)

    for mode in ("fresh", "replace", "replace_without_exchange"):
        overwrite = mode != "fresh"

        def save():
            if mode == "replace_without_exchange":
                saving._exchange = lambda a, b: False  # a filesystem without renameat2(RENAME_EXCHANGE)
            with saving.atomic_directory(target, overwrite=overwrite) as tmp:
                write_model(models["new"], tmp, "new")

        def reset():
            if os.path.lexists(target):
                shutil.rmtree(target)
            os.makedirs(parent, exist_ok=True)
            if overwrite:
                shutil.copytree(os.path.join(workdir, "reference_previous"), target)

        def run(kill):
            reset()
            pid = os.fork()
            if pid == 0:  # the saving process
                if kill[0] in ("before", "after"):
                    count = [0]

                    def hook(event, args):
                        # audit hooks run before each operation: "after" k is the first event once k is done
                        if kill[0] == "after" and count[0] >= kill[1] and event != "os.kill":
                            os.kill(os.getpid(), signal.SIGKILL)
                        if is_mutation(event, args):
                            count[0] += 1
                            if kill[0] == "before" and count[0] == kill[1]:
                                os.kill(os.getpid(), signal.SIGKILL)

                    sys.addaudithook(hook)
                code = 0
                try:
                    save()
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            if kill[0] == "delay":
                time.sleep(kill[1])
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                return "SIGKILL" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
            return f"exit {os.WEXITSTATUS(status)}"

        def classify():
            files = snapshot(target)
            if files is None:
                return "absent"
            for tag, reference in references.items():
                if files == reference:
                    return tag
            return "mixed: " + json.dumps(sorted(files))

        checked = {}

        def loads_as(state):
            """Does the folder load, with the logits of the model it is? (bit-identical folders: checked once)"""
            if state not in logits:
                return None
            if state not in checked:
                with torch.no_grad():
                    loaded = AutoModelForCausalLM.from_pretrained(target)(ids).logits
                checked[state] = bool(torch.equal(loaded, logits[state]))
            return checked[state]

        # how many filesystem-changing operations one complete save makes, and how long it takes
        counter_read, counter_write = os.pipe()
        reset()
        pid = os.fork()
        if pid == 0:
            os.close(counter_read)
            events = []
            sys.addaudithook(lambda e, a: events.append(e) if is_mutation(e, a) else None)
            start = time.perf_counter()
            save()
            os.write(counter_write, json.dumps([len(events), time.perf_counter() - start]).encode())
            os._exit(0)
        os.close(counter_write)
        os.waitpid(pid, 0)
        with os.fdopen(counter_read) as f:
            n_events, seconds = json.loads(f.read())

        kills = [(when, k) for k in range(1, n_events + 1) for when in ("before", "after")]
        kills += [("delay", rng.uniform(0, 1.3 * seconds)) for _ in range(random_kills)]
        for kill in kills:
            ended = run(kill)
            state = classify()
            hidden = sorted(e for e in os.listdir(parent) if e.startswith("."))
            saving.check_output_path(target, overwrite=True)  # restores a previous folder left hidden, cleans up
            recovered = classify()
            report({"mode": mode, "kill": kill, "ended": ended, "state": state, "hidden": hidden,
                    "recovered": recovered, "loads": loads_as(recovered),
                    "left_after_recovery": sorted(e for e in os.listdir(parent) if e.startswith("."))})
        # a save that completes after all those kills leaves the new model and nothing hidden
        reset()
        save()
        report({"mode": mode, "kill": None, "n_events": n_events, "seconds": seconds, "state": classify(),
                "hidden": sorted(e for e in os.listdir(parent) if e.startswith(".")), "loads": loads_as(classify())})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
