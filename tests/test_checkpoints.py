"""Checkpoints are data and belong to their run: no file runs code when opened, a run never adopts
or prunes another run's checkpoints, and a failed or killed write leaves nothing behind."""
import dataclasses
import json
import logging
import os
import resource
from pathlib import Path

import pytest
import torch

from fgd import cli
from fgd import engine
from fgd.engine import save_atomic, train
from test_app import quick, shapes  # noqa: F401  (the shapes fixture)

MARK = "fgd-pwned"


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious .pt file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil(path: Path, marker: Path, like=None):
    payload = dict(like or {}, student=_RunsCode(marker))
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def finished(shapes, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("finished")
    train(quick(shapes, out, val_json=None, val_images=None))
    return out


def _commands(shapes, bad, tmp):  # noqa: F811
    base = ["--train-json", shapes["train_json"], "--train-images", shapes["train_images"], "--image-size", "64",
            "--iterations", "2", "--batch-size", "4", "--threads", "1", "--no-progress",
            "--student-fpn-channels", "32"]
    return {
        "eval": ["eval", str(bad), "--json", shapes["val_json"], "--images", shapes["val_images"],
                 "--out", str(tmp / "m.json")],
        "viz": ["viz", "--json", shapes["val_json"], "--images", shapes["val_images"], "--checkpoint", str(bad),
                "--out", str(tmp / "viz"), "--num", "1"],
        "train --teacher-checkpoint": ["train", *base, "--output-dir", str(tmp / "t"), "--teacher-checkpoint",
                                       str(bad)],
    }


@pytest.mark.parametrize("command", ["eval", "viz", "train --teacher-checkpoint"])
def test_a_code_running_checkpoint_runs_no_code(shapes, finished, tmp_path, monkeypatch, command):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    like = torch.load(finished / "final.pt", weights_only=True)
    bad = _evil(tmp_path / "evil.pt", tmp_path / MARK, like)
    with pytest.raises(SystemExit) as e:
        cli.main(_commands(shapes, bad, tmp_path)[command])
    assert not (tmp_path / MARK).exists(), "opening the checkpoint ran its code"
    assert "refusing to load" in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)


def test_resume_over_a_code_running_checkpoint_runs_no_code(shapes, tmp_path, caplog):  # noqa: F811
    cfg = quick(shapes, tmp_path / "run", resume=True, iterations=2, val_json=None, val_images=None)
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    _evil(ckpt_dir / f"ckpt_{engine.run_id(dataclasses.asdict(cfg))}_00000002.pt", tmp_path / MARK)
    train(cfg)
    assert not (tmp_path / MARK).exists()
    assert "refusing to load" in caplog.text


@pytest.mark.parametrize("content,why", [
    (b"", "is empty"),
    (None, "not readable as a PyTorch file"),  # truncated
    (b"weights, honestly", "not readable as a PyTorch file"),
    ("foreign", "is not an fgd checkpoint"),
    ("folder", "is a directory"),
    ("missing", "does not exist"),
    ("training", "is a training checkpoint"),
])
def test_a_bad_checkpoint_file_is_one_clear_line(shapes, finished, tmp_path, content, why):  # noqa: F811
    path = tmp_path / "x.pt"
    if content is None:
        path.write_bytes((finished / "final.pt").read_bytes()[:5000])
    elif content == "foreign":  # a real PyTorch file, of something else
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif content == "folder":
        path.mkdir()
    elif content == "training":  # a resume checkpoint given where a detector is expected
        path.write_bytes(engine.checkpoints(finished / "checkpoints")[-1].read_bytes())
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        cli.main(_commands(shapes, path, tmp_path)["eval"])
    msg = str(e.value)
    assert msg.startswith("fgd eval: ") and why in msg and str(path) in msg and "\n" not in msg


