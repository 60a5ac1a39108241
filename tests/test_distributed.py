"""Phase 2 in two real processes (torchrun, gloo on CPU): the ranks must agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "two_rank_experts_phase.py"


def test_two_process_experts_phase_ranks_agree(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(SCRIPT), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["speech_bank_sum"] == ranks[1]["speech_bank_sum"]
    assert ranks[0]["speech_bank_abs_sum"] == ranks[1]["speech_bank_abs_sum"]
    assert len(ranks[0]["losses"]) == 3
