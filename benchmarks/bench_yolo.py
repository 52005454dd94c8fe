"""The demo's benchmark under Ultralytics YOLO: teacher, student alone, student + Ultralytics' own KD,
student + FGFI -- same data (fgd's shapes, exported to YOLO format), same epochs and image size for
every student, several seeds (mean +- std of mAP50-95 and mAP50 on the validation split).

    PYTHONPATH=. python benchmarks/bench_yolo.py --out /tmp/fgd-yolo [--seeds 3] [--epochs 7] [--teacher-epochs 20]

Runs are cached in --out (a finished run with the same settings is read back, so a killed
benchmark resumes at the run it was in). No network: models are built from their yaml.
"""
import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def train_run(out: Path, name: str, model_yaml: str, data: str, seed: int, epochs: int, imgsz: int, batch: int,
              **extra) -> dict:
    """One training run (cached by its settings): {"mAP50-95", "mAP50", "seconds"}."""
    from ultralytics import YOLO

    run = out / name
    settings = dict(model=model_yaml, data=data, seed=seed, epochs=epochs, imgsz=imgsz, batch=batch,
                    **{k: (v.__name__ if isinstance(v, type) else v) for k, v in extra.items()})
    done = run / "fgd_result.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if saved["settings"] == settings:
            print(f"{name}: cached ({saved['mAP50-95']:.1f} mAP50-95)", flush=True)
            return saved
    t0 = time.perf_counter()
    model = YOLO(model_yaml)
    model.train(data=data, seed=seed, epochs=epochs, imgsz=imgsz, batch=batch, workers=0, plots=False, amp=False,
                device="cpu", project=str(out), name=name, exist_ok=True, verbose=False, **extra)
    metrics = YOLO(str(run / "weights" / "best.pt")).val(data=data, imgsz=imgsz, batch=batch, device="cpu",
                                                          plots=False, verbose=False, project=str(out),
                                                          name=f"{name}_val", exist_ok=True)
    result = {"settings": settings, "mAP50-95": 100 * float(metrics.box.map), "mAP50": 100 * float(metrics.box.map50),
              "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(result, indent=2))
    print(f"{name}: mAP50-95 {result['mAP50-95']:.1f}, mAP50 {result['mAP50']:.1f} ({result['seconds']:.0f} s)",
          flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=7, help="every student's epochs")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--teacher", default="yolo26s.yaml")
    p.add_argument("--student", default="yolo26n.yaml")
    p.add_argument("--fgfi-lambda", type=float, default=None, help="default: FGFITrainer's")
    p.add_argument("--teacher-only", action="store_true", help="train (or read back) the teacher and stop")
    args = p.parse_args(argv)

    import torch

    from fgd.data import make_shapes_dataset
    from fgd.data.yolo import coco_to_yolo
    from fgd.timing import cpu_model
    from fgd.integrations.ultralytics import FGFITrainer

    out = Path(args.out)
    t_start = time.perf_counter()
    tj, td = make_shapes_dataset(out / "shapes", args.train_images, args.imgsz, seed=0, split="train")
    vj, vd = make_shapes_dataset(out / "shapes", args.val_images, args.imgsz, seed=0, split="val")
    data = str(coco_to_yolo({"train": (tj, td), "val": (vj, vd)}, out / "yolo"))
    common = dict(data=data, imgsz=args.imgsz, batch=args.batch)
    teacher = train_run(out, "teacher", args.teacher, seed=0, epochs=args.teacher_epochs, **common)
    teacher_pt = str(out / "teacher" / "weights" / "best.pt")
    if args.teacher_only:
        return
    fgfi = {} if args.fgfi_lambda is None else {"fgfi_lambda": args.fgfi_lambda}
    rows = {"student": [], "kd": [], "fgfi": []}
    for seed in range(args.seeds):
        s = dict(seed=seed, epochs=args.epochs, **common)
        rows["student"].append(train_run(out, f"student_s{seed}", args.student, **s))
        rows["kd"].append(train_run(out, f"kd_s{seed}", args.student, distill_model=teacher_pt, **s))
        rows["fgfi"].append(train_run(out, f"fgfi_s{seed}", args.student, distill_model=teacher_pt,
                                      trainer=FGFITrainer, **fgfi, **s))
    stem = Path(args.student).stem
    labels = {"student": f"student ({stem})", "kd": f"student + Ultralytics KD ({stem})",
              "fgfi": f"student + FGFI ({stem})"}
    table = [("teacher (" + Path(args.teacher).stem + ")", [teacher])] + [(labels[k], v) for k, v in rows.items()]

    def cell(runs, key):
        vals = [r[key] for r in runs]
        return f"{statistics.fmean(vals):.1f}" + (f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else "")

    lines = [f"| model | mAP50-95 | mAP50 | runs | s / run |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {cell(r, 'mAP50-95')} | {cell(r, 'mAP50')} | {len(r)} | "
              f"{statistics.fmean(x['seconds'] for x in r):.0f} |" for name, r in table]
    header = (f"{args.train_images} / {args.val_images} shapes images at {args.imgsz} px; teacher {args.teacher_epochs} "
              f"epochs, students {args.epochs} epochs, batch {args.batch}, seeds 0..{args.seeds - 1}; CPU: {cpu_model()}, "
              f"torch threads as Ultralytics sets them: {torch.get_num_threads()}; wall {time.perf_counter() - t_start:.0f} s")
    (out / "results.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "mAP50-95", "mAP50", "mAP50-95_std", "mAP50_std", "runs"])
        for name, r in table:
            m = [statistics.fmean(x[k] for x in r) for k in ("mAP50-95", "mAP50")]
            sd = [statistics.stdev(x[k] for x in r) if len(r) > 1 else 0.0 for k in ("mAP50-95", "mAP50")]
            w.writerow([name, *[f"{v:.2f}" for v in m + sd], len(r)])
    print(header + "\n\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
