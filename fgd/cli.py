"""The `fgd` command: demo, train, eval, viz, bench.

    fgd demo                      # synthetic data, teacher / student / student + FGFI, mAP table
    fgd train --config configs/voc.yaml --output-dir runs/voc
    fgd eval runs/voc/final.pt --json val.json --images val/    # or --voc Annotations/
    fgd convert-voc --annotations VOC2007 --images VOC2007/JPEGImages --out trainval.json
    fgd export-yolo --train-json t.json --train-images t/ --val-json v.json --val-images v/ --out yolo/
    fgd viz --json val.json --images val/ --checkpoint runs/voc/final.pt
    fgd bench
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("fgd")


def _yaml_without_aliases():
    """PyYAML's safe loader, refusing aliases: ten nested ones (a "billion laughs" of 479 bytes)
    expand to gigabytes, and a settings file has no use for them."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: an alias (*name); fgd's settings files take none")
            return super().compose_node(parent, index)

    return Loader


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():  # a folder, a FIFO (would block forever) or nothing
        what = "does not exist" if not p.exists() else "is a folder" if p.is_dir() else "is not a regular file"
        raise SystemExit(f"fgd: config {path} {what}")
    try:
        text = p.read_text(encoding="utf-8")
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.load(text, Loader=_yaml_without_aliases()) or {}
        else:
            data = json.loads(text)
    except UnicodeDecodeError as e:
        raise SystemExit(f"fgd: cannot read config {path}: not UTF-8 text (byte {e.start})")
    except (Exception, RecursionError) as e:  # yaml/json errors, deep nesting, integers past Python's limit
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise SystemExit(f"fgd: cannot read config {path}: {text[:300]}")
    if not isinstance(data, dict):
        raise SystemExit(f"fgd: config {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _config(args, cls):
    from .config import given_flags

    values = _load_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given_flags(args, cls))
    return cls.from_dict(values)  # ConfigError names the key, its value and what is allowed


def cmd_train(args):
    from .config import TrainConfig
    from .engine import train

    result = train(_config(args, TrainConfig))  # checks the settings before anything runs
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    if not main:
        return
    if result["metrics"]:
        print(result["metrics"]["summary"])
    print(f"fgd train: final weights in {result['final']}")


def _check_not_an_input(out: Path, prog: str, *inputs) -> None:
    """An output never replaces an input (a checkpoint, an annotation file, ...)."""
    from .files import same_file

    for given in inputs:
        if given and same_file(out, given):
            raise SystemExit(f"{prog}: --out {out} is one of the inputs ({given}); give another file name")


