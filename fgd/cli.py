"""The `fgd` command: demo, train, eval, viz, bench.

    fgd demo                      # synthetic data, teacher / student / student + FGFI, mAP table
    fgd train --config configs/voc.yaml --output-dir runs/voc
    fgd eval runs/voc/final.pt --json val.json --images val/
    fgd viz --json val.json --images val/ --checkpoint runs/voc/final.pt
    fgd bench
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path

log = logging.getLogger("fgd")


def _load_config_file(path: str) -> dict:
    text = Path(path).read_text()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:
        raise SystemExit(f"fgd: cannot read config {path}: {e}")
    if not isinstance(data, dict):
        raise SystemExit(f"fgd: config {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _add_config_flags(p: argparse.ArgumentParser, cls):
    """One flag per config field (--train-json, --no-distill, ...), default None = 'not given', so a
    config file and the flags have one meaning: flags override the file, the file the defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, dest=f.name, type=base, default=None, metavar=base.__name__.upper(),
                           help=f"(default: {f.default})")


def _config(args, cls):
    values = _load_config_file(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                   if getattr(args, f.name) is not None})
    try:
        return cls.from_dict(values)
    except (TypeError, ValueError) as e:  # the message names the key, its value and what is allowed
        raise SystemExit(f"fgd train: {e}")


def cmd_train(args):
    from .engine import TrainConfig, train

    cfg = _config(args, TrainConfig)
    try:
        cfg.check()
    except (TypeError, ValueError) as e:
        raise SystemExit(f"fgd train: {e}")
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    if cfg.distill and main:
        print(f"fgd train: imitation warm-up = {cfg.resolved_imitation_warmup()} iterations "
              f"(of {cfg.iterations}); lambda = {cfg.imitation_weight}, psi = {cfg.thresh}, "
              f"levels = {cfg.level_policy}, mask = {cfg.mask_mode}", flush=True)
    result = train(cfg)
    if not main:
        return
    if result["metrics"]:
        print(result["metrics"]["summary"])
    print(f"fgd train: final weights in {result['final']}")


def _check_writable(path: Path, prog: str) -> None:
    """SystemExit naming ``path`` unless a file can be written there (an existing file is left as is)."""
    if path.is_dir():
        raise SystemExit(f"{prog}: output {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise SystemExit(f"{prog}: output {path}: folder {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise SystemExit(f"{prog}: cannot write output {path}: {e.strerror or e}")
    if not existed:
        path.unlink()


def _check_classes(model, class_names, json_path):
    """Label i of the model must be category i of the file (categories in id order): otherwise every
    detection is scored as another class and the mAP is wrong without a word."""
    from .data.coco import _class_names, _load_json

    try:
        names = _class_names(_load_json(json_path))
    except ValueError as e:
        raise SystemExit(f"fgd eval: {e}")
    if class_names is not None:
        if list(class_names) != names:
            raise SystemExit(f"fgd eval: the checkpoint's classes {list(class_names[1:])} do not match the "
                             f"categories of {json_path} {names[1:]} (in category id order)")
        return
    # a checkpoint that keeps no names (an older one): compare the number of classes at least
    heads = getattr(model, "roi_heads", None)
    n = heads.box_predictor.cls_score.out_features if heads is not None else model.head.classification_head.num_classes
    if n != len(names):
        raise SystemExit(f"fgd eval: the checkpoint has {n - 1} classes, {json_path} has {len(names) - 1} "
                         f"categories {names[1:]}")


def cmd_eval(args):
    import torch

    from .engine import TrainConfig, evaluate_model, load_detector

    device = torch.device(args.device)
    model, c, class_names = load_detector(args.checkpoint, device)
    out = Path(args.out or Path(args.checkpoint).with_name("eval.json"))
    _check_writable(out, "fgd eval")  # before the long work, not after it
    _check_classes(model, class_names, args.json)
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=args.num_workers)
    metrics = evaluate_model(model, args.json, args.images, cfg)
    print(metrics["summary"])
    print(f"images/s: {metrics['img/s']:.1f}")
    out.write_text(json.dumps({k: v for k, v in metrics.items() if k != "summary"}, indent=2))
    print(f"fgd eval: saved {out}")


def cmd_viz(args):
    from .vizcmd import visualise

    paths = visualise(args)
    print(f"fgd viz: wrote {len(paths)} images to {args.out}")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick, iterations=args.iterations,
             teacher_iterations=args.teacher_iterations, train_images=args.train_images,
             val_images=args.val_images, image_size=args.image_size, batch_size=args.batch_size,
             seed=args.seed, threads=args.threads, teacher_arch=args.teacher_arch,
             student_arch=args.student_arch, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    from .distill import LEVEL_POLICIES, MASK_MODES
    from .engine import TrainConfig

    p = argparse.ArgumentParser(prog="fgd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthetic shapes: teacher, student, student + FGFI, mAP table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="tiny run (under a minute) to check everything works")
    d.add_argument("--iterations", type=int, help="training iterations of each student")
    d.add_argument("--teacher-iterations", type=int)
    d.add_argument("--train-images", type=int)
    d.add_argument("--val-images", type=int)
    d.add_argument("--image-size", type=int)
    d.add_argument("--batch-size", type=int)
    d.add_argument("--teacher-arch")
    d.add_argument("--student-arch")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    d.add_argument("--force", action="store_true", help="retrain even where a finished run is cached")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a student (distilled or alone) on COCO-format data")
    t.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    _add_config_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="COCO mAP of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--json", required=True, help="COCO annotation file")
    e.add_argument("--images", required=True, help="image folder")
    e.add_argument("--out", help="metrics JSON (default: eval.json beside the checkpoint)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--num-workers", type=int, default=0)
    e.add_argument("--device", default="cuda" if _cuda() else "cpu")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("viz", help="imitation masks (and detections) over images, as PNGs")
    v.add_argument("--json", required=True)
    v.add_argument("--images", required=True)
    v.add_argument("--out", default="runs/viz")
    v.add_argument("--checkpoint", help="an fgd checkpoint: its architecture and anchors (and detections)")
    v.add_argument("--arch", default="resnet18-fpn", help="without --checkpoint: whose anchors to use")
    v.add_argument("--image-size", type=int, default=128)
    v.add_argument("--num", type=int, default=8, help="how many images")
    v.add_argument("--detections", action="store_true", help="also draw the checkpoint's detections")
    v.add_argument("--thresh", type=float, default=0.5)
    v.add_argument("--level-policy", default="assigned", choices=LEVEL_POLICIES)
    v.add_argument("--mask-mode", default="fgfi", choices=MASK_MODES)
    v.set_defaults(func=cmd_viz)

    sub.add_parser("bench", help="the kernel benchmarks (fgd.bench; `fgd bench --help` for its options)")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to fgd.bench's own parser
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .engine import RunError

    try:
        return args.func(args) or 0
    except RunError as e:  # a reason the user can act on: one line, no traceback
        raise SystemExit(f"fgd {args.command}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
