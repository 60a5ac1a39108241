"""Run by tests/test_saving.py: kill -9 `deeptalk.saving.publish_staged` (the final save of a training run into a
folder that also holds checkpoints) just before each of its filesystem-changing operations, and report what the
folder holds afterwards: one JSON line per kill, written to the report file."""

import json
import os
import shutil
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from kill_during_save import is_mutation, snapshot  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging  # noqa: E402

from deeptalk import saving  # noqa: E402
from deeptalk.tiny import tiny_text_moe  # noqa: E402


def main(workdir, report_path):
    torch.set_num_threads(1)
    logging.disable_progress_bar()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    references, logits = {}, {}
    for tag, seed, shard in (("previous", 1, "5GB"), ("new", 2, "20KB")):  # the new save is sharded, the old is not
        model = tiny_text_moe("qwen3_moe", seed=seed)
        references[tag] = os.path.join(workdir, f"reference_{tag}")
        model.save_pretrained(references[tag], max_shard_size=shard)
        with torch.no_grad():
            logits[tag] = model(ids).logits
    output = os.path.join(workdir, "out")

    def reset():
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(references["previous"], output)
        os.makedirs(os.path.join(output, "checkpoint-3"))
        with open(os.path.join(output, "checkpoint-3", "trainer_state.json"), "w") as f:
            json.dump({"global_step": 3}, f)
        shutil.copytree(references["new"], saving.staging_folder(output))

    def state():
        if not os.path.isfile(os.path.join(output, "config.json")):
            return "not a model"
        try:
            loaded = AutoModelForCausalLM.from_pretrained(output)
        except Exception as err:  # noqa: BLE001 - reported, the test decides
            return f"fails to load: {type(err).__name__}"
        with torch.no_grad():
            out = loaded(ids).logits
        return next((tag for tag, ref in logits.items() if torch.equal(out, ref)), "a mix")

    def publish(kill_at):
        pid = os.fork()
        if pid == 0:
            count = [0]

            def hook(event, args):
                if is_mutation(event, args):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)

            sys.addaudithook(hook)
            saving.publish_staged(output)
            n_events = count[0]
            with open(os.path.join(workdir, "events"), "w") as f:
                f.write(str(n_events))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return "SIGKILL" if os.WIFSIGNALED(status) else "completed"

    reset()
    assert publish(0) == "completed"
    with open(os.path.join(workdir, "events")) as f:
        n_events = int(f.read())
    checkpoint = snapshot(os.path.join(output, "checkpoint-3"))
    for kill_at in [*range(1, n_events + 1), 0]:  # the last one completes
        reset()
        ended = publish(kill_at)
        row = {"kill_at": kill_at, "n_events": n_events, "ended": ended, "state": state(),
               "checkpoint_intact": snapshot(os.path.join(output, "checkpoint-3")) == checkpoint,
               "staging_left": os.path.isdir(saving.staging_folder(output))}
        with open(report_path, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