def test_an_old_runs_checkpoints_are_never_adopted(shapes, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="fgd")
    out = tmp_path / "run"
    old = quick(shapes, out, iterations=8, checkpoint_every=2, val_json=None, val_images=None)
    train(old)
    # a fresh run with other settings, fewer iterations: its checkpoints have lower numbers
    new = dataclasses.replace(old, lr=0.01, iterations=4)
    train(new)
    new_id, old_id = engine.run_id(dataclasses.asdict(new)), engine.run_id(dataclasses.asdict(old))
    kept = engine.checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == [f"ckpt_{new_id}_00000002.pt", f"ckpt_{new_id}_00000004.pt"]
    aside = list(out.glob("previous-*"))  # with the earlier run's final.pt, config.json and log.csv
    assert len(aside) == 1 and sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == [
        f"ckpt_{old_id}_00000006.pt", f"ckpt_{old_id}_00000008.pt"]
    assert (aside[0] / "final.pt").is_file() and "moved 5 files of an earlier run" in caplog.text
    # --resume continues the new run, from its own newest checkpoint
    caplog.clear()
    train(dataclasses.replace(new, resume=True))
    assert f"resumed from {out / 'checkpoints' / f'ckpt_{new_id}_00000004.pt'}" in caplog.text
    # and the old run's settings do not silently continue the new run: the differences are named
    with pytest.raises(RuntimeError, match=r"another run: iterations: 4 in the checkpoint, 8 now; "
                                       r"lr: 0\.01 in the checkpoint, 0\.02 now.*--allow-changes iterations,lr"):
        train(dataclasses.replace(old, resume=True))
    # unless the user says they mean it
    caplog.clear()
    train(dataclasses.replace(old, resume=True, allow_changes="lr,iterations"))
    assert f"ckpt_{new_id}_00000004.pt" in caplog.text and "resumed from" in caplog.text


def test_the_cli_refuses_a_resume_of_another_run_in_one_line(shapes, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(quick(shapes, out, iterations=2, val_json=None, val_images=None))
    args = ["train", "--train-json", shapes["train_json"], "--train-images", shapes["train_images"],
            "--output-dir", str(out), "--image-size", "64", "--batch-size", "4", "--iterations", "2",
            "--threads", "1", "--student-fpn-channels", "32", "--no-distill", "--no-progress", "--resume",
            "--seed", "7"]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert str(e.value).startswith("fgd train: --resume: ") and "seed: 0 in the checkpoint, 7 now" in str(e.value)


def test_leftover_temporary_files_are_removed_on_the_next_start(shapes, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="fgd")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    left = [out / "checkpoints" / ".ckpt_0123456789ab_00000002.pt.tmp4242", out / ".final.pt.tmp4242"]
    for p in left:
        p.write_bytes(b"\0" * 100_000)
    train(quick(shapes, out, iterations=2, val_json=None, val_images=None))
    assert not any(p.exists() for p in left)
    assert "removed 2 temporary files" in caplog.text


def _saved(path):
    return torch.load(path, weights_only=True)["x"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"x": torch.ones(3)}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RuntimeError, match="could not write .*ckpt.pt: .*No space left on device; nothing was replaced"):
        save_atomic({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"] and torch.equal(_saved(path), torch.ones(3))


def test_a_file_too_large_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"x": torch.ones(3)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # Python ignores SIGXFSZ: writes fail EFBIG
    try:
        with pytest.raises(RuntimeError, match="could not write .*ckpt.pt: "):
            save_atomic({"x": torch.zeros(1 << 20)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"] and torch.equal(_saved(path), torch.ones(3))


def test_a_folder_in_the_way_is_a_clear_error(tmp_path):
    (tmp_path / "final.pt").mkdir()
    with pytest.raises(RuntimeError, match="could not write .*final.pt: .*Is a directory"):
        save_atomic({"x": torch.ones(3)}, tmp_path / "final.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]


def test_every_checkpoint_loads_as_data(shapes, finished):  # noqa: F811
    for path in [finished / "final.pt", *engine.checkpoints(finished / "checkpoints")]:
        ckpt = engine.load_checkpoint(path)  # weights_only=True inside
        assert ckpt["run_id"] == engine.run_id(ckpt["config"])
    assert json.loads((finished / "config.json").read_text())["run_id"] == ckpt["run_id"]
