"""`fgd demo`: the whole method on data the project makes itself.

Generates the shapes dataset (COCO format), trains a teacher (bigger backbone), a student alone and
the same student with FGFI from that teacher for the same number of steps, evaluates them with
COCOeval and writes a table (Markdown, CSV), loss curves, a mAP chart and imitation-mask pictures.
``seeds`` repeats the training with other seeds (mean and std in the table); ``ablation`` adds the
paper's baselines on the same student budget: imitation on the full map and inside the GT boxes.
Finished runs are cached in the output folder (same settings -> reused; a killed run resumes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from .config import DemoConfig, TrainConfig

log = logging.getLogger("fgd")

# Sized for a few minutes on a 2-core CPU (the README's demo section has the measured time): the
# teacher gets most of the budget, since FGFI can only pass on what the teacher has learnt. The
# student is ResNet-18 at half width (a quarter of the teacher's backbone work).
DEFAULT = dict(train_images=1000, val_images=200, image_size=128, batch_size=8, iterations=250,
               teacher_iterations=520, teacher_arch="resnet18-fpn", student_arch="resnet18-slim-fpn")
# The tree tiles: as many images as deepforest's data gives (train_images / val_images unused), of
# 200 px, so each step costs more than a shapes step (README, "Real data"): fewer of them.
TREES = dict(DEFAULT, image_size=200, teacher_iterations=300, iterations=150)
QUICK = dict(train_images=24, val_images=12, image_size=64, batch_size=4, iterations=6,
             teacher_iterations=8, teacher_arch="resnet18-fpn", student_arch="resnet18-slim-fpn")
# How every run of the demo trains, beyond the sizes (TrainConfig fields); the README's "The recipe,
# and why" has the runs behind each choice. AdamW, because it converges from random initialisation
# within the demo's budget where SGD did not; lr 2e-3 at batch 8, as higher rates or smaller
# batches diverged. 64 RoIs per image with one RoIAlign sample per bin, because torchvision's CPU
# RoIAlign backward is a large share of a step with more.
RECIPE = dict(optimizer="adamw", lr=0.002, weight_decay=1e-4, rois_per_image=64, roi_sampling=1)
# BatchNorm in the teacher's FPN: without it the teacher stalled on one seed. Not in the
# student's: there it cut FGFI's gain (README, "The recipe, and why").
TEACHER = dict(student_fpn_channels=128, fpn_norm=True)
STUDENT = dict(student_fpn_channels=64)
# lambda follows the scale of the teacher's features: the normalised FPN gives a much smaller
# imitation loss than the plain one the official 0.01 was set for (README: the lambdas tried).
DISTILLED = dict(imitation_weight=0.1)

# The rows: key -> (label, the student's imitation settings or None for a plain run).
IMITATION = {"fgfi": ("student + FGFI", "fgfi"), "full": ("student + full-map imitation", "full"),
             "gt_box": ("student + GT-box imitation", "gt_box")}


# TrainConfig fields that name files: a demo run's identity holds them relative to the run's folder
_PATHS = ("train_json", "train_images", "train_voc", "train_split_file", "val_json", "val_images", "val_voc",
          "val_split_file", "teacher_checkpoint")


def demo_id(config: dict, data: dict) -> str:
    """What a demo run computes: the settings ``fgd train``'s run id holds (not threads, logging or
    output), the validation set and the data's own settings (``data``), with every path relative to
    the run's folder — the demo's data lives inside the demo folder, so a moved folder keeps its ids."""
    from .checkpoint import run_identity, with_legacy_values

    fields = {f.name for f in dataclasses.fields(TrainConfig)}  # not config.json's run_id and the like
    c = {k: v for k, v in with_legacy_values(config).items() if k in fields}
    here = str(c.get("output_dir"))
    c = {k: os.path.relpath(v, here) if k in _PATHS and isinstance(v, str) else v for k, v in c.items()}
    what = {**run_identity(c), **{k: c.get(k) for k in _PATHS}, "data": data}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached_id(run_dir: Path, data: dict):
    """The demo id of the run finished in ``run_dir`` (None if none finished there)."""
    try:
        done = json.loads((run_dir / "metrics_full.json").read_text())
        if not (run_dir / "final.pt").is_file():
            return None
        return done.get("demo_id") or demo_id(json.loads((run_dir / "config.json").read_text()), data)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _started_id(run_dir: Path, data: dict):
    """The demo id of the run begun in ``run_dir`` (None if its settings cannot be read)."""
    try:
        return demo_id(json.loads((run_dir / "config.json").read_text()), data)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _run(cfg: TrainConfig, data: dict, force: bool) -> tuple:
    """(metrics, seconds of training + evaluation, cached?) of one run. A finished run of the same
    settings is reused; a run of other settings (or, with ``force``, any) is moved aside, never
    deleted; a killed run of the same settings resumes."""
    from .engine import train
    from .files import move_aside, write_atomic

    run_dir = Path(cfg.output_dir)
    want = demo_id(dataclasses.asdict(cfg), data)
    metrics_path = run_dir / "metrics_full.json"
    if not force and _cached_id(run_dir, data) == want:
        done = json.loads(metrics_path.read_text())
        return done["metrics"], done["seconds"], True
    if run_dir.exists() and (force or _cached_id(run_dir, data) is not None or _started_id(run_dir, data) != want):
        if not run_dir.is_dir() or any(run_dir.iterdir()):
            move_aside(run_dir, "--force" if force else "it holds a run of other settings")
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    write_atomic(metrics_path, json.dumps({"metrics": result["metrics"], "seconds": seconds, "demo_id": want},
                                          indent=2))
    return result["metrics"], seconds, False


def _configs(p: dict, data: dict, out: Path, seed: int, threads, ablation: bool) -> dict:
    """key -> (row label, TrainConfig) of one seed's runs, teacher first. ``data``: the TrainConfig
    fields that name the training and validation sets."""
    base = TrainConfig(
        **data, image_size=p["image_size"], batch_size=p["batch_size"], seed=seed, threads=threads, distill=False,
        iterations=p["iterations"], lr_warmup_iters=max(1, min(50, p["iterations"] // 6)),
        checkpoint_every=max(10, p["iterations"] // 4), log_every=max(1, min(10, p["iterations"] // 20)),
        # a killed run resumes, also from a moved demo folder (its paths then differ; demo_id checked the rest)
        resume=True, allow_changes=",".join(k for k in _PATHS if not k.startswith("val_")), **RECIPE)
    teacher = dataclasses.replace(
        base, student_arch=p["teacher_arch"], iterations=p["teacher_iterations"],
        lr_warmup_iters=max(1, min(50, p["teacher_iterations"] // 6)),
        checkpoint_every=max(10, p["teacher_iterations"] // 4), output_dir=str(out / "teacher"), **TEACHER)
    student = dataclasses.replace(base, student_arch=p["student_arch"], output_dir=str(out / "student"), **STUDENT)
    runs = {"teacher": (f"teacher ({p['teacher_arch']})", teacher),
            "student": (f"student ({p['student_arch']})", student)}
    for key in ("fgfi", "full", "gt_box") if ablation else ("fgfi",):
        label, mode = IMITATION[key]
        runs[key] = (f"{label} ({p['student_arch']})", dataclasses.replace(
            student, distill=True, mask_mode=mode, teacher_checkpoint=str(out / "teacher" / "final.pt"), **DISTILLED,
            output_dir=str(out / f"student_{key}")))
    return runs


def _mean_std(per_seed: list) -> tuple:
    """Rows of several seeds -> (mean rows, std rows), per metric (std 0 for one seed)."""
    mean, std = {}, {}
    for name in per_seed[0]:
        keys = [k for k, v in per_seed[0][name].items() if isinstance(v, (int, float))]
        values = {k: [rows[name][k] for rows in per_seed] for k in keys}
        mean[name] = {k: statistics.fmean(v) for k, v in values.items()}
        std[name] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, std


def _verdict(mean: dict, labels: dict) -> str:
    """Which student wins, and how much of the teacher-student gap FGFI closes."""
    ap = {key: mean[label]["AP"] for key, label in labels.items()}
    students = {k: v for k, v in ap.items() if k != "teacher"}
    best = max(students, key=students.get)
    lines = [f"best student: {labels[best]} (AP {100 * students[best]:.1f})"]
    gap = ap["teacher"] - ap["student"]
    if gap > 0:
        lines.append(f"FGFI closes {100 * (ap['fgfi'] - ap['student']) / gap:.0f} % of the teacher-student AP gap "
                     f"({100 * ap['student']:.1f} -> {100 * ap['fgfi']:.1f}, teacher {100 * ap['teacher']:.1f})")
    return "; ".join(lines)


def run_demo(cfg: DemoConfig) -> dict:
    """The demo in the folder ``cfg.out``, which it holds alone while it works (``RunLock``)."""
    from .engine import check_memory
    from .files import RunLock, check_output_folder, command_line

    p = dict(QUICK if cfg.quick else TREES if cfg.data == "trees" else DEFAULT)
    p.update({k: getattr(cfg, k) for k in p if getattr(cfg, k) is not None})
    out = check_output_folder(cfg.out, "--out", inside=("data", "trees", "masks"))
    with RunLock(out, command_line()):
        # every run's step must fit before the data is made (the data's images are image_size too)
        for _, run_cfg in _configs(p, dict(train_json="", train_images=""), out, cfg.seed, cfg.threads,
                                   cfg.ablation).values():
            check_memory(run_cfg)
        return _demo(cfg, p, out)


def _demo(cfg: DemoConfig, p: dict, out: Path) -> dict:
    from .evaluate import format_table, write_table
    from .viz import plot_curves, plot_map_table

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    what = (f"deepforest's tree crowns in {p['image_size']} px tiles" if cfg.data == "trees" else
            f"{p['train_images']} train / {p['val_images']} val shapes images of {p['image_size']} px")
    print(f"fgd demo: {what}; "
          f"teacher {p['teacher_arch']} ({p['teacher_iterations']} it), student {p['student_arch']} "
          f"({p['iterations']} it{', alone, with FGFI and the ablation' if cfg.ablation else ', alone and with FGFI'}), "
          f"batch {p['batch_size']}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
          f"output in {out}", flush=True)
    data = _data(cfg, p, out)
    made = {"data": cfg.data, "seed": cfg.seed, **{k: p[k] for k in ("train_images", "val_images", "image_size")}}

    per_seed, seconds = [], {}
    for seed in seeds:
        folder = out if seed == cfg.seed else out / f"seed{seed}"  # the first seed's runs are a single run's
        runs = _configs(p, data, folder, seed, cfg.threads, cfg.ablation)
        rows = {}
        teacher_new = False
        for key, (label, run_cfg) in runs.items():
            # a distilled run cached against an earlier teacher is stale once the teacher retrains
            metrics, secs, cached = _run(run_cfg, made, cfg.force or (teacher_new and run_cfg.distill))
            teacher_new = teacher_new or (key == "teacher" and not cached)
            rows[label] = metrics
            seconds.setdefault(label, []).append(secs)
            print(f"fgd demo: seed {seed}: {label}: AP {100 * metrics['AP']:.1f}, AP50 {100 * metrics['AP50']:.1f} "
                  f"({'cached' if cached else f'{secs:.0f} s'})", flush=True)
        per_seed.append(rows)
    labels = {key: label for key, (label, _) in runs.items()}
    mean, std = _mean_std(per_seed)
    if len(seeds) == 1:
        std = None
    table = format_table(mean, std=std)
    write_table(mean, out / "results.md", out / "results.csv", std=std)
    last = {key: c for key, (_, c) in runs.items()}  # the pictures show the last seed's runs
    plot_curves({labels[k]: str(Path(c.output_dir) / "log.csv") for k, c in last.items()},
                out / "loss_curves.png", keys=("loss", "loss_imitation"), title="fgd demo: training losses")
    plot_map_table(mean, out / "map.png")
    masks = _mask_pictures(last["fgfi"], out / "masks", n=4)
    verdict = _verdict(mean, labels)
    wall = time.perf_counter() - t_start
    print("\n" + table + ("" if std is None else f"\n(mean ± std over seeds {', '.join(map(str, seeds))})"))
    print(f"\nfgd demo: {verdict}")
    print(f"fgd demo: wall time {wall:.0f} s; table in {out / 'results.md'}, curves {out / 'loss_curves.png'}, "
          f"mAP chart {out / 'map.png'}, masks {len(masks)} PNGs in {out / 'masks'}")
    return {"rows": mean, "std": std, "per_seed": per_seed, "seconds": seconds, "wall": wall, "table": table,
            "verdict": verdict}


def _data(cfg: DemoConfig, p: dict, out: Path) -> dict:
    """The demo's data, written under ``out`` (reused when present), as TrainConfig fields."""
    if cfg.data == "trees":  # real aerial images with Pascal VOC boxes, tiled (fgd.data.trees)
        from .data import make_tree_tiles

        tiles = make_tree_tiles(out / "trees", tile=p["image_size"])
        train, val = tiles["train"]["dir"], tiles["val"]["dir"]
        return dict(train_voc=train, train_images=train, val_voc=val, val_images=val)
    from .data import make_shapes_dataset

    train_json, train_dir = make_shapes_dataset(out / "data", p["train_images"], p["image_size"], seed=cfg.seed,
                                                split="train")
    val_json, val_dir = make_shapes_dataset(out / "data", p["val_images"], p["image_size"], seed=cfg.seed,
                                            split="val")
    return dict(train_json=train_json, train_images=train_dir, val_json=val_json, val_images=val_dir)


def _mask_pictures(cfg: TrainConfig, folder: Path, n: int) -> list:
    from .engine import make_dataset
    from .models import load_detector
    from .viz import write_pictures

    ds = make_dataset(cfg, "val")
    student, _, class_names = load_detector(Path(cfg.output_dir) / "final.pt")
    picked = [i for i in range(len(ds)) if len(ds[i][1]["boxes"]) > 0][:n]
    return write_pictures(student, ds, picked, folder, cfg.imitation, detections=True, title="FGFI masks")
