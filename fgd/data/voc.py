"""Pascal VOC XML annotations -> a COCO-format dict, so every VOC-style data set (VOC itself, and
the many tools that write its XML) trains and evaluates through the COCO reader: ``VocDetection``
reads a VOC tree as a data set, ``convert_voc`` writes the COCO json.

Box convention: VOC's ``<bndbox>`` holds 1-based, inclusive pixel indices (a box covering only the
top-left pixel is xmin = ymin = xmax = ymax = 1). fgd's boxes, like COCO's and torchvision's, are
continuous coordinates with pixel i spanning [i, i + 1), 0-based. As detectron2 does, a VOC box
becomes x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax (and back: xmin = x1 + 1, ..., xmax = x2).

``difficult`` objects: VOC's evaluation counts them neither as misses nor, when detected, as false
positives. They are stored as ``"iscrowd": 1, "difficult": 1``: training leaves crowd boxes out of
its targets, COCOeval ignores crowd ground truths, and ``fgd.evaluate.coco_map`` matches
``difficult`` ones with the ordinary IoU (COCOeval's crowd IoU is meant for crowd regions).
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from ..files import write_atomic
from .coco import CocoDetection, check_regular_file, inside

__all__ = ["VocDetection", "voc_to_coco", "write_coco_json", "convert_voc"]

log = logging.getLogger("fgd.data")

_FIRST = 3  # how many names a warning lists


def voc_to_coco(annotations, images, split_file=None, classes=None):
    """Reads Pascal VOC XML files into a COCO dict; returns ``(coco_dict, skipped)``.

    ``annotations``: a VOC tree (a folder with an ``Annotations/`` subfolder, which is read) or any
    folder of ``*.xml`` files (they may sit beside their images). ``split_file``: a text file of
    image ids, the first word of each line (VOC's ``ImageSets/Main/*.txt``), naming the XML files
    to read; without it every ``*.xml`` is read, in sorted order.

    An XML's image is its ``<filename>`` under ``images``. Its width and height come from the
    image file's header; a ``<size>`` that disagrees is counted as ``size_mismatch``.

    ``classes`` (a list of names) fixes the categories, ids 1..K in that order; objects of other
    names are skipped. Without it the categories are the sorted names found in the files read.

    ``skipped`` (a ``collections.Counter``) counts what was left out: ``missing_image`` and
    ``unreadable_image`` (the whole XML), ``unknown_class``, ``bad_box`` (a missing or non-numeric
    coordinate, xmax <= xmin or ymax <= ymin), ``box_outside_image``; and ``size_mismatch``
    (kept, with the file's size). Boxes partly outside their image are clipped to it.

    Errors, each one line naming the file or argument: ValueError for XML that is not Pascal VOC
    (``<path>: not valid Pascal VOC XML (<reason>)``), for a folder without XML files and for a
    split file listing an id without an XML file; FileNotFoundError for a missing folder or file.
    """
    ann_dir = _annotation_folder(annotations)
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"voc_to_coco: images folder {image_dir} does not exist")
    names_given = _check_classes(classes)

    xml_paths = _listed_xml(ann_dir, split_file) if split_file is not None else _all_xml(ann_dir)
    parsed = [(path, _parse(path)) for path in xml_paths]
    _check_one_xml_per_image(parsed)
    names = names_given or sorted({obj[0] for _, voc in parsed for obj in voc["objects"]})
    cat_ids = {name: i + 1 for i, name in enumerate(names)}

    skipped = collections.Counter()
    missing, mismatched, unknown = [], [], collections.Counter()
    coco_images, coco_anns = [], []
    for path, voc in parsed:
        file = image_dir / voc["filename"]
        if not file.is_file():
            skipped["missing_image"] += 1
            missing.append(voc["filename"])
            continue
        try:
            with Image.open(file) as im:  # reads the header only: pixels are decoded on first access
                width, height = im.size
        except Exception as e:  # PIL raises several types for a file it cannot read
            skipped["unreadable_image"] += 1
            log.warning("%s: image %s cannot be read (%s); skipped", path, file, e)
            continue
        if voc["size"] is not None and voc["size"] != (width, height):
            skipped["size_mismatch"] += 1
            mismatched.append(f"{voc['filename']} ({voc['size'][0]}x{voc['size'][1]} in the XML, "
                              f"{width}x{height} in the file)")
        image_id = len(coco_images) + 1
        coco_images.append({"id": image_id, "file_name": voc["filename"], "width": width, "height": height})
        for name, difficult, box in voc["objects"]:
            if name not in cat_ids:
                skipped["unknown_class"] += 1
                unknown[name] += 1
                continue
            xyxy = _from_voc(box) if box is not None else None
            if xyxy is None:
                skipped["bad_box"] += 1
                continue
            x1, y1 = min(max(xyxy[0], 0.0), width), min(max(xyxy[1], 0.0), height)
            x2, y2 = min(max(xyxy[2], 0.0), width), min(max(xyxy[3], 0.0), height)
            if x2 <= x1 or y2 <= y1:
                skipped["box_outside_image"] += 1
                continue
            w, h = x2 - x1, y2 - y1
            coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id, "category_id": cat_ids[name],
                              "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": difficult,
                              "difficult": difficult})

    where = f"{ann_dir}" + (f" (split {split_file})" if split_file is not None else "")
    if missing:
        log.warning("%s: %d of %d XML files name an image that is not under %s and are skipped (first: %s)",
                    where, len(missing), len(parsed), image_dir, ", ".join(missing[:_FIRST]))
    if mismatched:
        log.warning("%s: %d images differ from their XML <size>; the file's size is used (first: %s)",
                    where, len(mismatched), "; ".join(mismatched[:_FIRST]))
    if unknown:
        log.warning("%s: %d objects of classes not in `classes` are skipped (%s)", where, sum(unknown.values()),
                    ", ".join(f"{n!r}: {c}" for n, c in sorted(unknown.items())))
    bad = {k: skipped[k] for k in ("bad_box", "box_outside_image") if skipped[k]}
    if bad:
        log.warning("%s: %d boxes skipped (%s)", where, sum(bad.values()),
                    ", ".join(f"{k}: {v}" for k, v in bad.items()))
    n_difficult = sum(a["difficult"] for a in coco_anns)
    log.info("%s: %d images, %d boxes (%d difficult), %d classes (%s); skipped: %s", where, len(coco_images),
             len(coco_anns), n_difficult, len(names), ", ".join(names),
             ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none")

    coco = {"images": coco_images, "annotations": coco_anns,
            "categories": [{"id": cat_ids[n], "name": n} for n in names]}
    return coco, skipped


def write_coco_json(coco_dict: dict, path) -> None:
    """Writes ``coco_dict`` to ``path`` atomically (``fgd.files.write_atomic``): the path holds
    either the old file or the complete new one, never a partial write; a failed write is one
    OSError / ValueError line naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"could not write {path}: cannot make its folder ({e.strerror or e})") from None
    try:  # NaN is not JSON: other readers would refuse it
        text = json.dumps(coco_dict, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"could not write {path}: {e}; nothing was replaced") from None
    write_atomic(path, text)


def convert_voc(annotations, images, out, split_file=None, classes=None) -> dict:
    """``voc_to_coco`` then ``write_coco_json(out)``; returns a summary: ``{"out", "images",
    "boxes", "difficult", "classes" (names in category-id order), "skipped" (counts)}``.

    An output never replaces an input: ValueError for an ``out`` inside the folder the XML files
    are read from, or that is the split file or one of the images."""
    ann_dir, real_out = _annotation_folder(annotations), os.path.realpath(out)
    if os.path.commonpath([real_out, os.path.realpath(ann_dir)]) == os.path.realpath(ann_dir):
        raise ValueError(f"convert_voc: out {out} is inside the annotations folder {ann_dir}, which is read; "
                         "write the json elsewhere")
    if split_file is not None and real_out == os.path.realpath(split_file):
        raise ValueError(f"convert_voc: out {out} is the split file; write the json elsewhere")
    coco, skipped = voc_to_coco(annotations, images, split_file=split_file, classes=classes)
    if any(real_out == os.path.realpath(Path(images) / im["file_name"]) for im in coco["images"]):
        raise ValueError(f"convert_voc: out {out} is one of the images; write the json elsewhere")
    write_coco_json(coco, out)
    return {"out": str(out), "images": len(coco["images"]), "boxes": len(coco["annotations"]),
            "difficult": sum(a["difficult"] for a in coco["annotations"]),
            "classes": [c["name"] for c in coco["categories"]], "skipped": dict(sorted(skipped.items()))}


class VocDetection(CocoDetection):
    """Pascal VOC XML annotations as a ``CocoDetection``: ``voc_to_coco`` reads them (see its
    docstring for the box convention, ``difficult`` objects and what is skipped), then the COCO
    reader takes the dict. ``skipped`` holds the counts of both."""

    def __init__(self, voc_dir, image_dir, split_file=None, classes=None, transforms=None):
        coco, skipped = voc_to_coco(voc_dir, image_dir, split_file=split_file, classes=classes)
        name = f"Pascal VOC annotations {voc_dir}" + (f" (split {split_file})" if split_file else "")
        super().__init__(image_dir, coco, transforms=transforms, name=name)
        self.skipped.update(skipped)  # adds: the reader dropped what CocoDetection never sees


# ---- the box convention -----------------------------------------------------------------------

def _from_voc(box):
    """VOC (xmin, ymin, xmax, ymax), 1-based inclusive -> continuous (x1, y1, x2, y2); None for a
    box that is not finite or not at least one pixel past its start (xmax <= xmin, ymax <= ymin)."""
    xmin, ymin, xmax, ymax = box
    if not all(math.isfinite(v) for v in box) or xmax <= xmin or ymax <= ymin:
        return None
    return xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)


