"""COCO json -> an Ultralytics YOLO data set (images/, labels/, data.yaml), so that the same data
(fgd's shapes, a converted VOC set, any COCO json) trains under both frameworks."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .coco import coco_class_names, load_coco_json


def coco_to_yolo(splits: dict, out) -> Path:
    """Write ``out/images/<split>/``, ``out/labels/<split>/<stem>.txt`` (one ``class cx cy w h`` line
    per box, normalised, class = the category's rank in id order) and ``out/data.yaml``.

    ``splits``: split name ("train", "val", ...) -> (COCO json path, image folder). Every split must
    have the same categories. Crowd boxes are left out, boxes are clipped to their image and empty
    ones dropped, as fgd's COCO reader does; images are hard-linked where possible, else copied.
    Returns the path of data.yaml."""
    if "train" not in splits or "val" not in splits:
        raise ValueError(f"coco_to_yolo: splits needs 'train' and 'val', got {sorted(splits)}")
    out = Path(out)
    names = None
    for split, (ann_file, image_dir) in splits.items():
        data = load_coco_json(str(ann_file))
        split_names = coco_class_names(data)[1:]
        if names is not None and split_names != names:
            raise ValueError(f"coco_to_yolo: {ann_file} has categories {split_names}, the other splits {names}")
        names = split_names
        rank = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
        lines = {im["id"]: [] for im in data["images"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        for a in data["annotations"]:
            if a["iscrowd"]:
                continue
            W, H = sizes[a["image_id"]]
            x, y, w, h = a["bbox"]
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
            if x2 <= x1 or y2 <= y1:
                continue
            lines[a["image_id"]].append(f"{rank[a['category_id']]} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} "
                                        f"{(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}")
        img_out, lab_out = out / "images" / split, out / "labels" / split
        for d in (img_out, lab_out):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        seen = set()
        for im in data["images"]:
            src = Path(image_dir) / im["file_name"]
            name = Path(im["file_name"]).name
            if name in seen:
                raise ValueError(f"coco_to_yolo: {ann_file}: two images are named {name}; YOLO labels are "
                                 "found by file name")
            seen.add(name)
            if not src.is_file():
                raise FileNotFoundError(f"coco_to_yolo: {ann_file}: image {src} does not exist")
            try:
                os.link(src, img_out / name)
            except OSError:
                shutil.copy2(src, img_out / name)
            (lab_out / f"{Path(name).stem}.txt").write_text("".join(f"{l}\n" for l in lines[im["id"]]))
    yaml = out / "data.yaml"
    yaml.write_text(f"path: {out.resolve()}\n" + "".join(f"{s}: images/{s}\n" for s in splits)
                    + "names:\n" + "".join(f"  {i}: {n!r}\n" for i, n in enumerate(names)))
    return yaml
