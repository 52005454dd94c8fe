"""Typed configuration: every key of TrainConfig is checked for type and range, whether it comes from
Python, a YAML / JSON file or a flag, with a message naming the key, the value and what is allowed."""
import json
from pathlib import Path

import pytest

from fgd import cli
from fgd.engine import TrainConfig

BASE = dict(train_json="a.json", train_images="imgs", distill=False)
NAN, INF = float("nan"), float("inf")

BAD = [
    ("distill", "false"), ("distill", 1), ("distill", 0), ("flip", "yes"), ("resume", None),
    ("iterations", 2.5), ("iterations", "10"), ("iterations", True), ("iterations", 0), ("iterations", None),
    ("batch_size", -1), ("checkpoint_every", 0), ("log_every", 0), ("keep_checkpoints", 0),
    ("image_size", 0), ("image_size", 32), ("student_fpn_channels", 0), ("teacher_fpn_channels", 0),
    ("lr", "abc"), ("lr", 0), ("lr", -0.1), ("lr", NAN), ("lr", INF), ("lr", True),
    ("momentum", 1.0), ("momentum", -0.1), ("weight_decay", -1e-4), ("weight_decay", INF),
    ("lr_warmup_iters", -1), ("grad_clip", -1), ("grad_clip", 0), ("grad_clip", NAN),
    ("imitation_weight", -0.01), ("imitation_weight", NAN), ("thresh", 1.0), ("thresh", -0.5),
    ("imitation_warmup", -1), ("imitation_warmup", 1.5), ("teacher_iterations", 0),
    ("seed", -1), ("seed", 1.0), ("seed", 2**32), ("threads", 0), ("num_workers", -1),
    ("train_json", 5), ("output_dir", None), ("val_json", 3), ("amp", 16),
]


def _named(e, key, value):
    text = str(e.value)
    assert text.startswith(f"config: {key} must be ") or text.startswith(f"fgd train: config: {key} must be ")
    assert repr(value) in text  # the value as given, so "false" and false are told apart
    return text


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_setting_is_refused_naming_key_value_and_range(key, value, tmp_path):
    with pytest.raises((TypeError, ValueError)) as e:  # a file's settings
        TrainConfig.from_dict({**BASE, key: value})
    _named(e, key, value)
    with pytest.raises((TypeError, ValueError)) as e:  # a config built in Python
        TrainConfig(**{**BASE, key: value}).check()
    _named(e, key, value)
    path = tmp_path / "c.json"  # the command: one line, no traceback
    path.write_text(json.dumps({**BASE, key: value}))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", str(path)])
    _named(e, key, value)


GOOD = [("lr", 1), ("momentum", 0), ("weight_decay", 0), ("grad_clip", None), ("grad_clip", 1e-3),
        ("imitation_weight", 0), ("thresh", 0), ("imitation_warmup", 0), ("imitation_warmup", None),
        ("teacher_iterations", None), ("threads", None), ("num_workers", 0), ("lr_warmup_iters", 0),
        ("image_size", 33), ("seed", 0), ("seed", 2**32 - 1), ("val_json", None), ("amp", None)]


@pytest.mark.parametrize("key, value", GOOD, ids=[f"{k}={v!r}" for k, v in GOOD])
def test_edge_values_are_accepted(key, value):
    if key == "val_json":
        cfg = TrainConfig.from_dict({**BASE, "val_json": None, "val_images": None})
    else:
        cfg = TrainConfig.from_dict({**BASE, key: value})
    cfg.check()
    assert getattr(cfg, key) == value


def test_yaml_and_flags_are_checked_the_same_way(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_json: a.json\ntrain_images: imgs\ndistill: 'false'\n")
    with pytest.raises(SystemExit, match=r"^fgd train: config: distill must be true or false, got 'false' \(str\)$"):
        cli.main(["train", "--config", str(path)])
    path.write_text("train_json: a.json\ntrain_images: imgs\ndistill: false\nlr: 1e-3\n")  # YAML 1.1: a string
    with pytest.raises(SystemExit, match=r"lr must be a number, got '1e-3' \(str\); in YAML write 0.001"):
        cli.main(["train", "--config", str(path)])
    with pytest.raises(SystemExit, match=r"^fgd train: config: grad_clip must be > 0 \(or null: no clipping\), got -1.0$"):
        cli.main(["train", "--train-json", "a", "--train-images", "b", "--no-distill", "--grad-clip", "-1"])


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_pass(path):
    TrainConfig.from_dict(cli._load_config_file(str(path))).check()
