"""A run trained by fgd before the settings object (commit 733d97c) resumes bit-exact with this code:
the old code trains a distilled run (its teacher from scratch) and checkpoints at iteration 2 of 4; this
code resumes it to 4, and the student equals the old code's uninterrupted run bit for bit.

The old Python code comes from the repository's history (``git archive``) with this build's compiled
extension (the ops did not change); without git or that commit the test skips."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fgd
from fgd.data import make_shapes_dataset
from fgd.engine import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
OLD = "733d97ccabe8bf9ebf2b691ddf8da44bca56511d"


def _old_fgd(tmp: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("needs git to read the old code")
    have = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD}^{{commit}}"], capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {OLD[:7]} is not in this checkout's history")
    tmp.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD, "fgd"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    built = next(Path(fgd.__file__).parent.glob("_C*.so"))
    shutil.copy(built, tmp / "fgd" / built.name)
    return tmp


def _settings(tmp_path) -> dict:
    tj, ti = make_shapes_dataset(tmp_path / "data", 16, image_size=64, seed=0, split="train")
    return dict(train_json=tj, train_images=ti, image_size=64, batch_size=4, iterations=4, checkpoint_every=2,
                keep_checkpoints=4, log_every=1, lr_warmup_iters=2, threads=1, progress=False,
                student_fpn_channels=32, teacher_arch="resnet18-fpn", teacher_fpn_channels=32,
                teacher_iterations=2, imitation_warmup=1, imitation_weight=0.1, optimizer="adamw", lr=0.002)


def _train_old(old: Path, settings: dict) -> None:
    script = ("import json, sys\nimport fgd\nassert fgd.__file__.startswith(sys.argv[2]), fgd.__file__\n"
              "from fgd.engine import TrainConfig, train\ntrain(TrainConfig(**json.loads(sys.argv[1])))\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(settings), str(old)],
                          cwd=old, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(old)))
    assert done.returncode == 0, done.stderr[-3000:]


def _student(path) -> dict:
    return torch.load(path, weights_only=True)["student"]


def _same(got: dict, want: dict) -> list:
    assert got.keys() == want.keys()
    return [k for k in want if not torch.equal(got[k], want[k])]


def test_a_run_of_the_previous_commit_resumes_bit_exact(tmp_path):
    old = _old_fgd(tmp_path / "old")
    settings = _settings(tmp_path)
    out = tmp_path / "run"
    _train_old(old, {**settings, "output_dir": str(out)})
    want = _student(out / "final.pt")
    ckpts = sorted((out / "checkpoints").glob("ckpt_*.pt"))
    assert [p.name[-11:] for p in ckpts] == ["00000002.pt", "00000004.pt"]
    # the old run, killed after its checkpoint at iteration 2
    ckpts[-1].unlink()
    (out / "final.pt").unlink()

    old_id = json.loads((out / "config.json").read_text())["run_id"]
    teacher = out / "teacher" / "final.pt"
    trained = teacher.stat().st_mtime_ns

    got = train(TrainConfig(**settings, output_dir=str(out), resume=True))
    assert teacher.stat().st_mtime_ns == trained  # the old teacher run is this code's too: reused
    assert json.loads((out / "config.json").read_text())["run_id"] == old_id
    state = torch.load(got["final"], weights_only=True)
    assert state["iteration"] == 4
    different = _same(state["student"], want)
    assert not different, different[:5]


def test_a_fresh_run_computes_what_the_previous_commit_computed(tmp_path):
    """The same settings and seed, from a teacher checkpoint: the same student, bit for bit. And a
    teacher trained from scratch in the same call gives the run it gives when it was trained before."""
    old = _old_fgd(tmp_path / "old")
    settings = _settings(tmp_path)
    first = tmp_path / "first"
    train(TrainConfig(**settings, output_dir=str(first)))  # its teacher from scratch, then the student
    teacher = str(first / "teacher" / "final.pt")
    again = tmp_path / "again"  # the teacher now cached: the same student
    shutil.copytree(first / "teacher", again / "teacher")
    train(TrainConfig(**settings, output_dir=str(again)))
    assert not _same(_student(again / "final.pt"), _student(first / "final.pt"))

    given = {**settings, "teacher_arch": None, "teacher_checkpoint": teacher}
    _train_old(old, {**given, "output_dir": str(tmp_path / "old_run")})
    train(TrainConfig(**given, output_dir=str(tmp_path / "new_run")))
    different = _same(_student(tmp_path / "new_run" / "final.pt"), _student(tmp_path / "old_run" / "final.pt"))
    assert not different, different[:5]
