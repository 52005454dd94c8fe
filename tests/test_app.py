"""The `fgd` application: demo, train (resume, DDP, AMP, configs), eval, viz."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fgd import cli
from conftest import shapes_splits
from fgd.engine import TrainConfig, load_latest, train

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses run outside the source tree (cwd=tmp_path): `python -m` puts the working directory
# first on sys.path, and the source tree's fgd/ has no compiled extension after `pip install .`.


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_splits(tmp_path_factory.mktemp("shapes"), 24, 8)


def quick(shapes, out, **kw):
    cfg = dict(shapes, output_dir=str(out), image_size=64, batch_size=4, iterations=4, checkpoint_every=2,
               log_every=1, lr_warmup_iters=2, threads=1, progress=False, student_fpn_channels=32, distill=False)
    cfg.update(kw)
    return TrainConfig(**cfg)


@pytest.fixture(scope="module")
def teacher_ckpt(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = quick(shapes, out, student_arch="resnet34-fpn", student_fpn_channels=48, val_json=None, val_images=None)
    return train(cfg)["final"]


def test_demo_quick_writes_the_table_and_pictures(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| teacher") or line.startswith("| student")]
    assert len(rows) == 3 and any("FGFI" in r for r in rows)
    for name in ("results.md", "results.csv", "loss_curves.png", "map.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(list((tmp_path / "masks").glob("*_masks.png"))) >= 1
    # a rerun reuses the finished runs
    t0 = time.perf_counter()
    cli.main(["demo", "--quick", "--out", str(tmp_path), "--threads", "2"])
    assert "cached" in capsys.readouterr().out
    assert time.perf_counter() - t0 < 30


def test_distilled_training_logs_levels_and_evaluates(shapes, teacher_ckpt, tmp_path):
    cfg = quick(shapes, tmp_path, distill=True, teacher_checkpoint=teacher_ckpt, imitation_warmup=1)
    result = train(cfg)
    assert set(result["metrics"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "img/s"}
    log = (tmp_path / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    assert {"iteration", "loss", "loss_imitation", "imitation_l0", "num_pos_l0", "images_per_s"} <= set(header)
    assert len(log) == 1 + 4
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["resolved_imitation_warmup"] == 1 and saved["teacher_checkpoint"] == teacher_ckpt
    assert len(list((tmp_path / "checkpoints").glob("ckpt_*.pt"))) == cfg.keep_checkpoints


def _train_cmd(shapes, out, teacher, iterations):
    return [sys.executable, "-m", "fgd.cli", "train", "--train-json", shapes["train_json"],
            "--train-images", shapes["train_images"], "--output-dir", str(out), "--image-size", "64",
            "--batch-size", "4", "--iterations", str(iterations), "--checkpoint-every", "4", "--log-every", "1",
            "--threads", "1", "--student-fpn-channels", "32", "--teacher-checkpoint", teacher,
            "--imitation-warmup", "2", "--resume", "--no-progress"]


def test_sigkill_and_resume_is_bit_identical(shapes, teacher_ckpt, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_train_cmd(shapes, whole, teacher_ckpt, 16), check=True, env=env, capture_output=True, timeout=600,
                   cwd=tmp_path)
    proc = subprocess.Popen(_train_cmd(shapes, killed, teacher_ckpt, 16), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    # 6 batches an epoch: iteration 8 is mid-epoch 1
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("ckpt_*_00000008.pt")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final.pt").exists()
    r = subprocess.run(_train_cmd(shapes, killed, teacher_ckpt, 16), env=env, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    a = torch.load(whole / "final.pt", weights_only=True)["student"]
    b = torch.load(killed / "final.pt", weights_only=True)["student"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    la = (whole / "log.csv").read_text().splitlines()
    lb = (killed / "log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in la] == [r.split(",")[:2] for r in lb]  # iteration, loss


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(shapes, tmp_path, caplog):
    train(quick(shapes, tmp_path, iterations=4, checkpoint_every=2))
    ckpts = sorted((tmp_path / "checkpoints").glob("ckpt_*.pt"))
    ckpts[-1].write_bytes(b"not a checkpoint")
    path, state = load_latest(tmp_path / "checkpoints")
    assert path == ckpts[-2] and state["iteration"] == 2
    assert "is not readable as a PyTorch file" in caplog.text and ckpts[-1].name in caplog.text


def test_amp_bf16_runs(shapes, tmp_path):
    result = train(quick(shapes, tmp_path, amp="bf16", iterations=2, val_json=None, val_images=None))
    assert Path(result["final"]).exists()


def test_two_process_ddp_on_gloo(shapes, teacher_ckpt, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           "-m", "fgd.cli", "train", "--train-json", shapes["train_json"], "--train-images", shapes["train_images"],
           "--val-json", shapes["val_json"], "--val-images", shapes["val_images"], "--output-dir", str(tmp_path),
           "--image-size", "64", "--batch-size", "2", "--iterations", "4", "--checkpoint-every", "2",
           "--threads", "1", "--student-fpn-channels", "32", "--teacher-checkpoint", teacher_ckpt,
           "--imitation-warmup", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (tmp_path / "final.pt").exists() and (tmp_path / "metrics.json").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0


@pytest.mark.parametrize("name", ["demo.yaml", "voc.yaml"])
def test_shipped_configs_run_on_the_shapes_data(name, shapes, teacher_ckpt, tmp_path, capsys):
    # the config's structure (every key valid, the recipe's settings) with the data and sizes swapped
    overrides = ["--train-json", shapes["train_json"], "--train-images", shapes["train_images"],
                 "--val-json", shapes["val_json"], "--val-images", shapes["val_images"],
                 "--output-dir", str(tmp_path), "--image-size", "64", "--iterations", "2", "--batch-size", "2",
                 "--checkpoint-every", "2", "--teacher-checkpoint", teacher_ckpt, "--student-fpn-channels", "32",
                 "--num-workers", "0", "--no-progress", "--threads", "1"]
    assert cli.main(["train", "--config", str(ROOT / "configs" / name), *overrides]) == 0
    out = capsys.readouterr().out
    assert "imitation warm-up =" in out and (tmp_path / "final.pt").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    # demo.yaml is the demo's distilled run (its lambda suits its teacher's normalised FPN); voc.yaml the paper's
    from fgd.demo import DISTILLED

    want = DISTILLED["imitation_weight"] if name == "demo.yaml" else 0.01
    assert saved["level_policy"] == "assigned" and saved["imitation_weight"] == want


def test_eval_and_viz_commands(shapes, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", teacher_ckpt, "--json", shapes["val_json"], "--images", shapes["val_images"],
                     "--out", str(out), "--device", "cpu"]) == 0
    assert "Average Precision" in capsys.readouterr().out
    assert set(json.loads(out.read_text())) >= {"AP", "AP50", "img/s"}
    viz = tmp_path / "viz"
    assert cli.main(["viz", "--json", shapes["val_json"], "--images", shapes["val_images"], "--out", str(viz),
                     "--checkpoint", teacher_ckpt, "--num", "2", "--detections"]) == 0
    from PIL import Image

    pngs = sorted(viz.glob("*.png"))
    assert len(pngs) == 4
    with Image.open(next(p for p in pngs if p.name.endswith("_detections.png"))) as im:
        assert im.size == (64, 64)


EVAL_BAD = [
    ("renamed", r"the checkpoint's classes \[.*\] do not match the categories of .*val.json \[.*'zebra'"),
    ("extra", r"the checkpoint's classes \[.*\] do not match the categories of .*'zebra'\]"),
    ("extra_no_names", r"the checkpoint records no class names, so its labels cannot be matched to the categories of .*val.json"),
    ("broken_json", r"COCO annotation file .*val.json is not valid JSON"),
    ("out_is_a_folder", r"output .* is a directory"),
    ("out_folder_missing", r"output .*m.json: folder .*nope does not exist"),
]


@pytest.mark.parametrize("case, why", EVAL_BAD, ids=[c for c, _ in EVAL_BAD])
def test_eval_checks_classes_and_output_before_evaluating(shapes, teacher_ckpt, tmp_path, monkeypatch, case, why):
    import fgd.evaluate

    monkeypatch.setattr(fgd.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking"))
    data = json.loads(Path(shapes["val_json"]).read_text())
    ckpt, out = teacher_ckpt, tmp_path / "m.json"
    if case == "renamed":
        data["categories"][0]["name"] = "zebra"
    elif case.startswith("extra"):
        data["categories"].append({"id": 99, "name": "zebra"})
    if case == "extra_no_names":  # a checkpoint without class names: its labels cannot be checked
        ck = torch.load(teacher_ckpt, weights_only=False)
        del ck["class_names"]
        ckpt = str(tmp_path / "old.pt")
        torch.save(ck, ckpt)
    if case == "out_is_a_folder":
        out = tmp_path
    if case == "out_folder_missing":
        out = tmp_path / "nope" / "m.json"
    (tmp_path / "val.json").write_text("{" if case == "broken_json" else json.dumps(data))
    with pytest.raises(SystemExit, match="^fgd eval: " + why):
        cli.main(["eval", ckpt, "--json", str(tmp_path / "val.json"), "--images", shapes["val_images"],
                  "--out", str(out), "--device", "cpu"])
    assert not (tmp_path / "m.json").exists()


def test_viz_checks_its_output_folder_first(shapes, tmp_path):
    out = tmp_path / "a_file"
    out.write_text("")
    with pytest.raises(SystemExit, match="fgd viz: --out .*a_file is a file, not a folder"):
        cli.main(["viz", "--json", shapes["val_json"], "--images", shapes["val_images"], "--out", str(out)])


def test_bad_configuration_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_json: a.json\ntrain_images: imgs\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit, match=r"fgd train: config: unknown keys \['learning_rate'\]"):
        cli.main(["train", "--config", str(bad)])
    with pytest.raises(SystemExit, match="distillation needs teacher_checkpoint or teacher_arch"):
        cli.main(["train", "--train-json", "a.json", "--train-images", "imgs"])
    with pytest.raises(SystemExit, match=r"student_arch must be one of \('resnet18-fpn'"):
        cli.main(["train", "--train-json", "a.json", "--train-images", "imgs", "--no-distill", "--student-arch", "vgg"])
    with pytest.raises(SystemExit, match="level_policy must be one of"):
        cli.main(["train", "--train-json", "a.json", "--train-images", "imgs", "--no-distill", "--level-policy", "x"])


def test_teacher_from_scratch_when_no_checkpoint_is_given(shapes, tmp_path):
    cfg = quick(shapes, tmp_path, distill=True, teacher_arch="resnet18-fpn", teacher_fpn_channels=32,
                teacher_iterations=2, iterations=2, val_json=None, val_images=None)
    train(cfg)
    assert (tmp_path / "teacher" / "final.pt").exists() and (tmp_path / "final.pt").exists()
    teacher_log = (tmp_path / "teacher" / "log.csv").read_text()
    assert "loss_imitation" not in teacher_log  # the teacher trains alone


def test_bench_subcommand_passes_its_options_through(capsys):
    assert cli.main(["bench", "--quick", "--no-compile", "--repeat", "1"]) == 0
    assert "| imitation_loss |" in capsys.readouterr().out


def _coco_to_voc(json_path, folder: Path) -> Path:
    """The shapes set as Pascal VOC XML files (1-based pixel corners), one beside where its image is."""
    data = json.loads(Path(json_path).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    folder.mkdir(parents=True, exist_ok=True)
    for im in data["images"]:
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin><xmax>{a['bbox'][0] + a['bbox'][2]}</xmax>"
            f"<ymax>{a['bbox'][1] + a['bbox'][3]}</ymax></bndbox></object>"
            for a in data["annotations"] if a["image_id"] == im["id"])
        (folder / (Path(im["file_name"]).stem + ".xml")).write_text(
            f"<annotation><filename>{im['file_name']}</filename><size><width>{im['width']}</width>"
            f"<height>{im['height']}</height><depth>3</depth></size>{objects}</annotation>")
    return folder


def test_train_eval_viz_and_convert_on_pascal_voc(shapes, tmp_path, capsys):
    train_voc = _coco_to_voc(shapes["train_json"], tmp_path / "train_xml")
    val_voc = _coco_to_voc(shapes["val_json"], tmp_path / "val_xml")
    split = tmp_path / "train.txt"  # VOC's ImageSets/Main/train.txt: a subset of the XML files
    split.write_text("\n".join(p.stem for p in sorted(train_voc.glob("*.xml"))[:16]) + "\n")
    out = tmp_path / "run"
    assert cli.main(["train", "--train-voc", str(train_voc), "--train-images", shapes["train_images"],
                     "--train-split-file", str(split), "--val-voc", str(val_voc), "--val-images", shapes["val_images"],
                     "--no-distill", "--iterations", "2", "--batch-size", "4", "--image-size", "64",
                     "--student-fpn-channels", "32", "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    assert "Average Precision" in capsys.readouterr().out
    ckpt = torch.load(out / "final.pt", weights_only=True)
    assert ckpt["class_names"] == ["__background__", "circle", "square", "triangle"]  # the names found, sorted
    # eval reads the VOC folder with the checkpoint's classes; the COCO json written by convert-voc
    # gives the same numbers
    assert cli.main(["eval", str(out / "final.pt"), "--voc", str(val_voc), "--images", shapes["val_images"],
                     "--out", str(tmp_path / "voc_eval.json"), "--device", "cpu"]) == 0
    converted = tmp_path / "val_converted.json"
    assert cli.main(["convert-voc", "--annotations", str(val_voc), "--images", shapes["val_images"],
                     "--classes", "circle,square,triangle", "--out", str(converted)]) == 0
    assert cli.main(["eval", str(out / "final.pt"), "--json", str(converted), "--images", shapes["val_images"],
                     "--out", str(tmp_path / "coco_eval.json"), "--device", "cpu"]) == 0
    voc_m, coco_m = (json.loads((tmp_path / n).read_text()) for n in ("voc_eval.json", "coco_eval.json"))
    assert {k: voc_m[k] for k in ("AP", "AP50")} == {k: coco_m[k] for k in ("AP", "AP50")}
    assert cli.main(["viz", "--voc", str(val_voc), "--images", shapes["val_images"], "--out", str(tmp_path / "viz"),
                     "--checkpoint", str(out / "final.pt"), "--num", "1"]) == 0


def test_voc_command_line_errors_are_one_line(shapes, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.xml").write_text("<annotation><filename>x.png</filename>")  # unclosed
    with pytest.raises(SystemExit, match=r"^fgd convert-voc: .*a.xml: not valid Pascal VOC XML"):
        cli.main(["convert-voc", "--annotations", str(bad), "--images", shapes["val_images"],
                  "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match=r"^fgd train: .*a.xml: not valid Pascal VOC XML"):
        cli.main(["train", "--train-voc", str(bad), "--train-images", shapes["val_images"], "--no-distill",
                  "--output-dir", str(tmp_path / "r"), "--no-progress"])
    with pytest.raises(SystemExit, match=r"^fgd train: config: give the training annotations as train_json"):
        cli.main(["train", "--train-voc", str(bad), "--train-json", "a.json", "--train-images", "x", "--no-distill"])
    with pytest.raises(SystemExit, match=r"^fgd eval: give the annotations as --json \(COCO\) or --voc"):
        cli.main(["eval", "x.pt", "--images", "x"])


def test_demo_seeds_and_ablation(tmp_path, capsys):
    import csv

    assert cli.main(["demo", "--quick", "--seeds", "2", "--ablation", "--out", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "best student:" in out and "mean ± std over seeds 0, 1" in out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == [
        "teacher (resnet18-fpn)", "student (resnet18-slim-fpn)", "student + FGFI (resnet18-slim-fpn)",
        "student + full-map imitation (resnet18-slim-fpn)", "student + GT-box imitation (resnet18-slim-fpn)"]
    for r in rows:  # numbers, never "a ± b"
        for key in ("AP", "AP50", "AP_std", "AP50_std"):
            float(r[key])
    assert (tmp_path / "seed1" / "student_gt_box" / "final.pt").exists()  # seed 0's runs are at the top
    assert (tmp_path / "student_fgfi" / "final.pt").exists()
