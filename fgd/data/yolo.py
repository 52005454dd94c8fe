"""COCO json -> an Ultralytics YOLO data set (images/, labels/, data.yaml), so that the same data
(fgd's shapes, a converted VOC set, any COCO json) trains under both frameworks."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import yaml

from ..files import write_atomic, write_error
from .coco import bad_image, coco_class_names, decode_image, load_coco_json, usable_box

# The export is written here, inside ``out``, and swapped in only when complete; the previous
# export waits in _OLD until the swap is done. These two names are the only ones fgd removes
# (a killed export leaves _NEW, which the next export removes).
_NEW, _OLD = ".fgd-export-new", ".fgd-export-old"
_GO_ON = "fix the file, or remove it and its entry in the json, then rerun the export"
_RESERVED = {"path", "names", "nc", "download"}  # data.yaml keys a split name would overwrite


def coco_to_yolo(splits: dict, out) -> Path:
    """Write ``out/images/<split>/``, ``out/labels/<split>/<stem>.txt`` (one ``class cx cy w h`` line
    per box, normalised, class = the category's rank in id order) and ``out/data.yaml``.

    ``splits``: split name ("train", "val", ...) -> (COCO json path, image folder). Every split must
    have the same categories. Crowd boxes are left out; boxes are clipped to their image and the ones
    training cannot use (not finite, empty, outside) dropped, as fgd's COCO reader does. Each image
    is decoded: an unreadable one, or one whose size is not the json's, is a BadImageError naming
    it. Images are hard-linked where possible, else copied. Returns the path of data.yaml.

    The inputs are never touched: an input inside the export's images/ or labels/ (or an ``out``
    inside an input folder) is refused. The export is written beside the previous one and replaces
    it only when complete, so a failure (a full disk) leaves the previous export as it was."""
    if not isinstance(splits, dict) or "train" not in splits or "val" not in splits:
        got = sorted(map(str, splits)) if isinstance(splits, dict) else type(splits).__name__
        raise ValueError(f"coco_to_yolo: splits needs 'train' and 'val', got {got}")
    for split in splits:  # a folder name under images/ and labels/, and a key of data.yaml
        if not (isinstance(split, str) and re.fullmatch(r"\w[\w-]*", split, re.ASCII) and split not in _RESERVED):
            raise ValueError(f"coco_to_yolo: split name {split!r} must be a plain name (letters, digits, _ and -), "
                             f"not one of {sorted(_RESERVED)}")
    out = Path(out)
    _check_apart(splits, out)
    loaded, names = {}, None
    for split, (ann_file, image_dir) in splits.items():  # every json read before anything is written
        data = load_coco_json(str(ann_file))
        split_names = coco_class_names(data)[1:]
        if names is not None and split_names != names:
            raise ValueError(f"coco_to_yolo: {ann_file} has categories {split_names}, the other splits {names}")
        names, loaded[split] = split_names, data

    try:
        out.mkdir(parents=True, exist_ok=True)
        new = out / _NEW
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
    except OSError as e:
        raise OSError(f"coco_to_yolo: cannot write in {out}: {e.strerror or e}") from None
    try:
        for split, (ann_file, image_dir) in splits.items():
            _write_split(loaded[split], ann_file, Path(image_dir), new, split)
        text = yaml.safe_dump({"path": str(out.resolve()), **{s: f"images/{s}" for s in splits},
                               "names": dict(enumerate(names))}, sort_keys=False, allow_unicode=True)
        write_atomic(new / "data.yaml", text)
        _swap_in(new, out, list(splits))
    except FileNotFoundError:
        raise  # a missing image: the message names it
    except OSError as e:  # a full disk, a file too large: one line, the previous export kept
        what = f"{e.filename}: {write_error(e)}" if e.filename else write_error(e)
        raise OSError(f"coco_to_yolo: could not write the export in {out} ({what}); the previous export, if "
                      "any, is as it was") from None
    finally:
        shutil.rmtree(new, ignore_errors=True)  # the export not swapped in (after a swap: nothing)
    return out / "data.yaml"


def _check_apart(splits: dict, out: Path) -> None:
    """ValueError unless the inputs and the export are apart: replacing images/<split>, labels/<split>
    or data.yaml must never remove an input, and an export inside an image folder would be read
    back as images."""
    real = os.path.realpath
    out_real = real(out)
    outputs = [real(out / d / s) for d in ("images", "labels") for s in splits] + [real(out / "data.yaml")]
    outputs += [real(out / _NEW), real(out / _OLD)]

    def within(path, folder):
        return os.path.commonpath([path, folder]) == folder

    for split, (ann_file, image_dir) in splits.items():
        for flag, path in (("json", ann_file), ("image folder", image_dir)):
            p = real(path)
            hit = next((o for o in outputs if within(p, o) or within(o, p)), None)
            if hit is not None or (flag == "image folder" and within(out_real, p)):
                raise ValueError(f"coco_to_yolo: the {split} {flag} {path} and the export {out} overlap (the export "
                                 f"writes {hit or out}); export to a folder apart from the inputs")


def _write_split(data: dict, ann_file, image_dir: Path, new: Path, split: str) -> None:
    rank = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    boxes = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        if not a["iscrowd"]:
            boxes[a["image_id"]].append(a)
    img_out, lab_out = new / "images" / split, new / "labels" / split
    img_out.mkdir(parents=True)
    lab_out.mkdir(parents=True)
    stems = {}
    for im in data["images"]:
        src, name = image_dir / im["file_name"], Path(im["file_name"]).name
        # YOLO finds an image's labels by its stem: a.png and a.jpg (or x/a.png and y/a.png) would
        # share labels/a.txt and one image's boxes would be lost
        stem = Path(name).stem
        if stem in stems:
            raise ValueError(f"coco_to_yolo: {ann_file}: images {stems[stem]!r} and {im['file_name']!r} would share "
                             f"the label file {stem}.txt (YOLO finds labels by file stem); rename one")
        stems[stem] = im["file_name"]
        if not os.path.lexists(src):
            raise FileNotFoundError(f"coco_to_yolo: {ann_file}: image {src} does not exist")
        height, width = decode_image(src, _GO_ON).shape[:2]
        W, H = im["width"], im["height"]
        if (width, height) != (W, H):  # labels are normalised by the size: the json's would misplace them
            raise bad_image(src, f"the image is {width}x{height} but {ann_file} says {W}x{H} (image id {im['id']})",
                            _GO_ON)
        lines = []
        for a in boxes[im["id"]]:
            box, _ = usable_box(a, W, H)
            if box is not None:
                x1, y1, x2, y2 = box
                lines.append(f"{rank[a['category_id']]} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} "
                             f"{(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}\n")
        try:
            os.link(src, img_out / name)
        except OSError:
            shutil.copy2(src, img_out / name)
        try:
            (lab_out / f"{stem}.txt").write_text("".join(lines))
        except OSError as e:  # a write error does not say which file: the message should
            e.filename = e.filename or f"labels/{split}/{stem}.txt"
            raise


def _swap_in(new: Path, out: Path, splits: list) -> None:
    """Moves the complete export in ``new`` into ``out``: each images/<split>, labels/<split> and
    data.yaml of a previous export waits in ``out/_OLD`` until all are in, then is removed; a failed
    move puts the previous ones back. Nothing else in ``out`` is touched."""
    parts = [Path(d) / s for d in ("images", "labels") for s in splits] + [Path("data.yaml")]
    old = out / _OLD
    shutil.rmtree(old, ignore_errors=True)
    moved = []  # (part, had a previous one)
    try:
        for part in parts:
            (out / part).parent.mkdir(parents=True, exist_ok=True)
            (old / part).parent.mkdir(parents=True, exist_ok=True)
            had = os.path.lexists(out / part)
            if had:
                os.replace(out / part, old / part)
            moved.append((part, had))
            os.replace(new / part, out / part)
    except OSError:
        for part, had in reversed(moved):  # back as it was
            with contextlib.suppress(OSError):
                if os.path.lexists(out / part):
                    os.replace(out / part, new / part)
                if had:
                    os.replace(old / part, out / part)
        raise
    shutil.rmtree(old, ignore_errors=True)
