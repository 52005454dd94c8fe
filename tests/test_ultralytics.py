"""fgd.integrations.ultralytics: FGFI inside Ultralytics YOLO training (skipped without ultralytics).

Tiny YOLO26-n pairs on fgd's shapes data exported to YOLO format, 64 px, CPU, with every network
connection refused (Ultralytics must never need one here)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics' own switch (read at import): no online checks
pytest.importorskip("ultralytics")

from fgd.data import make_shapes_dataset  # noqa: E402
from fgd.data.yolo import coco_to_yolo  # noqa: E402
from fgd.integrations import ultralytics as fu  # noqa: E402

TRAIN = dict(epochs=2, imgsz=64, batch=8, workers=0, plots=False, amp=False, device="cpu", verbose=False,
             exist_ok=True, val=True)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection to anything but this machine fails at once, as on a machine without internet."""
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise OSError(f"network unreachable in tests (connect to {host})")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    tj, td = make_shapes_dataset(root / "shapes", 24, 64, seed=0, split="train")
    vj, vd = make_shapes_dataset(root / "shapes", 8, 64, seed=0, split="val")
    yaml = coco_to_yolo({"train": (tj, td), "val": (vj, vd)}, root / "yolo")
    from ultralytics import YOLO

    teacher = root / "teacher.pt"
    torch.manual_seed(0)
    YOLO("yolo26n.yaml").save(str(teacher))  # an untrained teacher: enough to test the plumbing
    return {"yaml": str(yaml), "teacher": str(teacher), "root": root}


def _train(data, name, **kw):
    from ultralytics import YOLO

    model = YOLO("yolo26n.yaml")
    model.train(data=data["yaml"], distill_model=data["teacher"], trainer=fu.FGFITrainer,
                project=str(data["root"] / "runs"), name=name, **{**TRAIN, **kw})
    return model


def test_export_writes_yolo_labels(data):
    root = data["root"] / "yolo"
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    images = sorted((root / "images" / "train").glob("*.png"))
    assert len(labels) == len(images) == 24
    rows = [l.split() for p in labels for l in p.read_text().splitlines()]
    assert rows and all(len(r) == 5 and r[0] in {"0", "1", "2"} for r in rows)
    assert all(0 <= float(v) <= 1 for r in rows for v in r[1:])
    assert "names:" in Path(data["yaml"]).read_text()


def test_settings_are_checked_by_name():
    s, rest = fu.fgfi_settings({"fgfi_lambda": 0.2, "epochs": 3})
    assert s["fgfi_lambda"] == 0.2 and s["fgfi_psi"] == 0.5 and rest == {"epochs": 3}
    with pytest.raises(ValueError, match=r"unknown setting 'fgfi_lamda' \(did you mean 'fgfi_lambda'\?\)"):
        fu.fgfi_settings({"fgfi_lamda": 0.2})
    for key, value, msg in [("fgfi_psi", 1.0, r"fgfi_psi must be in \[0, 1\)"),
                            ("fgfi_mask", "box", "fgfi_mask must be one of"),
                            ("fgfi_levels", "all", "fgfi_levels must be one of"),
                            ("fgfi_adapter", "5x5", "fgfi_adapter must be one of"),
                            ("fgfi_lambda", -1, "fgfi_lambda must be a number >= 0"),
                            ("fgfi_warmup", -3, "fgfi_warmup must be an int >= 0"),
                            ("fgfi_anchor_scale", [8, 0], "fgfi_anchor_scale must be a positive number"),
                            ("fgfi_ultralytics_kd", "yes", "fgfi_ultralytics_kd must be True or False")]:
        with pytest.raises(ValueError, match=msg):
            fu.fgfi_settings({key: value})


def test_trainer_rejects_bad_settings_before_training(data):
    from ultralytics import YOLO

    with pytest.raises(ValueError, match="unknown setting 'fgfi_foo'"):
        YOLO("yolo26n.yaml").train(data=data["yaml"], distill_model=data["teacher"], trainer=fu.FGFITrainer,
                                   fgfi_foo=1, **TRAIN)
    with pytest.raises(ValueError, match="distill_model"):
        YOLO("yolo26n.yaml").train(data=data["yaml"], trainer=fu.FGFITrainer, project=str(data["root"] / "runs"),
                                   name="nodistill", **TRAIN)


def test_point_anchors_are_squares_of_scale_times_stride_on_the_grid_centres():
    feats = [torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 1, 1)]
    a = fu.point_anchors(feats, [8, 16], scales=(8.0,), ratios=(1.0, 4.0))
    assert [x.shape for x in a] == [(2 * 3 * 2, 4), (2, 4)]
    # location 1 = row 0, column 1: centre (12, 4); ratio 1: 64 x 64, ratio 4: 32 wide, 128 high
    assert torch.allclose(a[0][2], torch.tensor([12 - 32.0, 4 - 32, 12 + 32, 4 + 32]))
    assert torch.allclose(a[0][3], torch.tensor([12 - 16.0, 4 - 64, 12 + 16, 4 + 64]))


