"""`fgd demo`: the whole method on data the project makes itself.

Generates the shapes dataset (COCO format), trains a teacher (bigger backbone), a student alone and
the same student with FGFI from that teacher for the same number of steps, evaluates the three with
COCOeval and writes a table (Markdown, CSV), loss curves, a mAP chart and imitation-mask pictures.
Finished runs are cached in the output folder (same settings -> reused; a killed run resumes).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from .engine import TrainConfig, load_detector, train

log = logging.getLogger("fgd")

# Sized for about ten minutes on a 2-core CPU (measured: see the README's demo table).
# Most of the budget goes to the teacher: FGFI can only pass on what the teacher has learnt.
DEFAULT = dict(train_images=1000, val_images=200, image_size=128, batch_size=8, iterations=150,
               teacher_iterations=600, teacher_arch="resnet34-fpn", student_arch="resnet18-fpn")
QUICK = dict(train_images=24, val_images=12, image_size=64, batch_size=4, iterations=6,
             teacher_iterations=8, teacher_arch="resnet34-fpn", student_arch="resnet18-fpn")


def _same_config(run_dir: Path, cfg: TrainConfig) -> bool:
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    want = dataclasses.asdict(cfg)
    return all(saved.get(k) == v for k, v in want.items() if k != "resume")


def _run(name: str, cfg: TrainConfig, force: bool) -> tuple:
    """(metrics, seconds of training + evaluation, cached?) of one run."""
    run_dir = Path(cfg.output_dir)
    metrics_path = run_dir / "metrics_full.json"
    if not force and (run_dir / "final.pt").exists() and metrics_path.exists() and _same_config(run_dir, cfg):
        log.info("%s: reusing the finished run in %s", name, run_dir)
        data = json.loads(metrics_path.read_text())
        return data["metrics"], data["seconds"], True
    if run_dir.exists() and (force or not _same_config(run_dir, cfg)):
        shutil.rmtree(run_dir)  # other settings: start over rather than resume a different run
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    metrics_path.write_text(json.dumps({"metrics": result["metrics"], "seconds": seconds}, indent=2))
    return result["metrics"], seconds, False


def run_demo(out="runs/demo", quick=False, iterations=None, teacher_iterations=None, train_images=None,
             val_images=None, image_size=None, batch_size=None, seed=0, threads=None, teacher_arch=None,
             student_arch=None, force=False) -> dict:
    from .data import make_shapes_dataset
    from .evaluate import format_table, write_table
    from .viz import plot_curves, plot_map_table

    t_start = time.perf_counter()
    p = dict(QUICK if quick else DEFAULT)
    given = dict(iterations=iterations, teacher_iterations=teacher_iterations, train_images=train_images,
                 val_images=val_images, image_size=image_size, batch_size=batch_size,
                 teacher_arch=teacher_arch, student_arch=student_arch)
    p.update({k: v for k, v in given.items() if v is not None})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    print(f"fgd demo: {p['train_images']} train / {p['val_images']} val shapes images of {p['image_size']} px; "
          f"teacher {p['teacher_arch']} ({p['teacher_iterations']} it), student {p['student_arch']} "
          f"({p['iterations']} it, alone and with FGFI), batch {p['batch_size']}; output in {out}", flush=True)
    train_json, train_dir = make_shapes_dataset(out / "data", p["train_images"], p["image_size"], seed=seed, split="train")
    val_json, val_dir = make_shapes_dataset(out / "data", p["val_images"], p["image_size"], seed=seed, split="val")

    base = TrainConfig(train_json=train_json, train_images=train_dir, val_json=val_json, val_images=val_dir,
                       image_size=p["image_size"], batch_size=p["batch_size"], seed=seed, threads=threads,
                       iterations=p["iterations"], lr_warmup_iters=max(1, min(50, p["iterations"] // 6)),
                       checkpoint_every=max(10, p["iterations"] // 4), log_every=max(1, min(10, p["iterations"] // 20)),
                       resume=True)
    teacher_cfg = dataclasses.replace(
        base, student_arch=p["teacher_arch"], student_fpn_channels=128, distill=False,
        iterations=p["teacher_iterations"], checkpoint_every=max(10, p["teacher_iterations"] // 4),
        output_dir=str(out / "teacher"))
    student_cfg = dataclasses.replace(base, student_arch=p["student_arch"], student_fpn_channels=64,
                                      distill=False, output_dir=str(out / "student"))
    fgfi_cfg = dataclasses.replace(student_cfg, distill=True, teacher_checkpoint=str(out / "teacher" / "final.pt"),
                                   output_dir=str(out / "student_fgfi"))
    names = {"teacher": f"teacher ({p['teacher_arch']})", "student": f"student ({p['student_arch']})",
             "fgfi": f"student + FGFI ({p['student_arch']})"}
    rows, seconds = {}, {}
    for key, cfg in (("teacher", teacher_cfg), ("student", student_cfg), ("fgfi", fgfi_cfg)):
        if key == "fgfi":
            print(f"fgd demo: FGFI imitation warm-up {cfg.resolved_imitation_warmup()} of {cfg.iterations} "
                  f"iterations, lambda {cfg.imitation_weight}, psi {cfg.thresh}", flush=True)
        metrics, secs, cached = _run(names[key], cfg, force)
        rows[names[key]] = metrics
        seconds[names[key]] = secs
        print(f"fgd demo: {names[key]}: AP {100 * metrics['AP']:.1f}, AP50 {100 * metrics['AP50']:.1f} "
              f"({'cached' if cached else f'{secs:.0f} s'})", flush=True)

    table = format_table(rows)
    write_table(rows, out / "results.md", out / "results.csv")
    plot_curves({names[k]: str(Path(c.output_dir) / "log.csv") for k, c in
                 (("teacher", teacher_cfg), ("student", student_cfg), ("fgfi", fgfi_cfg))},
                out / "loss_curves.png", keys=("loss", "loss_imitation"), title="fgd demo: training losses")
    plot_map_table(rows, out / "map.png")
    masks = _mask_pictures(fgfi_cfg, val_json, val_dir, out / "masks", n=4)
    wall = time.perf_counter() - t_start
    print("\n" + table)
    print(f"\nfgd demo: wall time {wall:.0f} s; table in {out / 'results.md'}, curves {out / 'loss_curves.png'}, "
          f"mAP chart {out / 'map.png'}, masks {len(masks)} PNGs in {out / 'masks'}")
    return {"rows": rows, "seconds": seconds, "wall": wall, "table": table}


def _mask_pictures(cfg: TrainConfig, val_json, val_dir, folder: Path, n: int) -> list:
    from .data import CocoDetection
    from .vizcmd import write_pictures

    ds = CocoDetection(val_dir, val_json)
    student, _, _ = load_detector(Path(cfg.output_dir) / "final.pt")
    picked = [i for i in range(len(ds)) if len(ds[i][1]["boxes"]) > 0][:n]
    return write_pictures(student, ds, picked, folder, mask_mode=cfg.mask_mode, level_policy=cfg.level_policy,
                          thresh=cfg.thresh, detections=True, title="FGFI masks")
