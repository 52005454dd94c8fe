"""A synthetic detection data set in COCO format: filled squares, circles and triangles on noisy,
cluttered backgrounds. It is deterministic by seed and needs no download, so the demo and the tests
can train and evaluate a real detector anywhere."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["make_shapes_dataset", "CATEGORIES"]

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"}]
_VERSION = 1  # part of the cache key: bump it when the drawing changes so old data is regenerated
_MIN_SIZE = 8  # px
# COCO's "large" starts at 96^2 px of box area, i.e. 75 % of a 128 px side, so the largest objects
# must exceed that for all three COCO size ranges to occur at 128 px.
_MAX_REL_SIZE = 0.85
_MAX_COVERED = 0.7  # an object hidden more than this by later ones is no longer annotated
_CUT_PROB = 0.1  # objects placed so that they may stick out of the image
_MIN_CONTRAST = 120.0  # Euclidean RGB distance between an object and the background
_NOISE = 10  # +- uniform per-channel pixel noise


def make_shapes_dataset(root, num_images: int, image_size: int = 128, seed: int = 0, split: str = "train",
                        max_objects: int = 6, empty_fraction: float = 0.1) -> tuple[str, str]:
    """Writes ``root/<split>/images/000000.png ...`` and ``root/<split>/annotations.json`` (COCO
    format, categories 1 square, 2 circle, 3 triangle) and returns ``(annotation_json, image_dir)``.

    The same arguments give byte-identical files; ``split`` is mixed into the seed so that "train"
    and "val" differ. Each image draws its own generator, so the first N images do not depend on
    ``num_images``. If the json already holds the same parameters, nothing is regenerated.
    """
    _check_int(num_images, "num_images", 0)
    _check_int(image_size, "image_size", 2 * _MIN_SIZE)
    _check_int(seed, "seed", 0)
    _check_int(max_objects, "max_objects", 0)
    if not isinstance(split, str) or not split or os.sep in split or split in (".", ".."):
        raise ValueError(f"make_shapes_dataset: split must be a plain folder name, got {split!r}")
    if isinstance(empty_fraction, bool) or not isinstance(empty_fraction, (int, float)) \
            or not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"make_shapes_dataset: empty_fraction must be in [0, 1], got {empty_fraction!r}")

    out = Path(root) / split
    image_dir, ann_path = out / "images", out / "annotations.json"
    params = {"version": _VERSION, "num_images": num_images, "image_size": image_size, "seed": seed,
              "split": split, "max_objects": max_objects, "empty_fraction": float(empty_fraction)}
    if _cached(ann_path, image_dir, params):
        return str(ann_path), str(image_dir)

    image_dir.mkdir(parents=True, exist_ok=True)
    split_key = zlib.crc32(split.encode())
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_key, i])
        picture, objects = _draw_image(rng, image_size, max_objects, empty_fraction)
        file_name = f"{i:06d}.png"
        picture.save(image_dir / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for cat, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})

    data = {"images": images, "annotations": annotations, "categories": CATEGORIES, "fgd_shapes": params}
    # the json is written last and atomically: its presence marks a complete data set for the cache
    tmp = ann_path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, ann_path)
    return str(ann_path), str(image_dir)


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"make_shapes_dataset: {name} must be an integer >= {low}, got {value!r}")


def _cached(ann_path: Path, image_dir: Path, params: dict) -> bool:
    try:
        with open(ann_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and data.get("fgd_shapes") == params
            and all((image_dir / im["file_name"]).exists() for im in data.get("images", [])))


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> tuple:
    for _ in range(64):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - background) >= _MIN_CONTRAST:
            return tuple(int(c) for c in colour)
    return tuple(int(255 - c) for c in background)  # rare (mid-grey background): the complement


def _shape(draw: ImageDraw.ImageDraw, cat: int, x: int, y: int, size: int, fill) -> None:
    # PIL coordinates are inclusive, so the shape covers pixels x .. x + size - 1
    x1, y1 = x + size - 1, y + size - 1
    if cat == 1:
        draw.rectangle([x, y, x1, y1], fill=fill)
    elif cat == 2:
        draw.ellipse([x, y, x1, y1], fill=fill)
    else:
        draw.polygon([(x, y1), (x1, y1), ((x + x1) / 2, y)], fill=fill)


def _draw_image(rng: np.random.Generator, s: int, max_objects: int, empty_fraction: float):
    """One picture and its annotations [(category_id, [x, y, w, h]), ...]."""
    background = rng.integers(0, 256, 3)
    picture = Image.new("RGB", (s, s), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(picture)

    # unannotated clutter under the objects: a detector must learn to ignore thin lines and specks
    for _ in range(int(rng.integers(1, 6))):
        draw.line([tuple(int(v) for v in rng.integers(0, s, 2)), tuple(int(v) for v in rng.integers(0, s, 2))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    for _ in range(int(rng.integers(1, 7))):
        cx, cy = (int(v) for v in rng.integers(0, s, 2))
        r = int(rng.integers(1, 4))  # diameter < _MIN_SIZE, so no speck looks like an object
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))

    n = 0 if rng.random() < empty_fraction or max_objects == 0 else int(rng.integers(1, max_objects + 1))
    owner = np.zeros((s, s), np.int16)  # which object is on top at each pixel (0: none)
    placed = []  # (category, own mask pixel count, box)
    log_lo, log_hi = np.log(_MIN_SIZE), np.log(_MAX_REL_SIZE * s)
    for k in range(1, n + 1):
        cat = int(rng.integers(1, 4))
        size = int(np.exp(rng.uniform(log_lo, log_hi)))  # log-uniform: as many small as large objects
        if rng.random() < _CUT_PROB:
            x, y = (int(v) for v in rng.integers(-(size // 2), s - size // 2, 2))
        else:
            x, y = (int(v) for v in rng.integers(0, s - size + 1, 2))
        mask_img = Image.new("L", (s, s), 0)
        _shape(ImageDraw.Draw(mask_img), cat, x, y, size, 1)
        mask = np.asarray(mask_img, dtype=bool)
        # the box is the drawn extent, which clips it to the image for free
        cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
        if cols.size == 0:
            continue
        _shape(draw, cat, x, y, size, _contrasting(rng, background))
        owner[mask] = k
        box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        placed.append((k, cat, int(mask.sum()), box))

    visible = np.bincount(owner.ravel(), minlength=n + 1)
    objects = [(cat, box) for k, cat, own, box in placed if visible[k] >= (1 - _MAX_COVERED) * own]

    noisy = np.asarray(picture, dtype=np.int16) + rng.integers(-_NOISE, _NOISE + 1, (s, s, 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)), objects