def _batch(data, n=4):
    """A real training batch of the exported data, as the trainer builds it."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"imgsz": 64, "mosaic": 0.0, "fliplr": 0.0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0,
                             "translate": 0.0, "scale": 0.0})
    info = check_det_dataset(data["yaml"])
    ds = build_yolo_dataset(cfg, info["train"], n, info, mode="val", rect=False)
    batch = ds.collate_fn([ds[i] for i in range(n)])
    batch["img"] = batch["img"].float() / 255
    return batch


def _model(data, **settings):
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.cfg import get_cfg

    torch.manual_seed(0)
    student = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    student.args = get_cfg(overrides={"imgsz": 64})
    s, _ = fu.fgfi_settings({"fgfi_warmup": 0, **settings})
    model = fu.FGFIDistillationModel(data["teacher"], student, s)
    return model.train()


def _iou(a, b):
    """Plain IoU of boxes a [N, 4] with one box b [4] (the test's own formula)."""
    w = (torch.minimum(a[:, 2], b[2]) - torch.maximum(a[:, 0], b[0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[3]) - torch.maximum(a[:, 1], b[1])).clamp(min=0)
    inter = w * h
    return inter / ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_masks_are_where_the_gt_boxes_are(data):
    batch = _batch(data)
    model = _model(data, fgfi_levels="per_level")
    model.loss(batch)
    result = model.last_imitation
    assert len(result.masks) == 3 and all(int(n) > 0 for n in result.num_pos)
    H, W = batch["img"].shape[-2:]
    for m, stride in zip(result.masks, model.strides):
        h, w = m.shape[1:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cx, cy = (xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride  # the grid's cell centres
        anchors = torch.stack([cx - 4 * stride, cy - 4 * stride, cx + 4 * stride, cy + 4 * stride], 1)
        for i in range(m.shape[0]):
            on = torch.zeros(h * w, dtype=torch.bool)
            off = torch.ones(h * w, dtype=torch.bool)
            for x, y, bw, bh in batch["bboxes"][batch["batch_idx"] == i].tolist():  # normalised centre, size
                g = torch.tensor([(x - bw / 2) * W, (y - bh / 2) * H, (x + bw / 2) * W, (y + bh / 2) * H])
                iou = _iou(anchors, g)
                on |= iou > 0.5 * iou.max() + 1e-5   # the paper's rule, off the threshold by a margin
                off &= iou < 0.5 * iou.max() - 1e-5
            got = m[i].flatten()
            assert got[on].all() and not got[off].any()
    empty = torch.zeros_like(batch["batch_idx"], dtype=torch.bool)
    no_gt = dict(batch, bboxes=batch["bboxes"][empty], batch_idx=batch["batch_idx"][empty], cls=batch["cls"][empty])
    model.loss(no_gt)
    assert all(int(n) == 0 for n in model.last_imitation.num_pos)


def test_sparse_and_dense_adaptation_give_the_same_loss_and_gradients(data):
    batch = _batch(data)
    out = []
    for sparse in (True, False):
        model = _model(data, fgfi_sparse=sparse, fgfi_levels="per_level")
        loss, items = model.loss(batch)
        loss[-1].backward()  # the imitation term alone: its gradient reaches the student through the neck
        grads = [p.grad.clone() for p in model.fgfi.adapters.parameters()]
        out.append((items["fgfi_loss"], grads, model.student_model.model[0].conv.weight.grad.clone()))
    (l1, g1, s1), (l2, g2, s2) = out
    assert torch.allclose(l1, l2, rtol=1e-5) and float(l1) > 0
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)
    assert s1.abs().sum() > 0 and torch.allclose(s1, s2, rtol=1e-3, atol=1e-3 * float(s1.abs().max()))


def test_ultralytics_kd_can_be_added_and_validation_returns_zeros(data):
    batch = _batch(data)
    model = _model(data, fgfi_ultralytics_kd=True)
    loss, items = model.loss(batch)
    assert list(items)[-2:] == ["dis_loss", "fgfi_loss"] and len(loss) == len(items)
    assert float(items["dis_loss"]) > 0 and float(items["fgfi_loss"]) > 0
    plain = _model(data)
    _, items = plain.loss(batch)
    assert float(items["dis_loss"]) == 0 and float(items["fgfi_loss"]) > 0
    plain.eval()
    plain.teacher_model = None  # as in Ultralytics' EMA copy, which validates
    with torch.no_grad():
        loss, items = plain.loss(batch)
    assert float(items["fgfi_loss"]) == 0 and float(items["dis_loss"]) == 0 and len(loss) == len(items)


def test_warm_up_counts_training_steps_then_imitates(data):
    batch = _batch(data)
    model = _model(data, fgfi_warmup=2)
    seen = [float(model.loss(batch)[1]["fgfi_loss"]) for _ in range(3)]
    assert seen[:2] == [0.0, 0.0] and seen[2] > 0 and model.fgfi.iteration == 3
    model.eval()
    model.loss(batch)  # validation does not count
    assert model.fgfi.iteration == 3


def test_imitation_loss_falls_as_the_adapters_learn(data):
    batch = _batch(data)
    model = _model(data, fgfi_lambda=1.0)
    opt = torch.optim.Adam(model.fgfi.parameters(), lr=2e-4)  # the untrained teacher's features are small
    losses = []
    for _ in range(10):
        loss, items = model.loss(batch)
        losses.append(float(items["fgfi_loss"]))
        opt.zero_grad()
        loss[-1].backward()
        opt.step()
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses))
    assert max(losses[-3:]) < 0.6 * losses[0], losses


def test_training_logs_np_per_level_and_saves_a_plain_student(data, tmp_path):
    model = _train(data, "plain", fgfi_warmup=0)
    save_dir = Path(model.trainer.save_dir)
    rows = (save_dir / "fgfi.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss_l0") and len(rows) == 3
    num_pos = [float(v) for v in rows[1].split(",")[4:]]
    assert len(num_pos) == 3 and sum(num_pos) > 0
    assert "fgfi_loss" in (save_dir / "results.csv").read_text().splitlines()[0]
    # the final checkpoint runs with plain ultralytics: fgd cannot even be imported there
    script = ("import sys; sys.modules['fgd'] = None\n"
              "from ultralytics import YOLO\n"
              f"m = YOLO({str(save_dir / 'weights' / 'best.pt')!r})\n"
              "assert type(m.model).__name__ == 'DetectionModel', type(m.model)\n"
              f"r = m.predict({str(next((data['root'] / 'yolo' / 'images' / 'val').glob('*.png')))!r}, imgsz=64,"
              " verbose=False)\n"
              "print('boxes', len(r[0].boxes))\n")
    env = dict(os.environ, YOLO_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "boxes" in done.stdout


def test_a_killed_run_resumes_with_its_settings_and_only_under_fgfitrainer(data):
    from ultralytics import YOLO

    class Killed(Exception):
        pass

    def kill(trainer):
        if trainer.epoch == 0:
            raise Killed

    model = YOLO("yolo26n.yaml")
    model.add_callback("on_model_save", kill)
    with pytest.raises(Killed):
        model.train(data=data["yaml"], distill_model=data["teacher"], trainer=fu.FGFITrainer,
                    project=str(data["root"] / "runs"), name="killed", fgfi_warmup=0, fgfi_lambda=0.1,
                    **{**TRAIN, "epochs": 3})
    last = data["root"] / "runs" / "killed" / "weights" / "last.pt"
    with pytest.raises(fu.FGFIResumeError, match="resume it with its trainer"):
        YOLO(str(last)).train(resume=True)
    resumed = YOLO(str(last))
    resumed.train(resume=True, trainer=fu.FGFITrainer, fgfi_lambda=0.5)
    t = resumed.trainer
    assert t.start_epoch == 1 and t.fgfi["fgfi_lambda"] == 0.1  # the run's own settings
    rows = (Path(t.save_dir) / "fgfi.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_mask_pictures_show_each_level_over_the_image(data, tmp_path):
    from PIL import Image

    paths = fu.write_mask_pictures(data["yaml"], tmp_path, imgsz=64, images=2, fgfi_levels="per_level")
    assert len(paths) == 2
    im = Image.open(paths[0])
    assert im.size == (4 * 64, 14 + 64)  # the image and three levels, with their caption band
    with pytest.raises(ValueError, match="unknown setting 'fgfi_scale'"):
        fu.write_mask_pictures(data["yaml"], tmp_path, imgsz=64, fgfi_scale=2)


# Every setting away from its default (Ultralytics' DDP workers once got the defaults back)
NON_DEFAULT = dict(fgfi_lambda=0.37, fgfi_psi=0.6, fgfi_warmup=7, fgfi_adapter="1x1", fgfi_adapter_relu=True,
                   fgfi_sparse=False, fgfi_mask="gt_box", fgfi_levels="per_level", fgfi_offset=1,
                   fgfi_anchor_scale=[4, 8], fgfi_anchor_ratios=[0.5, 2.0], fgfi_ultralytics_kd=True,
                   fgfi_trust_teacher=True)


def test_ddp_workers_are_built_with_the_runs_fgfi_settings(data, tmp_path, monkeypatch):
    """A multi-GPU launch of a real FGFITrainer: Ultralytics' own train() writes its worker file
    (generate_ddp_file); that file is run here up to the worker's trainer, which must hold the run's
    settings and FGFI's callbacks once. (device="0,1" needs GPUs: ddp and world_size are set as it would.)"""
    import json
    import types

    import ultralytics.engine.trainer as engine

    trainer = fu.FGFITrainer(overrides=dict(model="yolo26n.yaml", data=data["yaml"], distill_model=data["teacher"],
                                            project=str(data["root"] / "runs"), name="ddp", **TRAIN, **NON_DEFAULT))
    trainer.model = trainer.get_model(cfg="yolo26n.yaml", verbose=False)  # as YOLO.train() hands it over
    trainer.ddp, trainer.world_size = True, 2
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in trainer.fgfi.items()}
    assert expected["fgfi_lambda"] == 0.37 and expected["fgfi_anchor_scale"] == [4.0, 8.0]
    # the worker's FGFITrainer.train reports what it was built with instead of training
    probe = ("import json, runpy, sys\n"
             "from fgd.integrations.ultralytics import FGFITrainer\n"
             "def report(self):\n"
             "    print('WORKER', json.dumps({'fgfi': self.fgfi, 'args': sorted(k for k in vars(self.args) if k.startswith('fgfi_')),\n"
             "        'callbacks': [c.__qualname__ for e in ('on_train_batch_end', 'on_train_epoch_end') for c in self.callbacks[e]\n"
             "                      if c.__qualname__.startswith('FGFITrainer.')]}))\n"
             "FGFITrainer.train = report\n"
             "runpy.run_path(sys.argv[1], run_name='__main__')\n")
    launched = []

    def run(cmd, check):  # in place of torch.distributed.run: one worker, as a plain process
        assert "torch.distributed.run" in cmd and "--nproc_per_node" in cmd
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        here = str(Path(fu.__file__).parents[2])  # the fgd under test, not another one installed
        env = dict(env, YOLO_OFFLINE="1", PYTHONPATH=os.pathsep.join([here, env.get("PYTHONPATH", "")]))
        launched.append(subprocess.run([sys.executable, "-c", probe, cmd[-1]], capture_output=True, text=True,
                                       env=env, cwd=tmp_path))

    monkeypatch.setattr(engine, "subprocess", types.SimpleNamespace(run=run))
    trainer.train()
    assert len(launched) == 1 and launched[0].returncode == 0, launched[0].stderr[-3000:]
    line = next(l for l in launched[0].stdout.splitlines() if l.startswith("WORKER "))
    worker = json.loads(line[len("WORKER "):])
    assert worker["fgfi"] == expected
    assert worker["args"] == []  # taken out again before Ultralytics checks its arguments
    assert worker["callbacks"] == ["FGFITrainer._record_batch", "FGFITrainer._log_epoch"]  # once each
    assert not [k for k in vars(trainer.args) if k.startswith("fgfi_")]  # the launcher's args as they were


class _Planted:
    """Unpickling it runs a shell command (what a malicious .pt does)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_the_teacher_is_read_as_data_unless_trusted(data, tmp_path):
    """Ultralytics unpickles a .pt in full (unless ULTRALYTICS_SAFE_LOAD=1): a planted teacher ran its command."""
    from ultralytics import YOLO

    pwned = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Planted(f"touch {pwned}")}, evil)
    with pytest.raises(Exception) as refused:
        YOLO("yolo26n.yaml").train(data=data["yaml"], distill_model=str(evil), trainer=fu.FGFITrainer,
                                   project=str(data["root"] / "runs"), name="evil", **TRAIN)
    assert not pwned.exists(), "the teacher's pickle ran its command"
    message = str(refused.value)
    assert str(evil) in message and "fgfi_trust_teacher=True" in message and "posix.system" in message, message
    # a real Ultralytics teacher loads as data, and with the opt-out (full unpickling) the same
    safe, trusted = _model(data), _model(data, fgfi_trust_teacher=True)
    a, b = safe.teacher_model.state_dict(), trusted.teacher_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not pwned.exists()


@pytest.mark.parametrize("key,value", [("fgfi_lambda", True), ("fgfi_lambda", False), ("fgfi_psi", False)])
def test_a_bool_is_not_a_number_setting(data, key, value):
    with pytest.raises((TypeError, ValueError), match=key):  # True was trained as lambda 1, False as 0
        fu.FGFITrainer(overrides=dict(model="yolo26n.yaml", data=data["yaml"], distill_model=data["teacher"],
                                      project=str(data["root"] / "runs"), name="bool", **TRAIN, **{key: value}))