def _check_writable(path: Path, prog: str) -> None:
    """SystemExit naming ``path`` unless a file can be written there (an existing file is left as is)."""
    if path.is_dir():
        raise SystemExit(f"{prog}: output {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise SystemExit(f"{prog}: output {path}: folder {path.parent} does not exist")
    existed = path.exists()
    if existed and not path.is_file():  # opening a FIFO would wait for a reader
        raise SystemExit(f"{prog}: output {path} is not a regular file (a FIFO, socket or device); give a file name")
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise SystemExit(f"{prog}: cannot write output {path}: {e.strerror or e}")
    if not existed:
        path.unlink()


def _check_classes(class_names, json_path):
    """Label i of the model must be category i of the file (categories in id order): otherwise every
    detection is scored as another class and the mAP is wrong without a word."""
    from .data.coco import coco_class_names, load_coco_json

    try:
        names = coco_class_names(load_coco_json(json_path))
    except ValueError as e:
        raise SystemExit(f"fgd eval: {e}")
    if class_names is None:
        raise SystemExit(f"fgd eval: the checkpoint records no class names, so its labels cannot be matched to "
                         f"the categories of {json_path}; evaluate a final.pt written by fgd train")
    if list(class_names) != names:
        raise SystemExit(f"fgd eval: the checkpoint's classes {list(class_names[1:])} do not match the "
                         f"categories of {json_path} {names[1:]} (in category id order)")


def _check_annotation_flags(args, prog):
    if bool(args.json) == bool(args.voc):
        raise SystemExit(f"{prog}: give the annotations as --json (COCO) or --voc (Pascal VOC), one of them")
    if args.split_file and not args.voc:
        raise SystemExit(f"{prog}: --split-file selects the XML files of a --voc folder")


def _dataset_for_eval(args, prog, class_names, model):
    """The COCO (--json) or Pascal VOC (--voc) set a checkpoint is evaluated or drawn on, its
    categories checked against (COCO) or taken from (VOC) the checkpoint's classes."""
    from .data import CocoDetection, VocDetection

    try:
        if args.voc:
            return VocDetection(args.voc, args.images, split_file=args.split_file,
                                classes=class_names[1:] if class_names else None)
        if model is not None:
            _check_classes(class_names, args.json)
        return CocoDetection(args.images, args.json)
    except (ValueError, FileNotFoundError) as e:  # a bad file or folder: one line naming it
        raise SystemExit(f"{prog}: {e}")


def cmd_eval(args):
    import torch

    from .config import TrainConfig
    from .engine import Dist, make_loader
    from .evaluate import evaluate
    from .files import move_aside, write_atomic
    from .models import load_detector

    _check_annotation_flags(args, "fgd eval")
    out = Path(args.out or Path(args.checkpoint).with_name("eval.json"))
    _check_not_an_input(out, "fgd eval", args.checkpoint, args.json, args.split_file)
    _check_writable(out, "fgd eval")  # before the long work, not after it
    device = args.device or _device("cuda" if torch.cuda.is_available() else "cpu")
    model, c, class_names = load_detector(args.checkpoint, device)
    ds = _dataset_for_eval(args, "fgd eval", class_names, model)
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=args.num_workers)
    metrics = evaluate(model, make_loader(ds, cfg, Dist(device=device), train=False)[1])
    print(metrics["summary"])
    print(f"images/s: {metrics['img/s']:.1f}")
    if out.exists():  # an earlier evaluation is a result too: moved aside, not overwritten
        move_aside(out, "an earlier evaluation")
    write_atomic(out, json.dumps({k: v for k, v in metrics.items() if k != "summary"}, indent=2))
    print(f"fgd eval: saved {out}")


def cmd_viz(args):
    import tempfile

    from .distill import ImitationSettings
    from .models import build_detector, load_detector
    from .viz import write_pictures

    _check_annotation_flags(args, "fgd viz")
    out = Path(args.out)  # checked before the model runs, not after
    if out.exists() and not out.is_dir():
        raise SystemExit(f"fgd viz: --out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise SystemExit(f"fgd viz: cannot write to --out {out}: {e.strerror or e}")
    if args.checkpoint:
        model, _, class_names = load_detector(args.checkpoint)
    elif args.detections:
        raise SystemExit("fgd viz: --detections needs --checkpoint")
    else:
        model, class_names = None, None
    ds = _dataset_for_eval(args, "fgd viz", class_names, None)
    if model is None:
        model = build_detector(args.arch, ds.num_classes, args.image_size)
    settings = ImitationSettings().updated("settings", mask_mode=args.mask_mode, level_policy=args.level_policy,
                                           thresh=args.thresh)
    paths = write_pictures(model, ds, range(min(args.num, len(ds))), out, settings, detections=args.detections)
    print(f"fgd viz: wrote {len(paths)} images to {out}")


def cmd_convert_voc(args):
    from .data.voc import convert_voc

    out = Path(args.out)
    _check_writable(out, "fgd convert-voc")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        summary = convert_voc(args.annotations, args.images, out, split_file=args.split_file, classes=classes)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"fgd convert-voc: {e}")
    print(f"fgd convert-voc: wrote {out}: {summary}")


def cmd_export_yolo(args):
    from .data.yolo import coco_to_yolo

    try:
        yaml = coco_to_yolo({"train": (args.train_json, args.train_images), "val": (args.val_json, args.val_images)},
                            args.out)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"fgd export-yolo: {e}")
    print(f"fgd export-yolo: wrote {yaml} (train with YOLO(...).train(data={str(yaml)!r}))")


def cmd_demo(args):
    from .config import DemoConfig
    from .demo import run_demo

    run_demo(_config(args, DemoConfig))


def _annotation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="COCO annotation file")
    p.add_argument("--voc", help="Pascal VOC annotations: a VOC tree or a folder of XML files")
    p.add_argument("--split-file", help="with --voc: the image ids to read (VOC ImageSets/Main/*.txt)")
    p.add_argument("--images", required=True, help="image folder")


