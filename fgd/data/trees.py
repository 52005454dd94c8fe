"""A small real detection data set: tree crowns in aerial images, from the example data that the
``deepforest`` package ships (Pascal VOC XML beside the images), cut into tiles.

``make_tree_tiles`` writes ``out/train`` and ``out/val``, each a flat folder of PNG tiles with a VOC
XML beside each (read them with ``VocDetection(out/"train", out/"train")``). The split is by image
*region*: the right ``val_fraction`` of every source image is validation, the rest training, and
no tile crosses the boundary, so no source pixel is in both. Each tile's XML records where it was
cut from in ``<source><image>`` and ``<source><crop>`` (x, y, width, height in source pixels).

Only deepforest's data files are read; deepforest itself is never imported (``pip install
--no-deps deepforest`` is enough).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image

from .voc import to_voc, voc_to_coco

__all__ = ["find_deepforest_data", "make_tree_tiles"]

_VERSION = 1  # part of the cache key: bump it when the tiling or the XML changes
_MIN_INSIDE = 0.5  # a box belongs to a tile when at least this share of its area lies inside
_MANIFEST = "tiles.json"
_SPLITS = ("train", "val")


def find_deepforest_data() -> Path:
    """The folder of deepforest's example images and VOC XML; FileNotFoundError saying how to get it."""
    spec = importlib.util.find_spec("deepforest")  # finds the package without importing it
    if spec is None or not spec.origin:
        raise FileNotFoundError("the tree data comes with the deepforest package, which is not installed: "
                                "`pip install --no-deps deepforest` (fgd reads its data files only)")
    data = Path(spec.origin).parent / "data"
    if not data.is_dir() or not any(data.glob("*.xml")):
        raise FileNotFoundError(f"deepforest is installed but {data} holds no Pascal VOC XML files: "
                                "reinstall it with `pip install --no-deps --force-reinstall deepforest`")
    return data


