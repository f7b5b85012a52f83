"""SIGKILL every writer at seeded random moments (tests/crash_harness.py, a fork server): the output path holds a
complete output that reloads bit-exactly, or nothing; leftovers are cleaned by the next run; distill and finetune
resume from their last checkpoint to exactly the weights of a run that was never killed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRIALS = int(os.environ.get("SLIMSWARM_CRASH_TRIALS", 20))


@pytest.mark.slow
def test_every_writer_survives_sigkill_at_random_moments(tmp_path):
    harness = Path(__file__).with_name("crash_harness.py")
    p = subprocess.run([sys.executable, str(harness), "--trials", str(TRIALS), "--seed", "0", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = {w["writer"]: w for w in json.loads(p.stdout)["writers"]}
    assert set(res) == {"compress", "prune", "distill", "finetune", "adapter", "checkpoint"}
    for name, w in res.items():
        assert w["problems"] == [], (name, w["problems"])
        assert sum(w["outcomes"].values()) == w["trials"] == TRIALS
        killed = sum(n for k, n in w["outcomes"].items() if k.startswith("killed/"))
        assert killed >= TRIALS // 4, (name, w["outcomes"])  # trials really were killed mid-run
        assert set(w["outcomes"]) <= {"killed/absent", "killed/complete", "finished/complete"}, w["outcomes"]
    for name in ("distill", "finetune"):  # every killed run that left no final output resumed to the same bits
        w = res[name]
        assert w["resumed"] == w["resumed_exact"] == w["outcomes"].get("killed/absent", 0) > 0, w
    # kills inside the write phase left temporary names, and the next run removed every one of them
    assert sum(res[n]["leftovers_cleaned"] for n in ("compress", "prune", "finetune")) > 0
