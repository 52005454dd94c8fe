"""Property-based fuzzing of every op (tests/fuzz_ops.py): each op's examples run in one child
process, which writes every example to a log before the call; a signal (SIGFPE, SIGSEGV, ...) fails
the test naming the input that caused it. FGD_FUZZ_EXAMPLES sets the number of examples per op
(1000); the examples are the same every run unless FGD_FUZZ_SEED (an int, or "random") is set."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

EXAMPLES = int(os.environ.get("FGD_FUZZ_EXAMPLES", "1000"))
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("op", ["box_iou", "imitation_mask", "imitation_loss", "masked_adapt_loss"])
def test_fuzz(op, tmp_path):
    log = tmp_path / "examples.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-X", "faulthandler", str(HERE / "fuzz_ops.py"), op, str(EXAMPLES), str(log)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    lines = log.read_text().splitlines() if log.exists() else []
    if r.returncode < 0:
        pytest.fail(f"fgd.{op} killed the process with {signal.Signals(-r.returncode).name} on: {lines[-1]}\n"
                    f"{r.stderr[-3000:]}")
    assert r.returncode == 0, f"fgd.{op}: {r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    assert lines[-1] == "done" and len(lines) - 1 >= EXAMPLES, lines[-3:]