def make_tree_tiles(out, tile: int = 200, val_fraction: float = 0.25, source=None) -> dict:
    """Cuts the VOC-annotated images of ``source`` (default: ``find_deepforest_data()``) into
    ``tile`` x ``tile`` px tiles under ``out/train`` and ``out/val``; returns a summary
    ``{"train": {"dir", "tiles", "boxes", "classes": {name: boxes}}, "val": {...}, "sources":
    [{"image", "width", "height", "val_from_x"}], "skipped": {...}, "params": {...}}``.

    Tiles step by ``tile`` px; the last row and column of a region are shifted back to end at its
    edge (overlapping their neighbour), and a region narrower than a tile gets narrower tiles. In
    each source image the validation band is the right ``val_fraction`` of the width, rounded to
    whole tiles while both bands keep at least one full tile. A box goes to every tile that holds at
    least half its area, clipped to the tile (VOC ``<truncated>1</truncated>`` when cut).

    The same arguments and sources give byte-identical files; if ``out`` already holds them (its
    ``tiles.json`` records the arguments), nothing is written again. Files of an earlier call with
    other arguments are removed first; other files in ``out/train`` and ``out/val`` are an error.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 8:
        raise ValueError(f"make_tree_tiles: tile must be an integer >= 8 (pixels), got {tile!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"make_tree_tiles: val_fraction must be a number in (0, 1), got {val_fraction!r}")
    source = Path(source) if source is not None else find_deepforest_data()
    out = Path(out)

    coco, skipped = voc_to_coco(source, source)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    params = {"version": _VERSION, "tile": tile, "val_fraction": float(val_fraction),
              # the sources by name and size: a changed data set is regenerated
              "sources": [[im["file_name"], (source / im["file_name"]).stat().st_size] for im in coco["images"]]}

    manifest = _read_manifest(out)
    if manifest and manifest.get("complete") and manifest.get("params") == params \
            and all((out / f).is_file() for f in manifest.get("files", [])):
        return _with_dirs(manifest["summary"], out)
    _clear(out, manifest)

    # plan every tile first: the manifest lists the files before any is written, so a run killed
    # half-way leaves files the next call knows to remove
    plans = []
    for im in coco["images"]:
        val_x = im["width"] - _val_width(im["width"], tile, val_fraction)
        rows = _spans(0, im["height"], tile)
        regions = (("train", 0, val_x), ("val", val_x, im["width"]))
        tiles = [(split, x, y, w, h) for split, lo, hi in regions if hi > lo
                 for x, w in _spans(lo, hi, tile) for y, h in rows]
        plans.append((im, val_x, tiles))
    stem = {im["id"]: Path(im["file_name"]).stem for im in coco["images"]}
    files = [f"{split}/{stem[im['id']]}_x{x:05d}_y{y:05d}.{ext}"
             for im, _, tiles in plans for split, x, y, _, _ in tiles for ext in ("png", "xml")]
    for split in _SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    _write_manifest(out, {"params": params, "complete": False, "files": files})

    boxes_of = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        boxes_of[a["image_id"]].append((names[a["category_id"]], a["difficult"], (x, y, x + w, y + h)))

    summary = {split: {"tiles": 0, "boxes": 0, "classes": {}} for split in _SPLITS}
    summary.update(sources=[], skipped=dict(sorted(skipped.items())), params=params)
    for im, val_x, tiles in plans:
        picture = _decode(source, im)
        summary["sources"].append({"image": im["file_name"], "width": im["width"], "height": im["height"],
                                   "val_from_x": val_x})
        for split, x, y, w, h in tiles:
            name = f"{stem[im['id']]}_x{x:05d}_y{y:05d}"
            objects = _boxes_in(boxes_of[im["id"]], x, y, w, h)
            # PIL writes no time stamp into a PNG: the same pixels give the same bytes
            picture.crop((x, y, x + w, y + h)).save(out / split / f"{name}.png", format="PNG")
            (out / split / f"{name}.xml").write_text(
                _tile_xml(split, f"{name}.png", im["file_name"], (x, y, w, h), objects), encoding="utf-8")
            s = summary[split]
            s["tiles"] += 1
            s["boxes"] += len(objects)
            for obj in objects:
                s["classes"][obj[0]] = s["classes"].get(obj[0], 0) + 1
    for split in _SPLITS:
        summary[split]["classes"] = dict(sorted(summary[split]["classes"].items()))
    _write_manifest(out, {"params": params, "complete": True, "files": files, "summary": summary})
    return _with_dirs(summary, out)


# ---- the grid ---------------------------------------------------------------------------------

def _val_width(width: int, tile: int, val_fraction: float) -> int:
    """Width of the validation band at the right of an image ``width`` px wide (0 below 2 px)."""
    if width < 2:
        return 0
    n = max(1, int(width * val_fraction / tile + 0.5))  # whole tiles, rounded half up
    n = min(n, (width - tile) // tile)  # ... leaving the training band at least one full tile
    if n >= 1:
        return n * tile
    # too narrow for a full tile on each side: the band in pixels, at least one on each side
    return min(max(int(width * val_fraction + 0.5), 1), width - 1)


def _spans(lo: int, hi: int, tile: int) -> list:
    """(start, size) of the tiles covering [lo, hi): stride ``tile``, the last shifted back to end
    at ``hi``; one narrower tile when the range is narrower than ``tile``."""
    size = min(tile, hi - lo)
    starts = list(range(lo, hi - size + 1, size))
    if starts[-1] + size < hi:
        starts.append(hi - size)
    return [(s, size) for s in starts]


def _boxes_in(boxes, x, y, w, h) -> list:
    """The boxes (name, difficult, xyxy) holding at least half their area in the tile, clipped to it
    and in tile coordinates, each with a flag saying whether clipping cut it."""
    kept = []
    for name, difficult, (x1, y1, x2, y2) in boxes:
        cx1, cy1, cx2, cy2 = max(x1, x), max(y1, y), min(x2, x + w), min(y2, y + h)
        if cx2 <= cx1 or cy2 <= cy1 or (cx2 - cx1) * (cy2 - cy1) < _MIN_INSIDE * (x2 - x1) * (y2 - y1):
            continue
        # the reader drops a box of VOC xmax <= xmin (less than 2 px here): never write one
        if cx2 - cx1 <= 1 or cy2 - cy1 <= 1:
            continue
        truncated = int((cx1, cy1, cx2, cy2) != (x1, y1, x2, y2))
        kept.append((name, difficult, truncated, (cx1 - x, cy1 - y, cx2 - x, cy2 - y)))
    return kept


# ---- files ------------------------------------------------------------------------------------

def _decode(source: Path, im: dict) -> Image.Image:
    """The RGB pixels of a source image. An image PIL cannot decode (deepforest's OSBS_029.xml names
    a .tif) is read from the PNG of the same name and size when there is one."""
    path = source / im["file_name"]
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except Exception as e:  # PIL raises several types for a file it cannot decode
        png = path.with_suffix(".png")
        if png != path and png.is_file():
            with Image.open(png) as f:
                if f.size == (im["width"], im["height"]):
                    return f.convert("RGB")
        raise ValueError(f"make_tree_tiles: cannot decode {path}: {e}") from None


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _tile_xml(split: str, filename: str, image: str, crop: tuple, objects: list) -> str:
    x, y, w, h = crop
    lines = ["<annotation>", f"\t<folder>{escape(split)}</folder>", f"\t<filename>{escape(filename)}</filename>",
             "\t<source>", "\t\t<database>DeepForest example data</database>",
             f"\t\t<image>{escape(image)}</image>",
             f"\t\t<crop><x>{x}</x><y>{y}</y><width>{w}</width><height>{h}</height></crop>",
             "\t</source>", f"\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
             "\t<segmented>0</segmented>"]
    for name, difficult, truncated, box in objects:
        xmin, ymin, xmax, ymax = (_num(v) for v in to_voc(*box))
        lines += ["\t<object>", f"\t\t<name>{escape(name)}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{truncated}</truncated>", f"\t\t<difficult>{difficult}</difficult>",
                  f"\t\t<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>",
                  "\t</object>"]
    return "\n".join(lines + ["</annotation>", ""])


def _read_manifest(out: Path):
    try:
        with open(out / _MANIFEST, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def _write_manifest(out: Path, data: dict) -> None:
    tmp = out / f".{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / _MANIFEST)  # atomic: a complete manifest or the previous one


def _clear(out: Path, manifest) -> None:
    """Removes the files an earlier call listed; refuses to mix tiles with files it did not write."""
    listed = set(manifest["files"]) if manifest else set()
    for name in listed:
        if "/" in name and name.split("/", 1)[0] in _SPLITS and ".." not in name:
            (out / name).unlink(missing_ok=True)
    for split in _SPLITS:
        folder = out / split
        foreign = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in (".png", ".xml")) \
            if folder.is_dir() else []
        if foreign:
            raise ValueError(f"make_tree_tiles: {folder} holds files make_tree_tiles did not write "
                             f"({', '.join(foreign[:3])}); give an empty or new folder as out")


def _with_dirs(summary: dict, out: Path) -> dict:
    summary = json.loads(json.dumps(summary))  # a copy
    for split in _SPLITS:
        summary[split]["dir"] = str(out / split)
    return summary