def build_parser() -> argparse.ArgumentParser:
    from .config import DemoConfig, TrainConfig, add_flags
    from .distill import LEVEL_POLICIES, MASK_MODES

    p = argparse.ArgumentParser(prog="fgd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthetic shapes: teacher, student, student + FGFI, mAP table")
    add_flags(d, DemoConfig)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a student (distilled or alone) on COCO or Pascal VOC data")
    t.add_argument("--config", help="YAML or JSON file of settings (flags override it)")
    add_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="COCO mAP of a checkpoint on COCO or Pascal VOC data")
    e.add_argument("checkpoint")
    _annotation_flags(e)
    e.add_argument("--out", help="metrics JSON (default: eval.json beside the checkpoint)")
    e.add_argument("--batch-size", type=_count(1), default=8)
    e.add_argument("--num-workers", type=_count(0), default=0)
    e.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if there is one)")
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("viz", help="imitation masks (and detections) over images, as PNGs")
    _annotation_flags(v)
    v.add_argument("--out", default="runs/viz")
    v.add_argument("--checkpoint", help="an fgd checkpoint: its architecture and anchors (and detections)")
    v.add_argument("--arch", default="resnet18-fpn", help="without --checkpoint: whose anchors to use")
    v.add_argument("--image-size", type=_count(33), default=128)
    v.add_argument("--num", type=_count(1), default=8, help="how many images")
    v.add_argument("--detections", action="store_true", help="also draw the checkpoint's detections")
    v.add_argument("--thresh", type=_fraction, default=0.5)
    v.add_argument("--level-policy", default="assigned", choices=LEVEL_POLICIES)
    v.add_argument("--mask-mode", default="fgfi", choices=MASK_MODES)
    v.set_defaults(func=cmd_viz)

    c = sub.add_parser("convert-voc", help="Pascal VOC XML annotations to a COCO json")
    c.add_argument("--annotations", required=True, help="a VOC tree or a folder of XML files")
    c.add_argument("--images", required=True, help="image folder (an XML's <filename> is looked up here)")
    c.add_argument("--split-file", help="the image ids to read (VOC ImageSets/Main/*.txt)")
    c.add_argument("--classes", help="NAME,NAME,...: the categories in this order (default: the names in the XML)")
    c.add_argument("--out", required=True, help="the COCO json to write")
    c.set_defaults(func=cmd_convert_voc)

    y = sub.add_parser("export-yolo", help="COCO json (e.g. the demo's shapes) to an Ultralytics YOLO data set")
    for split in ("train", "val"):
        y.add_argument(f"--{split}-json", required=True, help=f"the {split} split's COCO json")
        y.add_argument(f"--{split}-images", required=True, help=f"the {split} split's image folder")
    y.add_argument("--out", required=True, help="folder for images/, labels/ and data.yaml")
    y.set_defaults(func=cmd_export_yolo)

    sub.add_parser("bench", help="the kernel benchmarks (fgd.bench; `fgd bench --help` for its options)")
    return p


def _count(low: int):
    """An argparse type: an integer >= ``low`` (argparse prints the one line)."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    count.__name__ = "integer"
    return count


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _device(text: str):
    """An argparse type: a torch device this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: fgd runs on cpu or cuda")
    return device


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to fgd.bench's own parser
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except Exception as e:
        reason = _reason(e)
        if reason is None:  # a bug: its traceback
            raise
        raise SystemExit(f"fgd {args.command}: {reason}") from None


def _reason(e: Exception):
    """The one line for a failure the user can act on, or None (a bug keeps its traceback)."""
    import torch

    from .data import BadImageError
    from .distill import SettingsError
    from .files import RunError

    if isinstance(e, (RunError, SettingsError)):  # ConfigError and FileError are ones
        return str(e)
    if isinstance(e, BadImageError):  # also when a DataLoader worker re-raised it with its traceback
        return e.one_line()
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"out of memory ({first[:200]}); lower --image-size or --batch-size"
    if isinstance(e, OSError):  # a file the user named: disk full, permissions, ...
        return f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    return None


if __name__ == "__main__":
    sys.exit(main())