def to_voc(x1, y1, x2, y2):
    """The inverse of ``_from_voc``: continuous (x1, y1, x2, y2) -> VOC (xmin, ymin, xmax, ymax)."""
    return x1 + 1, y1 + 1, x2, y2


# ---- reading ----------------------------------------------------------------------------------

def _annotation_folder(annotations) -> Path:
    """The folder the XML files are read from: ``annotations``, or its ``Annotations/`` subfolder."""
    ann_dir = Path(annotations)
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"voc_to_coco: annotations folder {ann_dir} does not exist")
    if (ann_dir / "Annotations").is_dir():  # the root of a VOC tree
        ann_dir = ann_dir / "Annotations"
    return ann_dir


def _check_one_xml_per_image(parsed) -> None:
    """ValueError naming both XML files when two name one image: it would become two images, each
    copy's boxes missed in the other (perfect detections score below AP 1.0)."""
    first = {}
    for path, voc in parsed:
        other = first.setdefault(os.path.normpath(voc["filename"]), path)
        if other != path:
            raise ValueError(f"voc_to_coco: {other} and {path} both annotate the image {voc['filename']}; "
                             "keep one XML file per image")


def _check_classes(classes):
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise ValueError(f"voc_to_coco: classes must be a list of class names, got {classes!r}")
    classes = list(classes)
    if not classes or not all(isinstance(c, str) and c.strip() == c and c for c in classes):
        raise ValueError(f"voc_to_coco: classes must be a non-empty list of non-empty names without "
                         f"surrounding spaces, got {classes!r}")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise ValueError(f"voc_to_coco: classes names {', '.join(map(repr, twice))} more than once")
    return classes


def _all_xml(ann_dir: Path) -> list:
    paths = sorted(p for p in ann_dir.iterdir() if p.suffix.lower() == ".xml" and p.is_file())
    if not paths:
        raise ValueError(f"voc_to_coco: no .xml files in {ann_dir}")
    return paths


def _listed_xml(ann_dir: Path, split_file) -> list:
    if not os.path.lexists(split_file):
        raise FileNotFoundError(f"voc_to_coco: split file {split_file} does not exist")
    check_regular_file(split_file, "voc_to_coco: split file")  # a FIFO would block the read
    try:
        lines = Path(split_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"voc_to_coco: split file {split_file} cannot be read: {e}") from None
    # VOC's per-class lists hold "id  1" / "id -1" lines: the id is the first word. An id listed
    # twice is read once (two images with one file would count its boxes twice in evaluation).
    ids = list(dict.fromkeys(line.split()[0] for line in lines if line.strip()))
    if not ids:
        raise ValueError(f"voc_to_coco: split file {split_file} lists no image ids")
    outside = [i for i in ids if not inside(f"{i}.xml")]
    if outside:  # an id is a name in the annotations folder, never a path out of it
        raise ValueError(f"voc_to_coco: split file {split_file}: ids {', '.join(map(repr, outside[:_FIRST]))} "
                         f"name files outside {ann_dir}")
    paths = [ann_dir / f"{i}.xml" for i in ids]
    absent = [i for i, p in zip(ids, paths) if not p.is_file()]
    if absent:
        raise ValueError(f"voc_to_coco: split file {split_file}: {len(absent)} listed ids have no XML file in "
                         f"{ann_dir} (first: {', '.join(absent[:_FIRST])})")
    return paths


def _parse(path: Path) -> dict:
    """One VOC XML file -> {"filename", "size": (w, h) or None, "objects": [(name, difficult 0/1,
    (xmin, ymin, xmax, ymax) floats or None when missing / not numeric)]}."""

    def bad(reason):
        return ValueError(f"{path}: not valid Pascal VOC XML ({reason})")

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise bad(str(e)) from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    if root.tag != "annotation":
        raise bad(f"the root element is <{root.tag}>, not <annotation>")
    filename = (root.findtext("filename") or "").strip()
    if not filename:
        raise bad("no <filename>")
    if not inside(filename):
        raise bad(f"<filename> {filename!r} is not a name under the image folder")

    size = None
    el = root.find("size")
    if el is not None:
        # a <size> of text that is not a number cannot agree with the file: it counts as a mismatch
        w, h = (_number(el.findtext(k)) for k in ("width", "height"))
        size = (_whole(w), _whole(h)) if w is not None and h is not None else ("?", "?")

    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise bad(f"<object> {k} has no <name>")
        text = (obj.findtext("difficult") or "0").strip()
        if text not in ("0", "1"):
            raise bad(f"<object> {k} ({name}): <difficult> must be 0 or 1, got {text!r}")
        el = obj.find("bndbox")
        box = None
        if el is not None:
            values = [_number(el.findtext(c)) for c in ("xmin", "ymin", "xmax", "ymax")]
            box = None if None in values else tuple(values)
        objects.append((name, int(text), box))
    return {"filename": filename, "size": size, "objects": objects}


def _number(text):
    """A float from an XML field, or None (missing, empty, not a number)."""
    try:
        return float(text.strip())
    except (AttributeError, ValueError):
        return None


def _whole(v: float):
    """400.0 -> 400 (for messages); other values as they are."""
    return int(v) if v.is_integer() else v
