"""COCO-format detection data for torchvision detectors: the reader (``CocoDetection``), the
loading and checking of a COCO json, and ``collate_fn``, which batches the reader's samples."""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import logging
import math
import os
import stat
from numbers import Real

import numpy as np
import torch
from PIL import Image

__all__ = ["CocoDetection", "BadImageError", "collate_fn", "load_coco_json", "coco_class_names"]

log = logging.getLogger("fgd.data")

# what every BadImageError tells the user to do next
_GO_ON = "fix or remove the file (a missing file is skipped), then rerun; fgd train --resume continues"


class BadImageError(ValueError):
    """An image file that cannot be used: not decodable (truncated, not an image, not a regular
    file) or of another size than its annotations say. The message is one line starting with the
    file's path, then what is wrong and how to go on."""

    def one_line(self) -> str:
        """That line, also when a DataLoader worker re-raised the error with its traceback as text
        (whose last line is "fgd.data.coco.BadImageError: <the line>")."""
        lines = str(self).strip().splitlines() or [""]
        return lines[-1].split("BadImageError: ", 1)[-1] if len(lines) > 1 else lines[0]


def bad_image(path, what: str, go_on: str = _GO_ON) -> BadImageError:
    """The BadImageError for ``path``: one line, however many lines ``what`` (e.g. PIL's text) has."""
    return BadImageError(f"{path}: {' '.join(what.split())}; {go_on}")


def decode_image(path, go_on: str = _GO_ON) -> np.ndarray:
    """The pixels of the image file ``path``, uint8 [H, W, 3] RGB, decoded in full (a truncated
    file is found now); BadImageError naming it otherwise. A FIFO or device is never opened (that
    could block)."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        raise bad_image(path, f"cannot be read ({e.strerror or e})", go_on) from None
    if not regular:
        raise bad_image(path, "is not a regular file", go_on)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for a broken file
        raise bad_image(path, f"cannot be decoded as an image ({e})", go_on) from None


def inside(name: str) -> bool:
    """Whether the relative path ``name`` (a file_name, a VOC id or <filename>) names something
    inside the folder it is joined to: not "", not the folder itself, not absolute, no way out with
    "..". Links inside the folder are the folder owner's choice and are followed."""
    if not name or "\0" in name or os.path.isabs(name):
        return False
    norm = os.path.normpath(name)
    return norm not in (".", "..") and not norm.startswith(".." + os.sep)


def check_regular_file(path, what: str) -> None:
    """ValueError ("<what> <path> ...") unless ``path`` is a regular file: opening a FIFO blocks
    until someone writes to it, and a folder or device is no annotation file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise ValueError(f"{what} {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is not a regular file (a FIFO, socket or device)")


class CocoDetection(torch.utils.data.Dataset):
    """Images and boxes of a COCO json, as torchvision detectors take them.

    ``dataset[i]`` is ``(image, target)``: image float32 [3, H, W] in [0, 1]; target ``boxes``
    float32 [n, 4] (x1, y1, x2, y2), ``labels`` int64 [n] in 1..K (0 is the background),
    ``image_id`` (the COCO id), ``area`` float32 [n], ``iscrowd`` int64 [n] (zeros: crowd regions
    are left out), ``orig_size`` (H, W). ``transforms(image, target, index)`` runs last.

    Boxes are clipped to the image (in the targets and in ``coco``, which evaluation reads); unusable
    ones are dropped from both and counted in ``skipped``. Images whose file is missing are dropped
    too (``on_bad="skip"``) or raise (``on_bad="error"``).
    """

    def __init__(self, image_dir, ann_file, transforms=None, on_bad: str = "skip", name=None):
        """``ann_file``: the path of a COCO json, or an already-built COCO dict (copied, then checked
        as a file would be). ``name`` is what messages call the annotations (default: the path, or
        "COCO annotations" for a dict)."""
        if on_bad not in ("skip", "error"):
            raise ValueError(f"CocoDetection: on_bad must be 'skip' or 'error', got {on_bad!r}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"CocoDetection: image_dir {image_dir} is not a directory")
        self.image_dir, self.transforms = str(image_dir), transforms
        if isinstance(ann_file, dict):
            # a copy: the checks fill in defaults and evaluation drops unusable boxes, which must
            # not change the caller's dict
            self.ann_file = str(name) if name is not None else "COCO annotations"
            data = _check_coco(copy.deepcopy(ann_file), self.ann_file)
        else:
            self.ann_file = str(ann_file) if name is None else str(name)
            data = load_coco_json(str(ann_file))

        from pycocotools.coco import COCO

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()

        cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat_id = {i: c for c, i in self.cat_id_to_label.items()}
        self.class_names = coco_class_names(data)
        self.num_classes = len(cat_ids) + 1

        self.skipped = collections.Counter()
        self.ids, self._files, self._targets = [], [], []
        missing, dropped_ids = [], []
        for img in data["images"]:
            path = os.path.join(self.image_dir, img["file_name"])
            if not os.path.exists(path):
                if on_bad == "error":
                    raise FileNotFoundError(f"{self.ann_file}: image {img['id']} has no file {path}")
                missing.append(path)
                continue
            self.ids.append(img["id"])
            self._files.append(path)
            self._targets.append(self._boxes(img, dropped_ids))
        if dropped_ids:
            # COCOeval reads coco.dataset, not our targets: a ground truth training cannot use (no
            # finite box, empty, outside the image) would stay there as one no detection can match
            drop = set(dropped_ids)
            data["annotations"] = [a for a in data["annotations"] if a["id"] not in drop]
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco.createIndex()
        if missing:
            self.skipped["missing_image"] = len(missing)
            log.warning("%s: %d of %d images have no file under %s and are skipped (first: %s)",
                        self.ann_file, len(missing), len(data["images"]), self.image_dir, ", ".join(missing[:3]))
        dropped = {k: v for k, v in self.skipped.items() if k != "missing_image"}
        if dropped:
            log.warning("%s: dropped %d annotations from training and evaluation (%s)", self.ann_file,
                        sum(dropped.values()), ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())))

    def _boxes(self, img: dict, dropped_ids: list) -> tuple:
        """(boxes [n, 4] xyxy, labels [n], area [n]) of one image, as numpy arrays; the ids of the
        annotations it cannot use are appended to ``dropped_ids``."""
        w_img, h_img = img["width"], img["height"]
        boxes, labels, areas = [], [], []
        for ann in self.coco.imgToAnns.get(img["id"], []):
            if ann["iscrowd"]:
                continue  # crowd regions are for evaluation (ignored matches), not training targets
            box, reason = usable_box(ann, w_img, h_img)
            if box is None:
                self.skipped[reason] += 1
                dropped_ids.append(ann["id"])
                continue
            x1, y1, x2, y2 = box
            if [x1, y1, x2 - x1, y2 - y1] != list(ann["bbox"]):
                # COCOeval reads coco.dataset: it scores the box training (and any detector, which
                # clips its output to the image) sees, not the part outside the image
                ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            boxes.append(box)
            labels.append(self.cat_id_to_label[ann["category_id"]])
            areas.append(ann["area"])
        return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                np.asarray(areas, np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        path = self._files[index]
        pixels = decode_image(path)
        h, w = pixels.shape[:2]
        info = self.coco.imgs[self.ids[index]]
        if (h, w) != (info["height"], info["width"]):
            # boxes were clipped to the json's size; a different file would misplace them
            raise bad_image(path, f"the image is {w}x{h} but {self.ann_file} says {info['width']}x{info['height']} "
                                  f"(image id {self.ids[index]})")
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().float().div_(255)
        boxes, labels, area = self._targets[index]
        target = {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy()),
                  "image_id": self.ids[index], "area": torch.from_numpy(area.copy()),
                  "iscrowd": torch.zeros(len(labels), dtype=torch.int64), "orig_size": (h, w)}
        if self.transforms is not None:
            image, target = self.transforms(image, target, index)
        return image, target


def usable_box(ann: dict, w_img, h_img):
    """``(box, None)`` with ``box`` the annotation's (x1, y1, x2, y2) clipped to the image, or
    ``(None, reason)`` for one training cannot use (the YOLO export drops the same ones)."""
    x, y, w, h = ann["bbox"]
    x1, y1 = min(max(x, 0.0), w_img), min(max(y, 0.0), h_img)
    x2, y2 = min(max(x + w, 0.0), w_img), min(max(y + h, 0.0), h_img)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        return None, "bad_box"
    if w == 0 or h == 0:
        return None, "zero_size_box"
    if x2 <= x1 or y2 <= y1:
        return None, "box_outside_image"
    if not math.isfinite(ann["area"]) or ann["area"] < 0:
        return None, "bad_area"  # COCOeval's size ranges read it: NaN is in all of them, < 0 in none
    return (x1, y1, x2, y2), None


def collate_fn(batch):
    """Detectors take lists (images differ in size): [(image, target), ...] -> (images, targets)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def load_coco_json(path: str) -> dict:
    """The parsed json, checked by ``_check_coco``; ValueError naming the file."""
    check_regular_file(path, "COCO annotation file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"COCO annotation file {path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"COCO annotation file {path} cannot be read: {e}") from None
    except RecursionError:
        raise ValueError(f"COCO annotation file {path} is not a COCO json: it nests too deeply to read") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts (sys.int_info)
        raise ValueError(f"COCO annotation file {path} cannot be read: {e}") from None
    return _check_coco(data, f"COCO annotation file {path}")


def _check_coco(data, name: str) -> dict:
    """``data`` (a parsed COCO dict), checked enough that every later access is safe, with the
    ``area`` / ``iscrowd`` defaults filled in; ValueError starting with ``name``."""

    def bad(what):
        return ValueError(f"{name}: {what}")

    if not isinstance(data, dict):
        raise bad(f"the top level must be an object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise bad(f"missing key(s) {', '.join(repr(k) for k in missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise bad(f"{key!r} must be a list, got {type(data[key]).__name__}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, Real) and not isinstance(v, bool)

    cats, images, files = set(), set(), {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not is_int(c.get("id")):
            raise bad(f"categories[{i}] must be an object with an integer 'id'")
        if c["id"] in cats:
            raise bad(f"category id {c['id']} appears twice")
        cats.add(c["id"])
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise bad(f"images[{i}] must be an object with an integer 'id' and a string 'file_name'")
        if not (is_num(im.get("width")) and is_num(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            raise bad(f"images[{i}] (id {im['id']}) needs positive numbers 'width' and 'height'")
        if im["id"] in images:
            raise bad(f"image id {im['id']} appears twice")
        images.add(im["id"])
        if not inside(im["file_name"]):
            raise bad(f"images[{i}] (id {im['id']}): file_name {im['file_name']!r} is not a file inside the "
                      "image folder (empty, absolute or leaving it with '..')")
        # two ids for one file: the image is evaluated twice, each copy's boxes missed in the other
        # (perfect detections score below AP 1.0), and trained on twice with half its boxes each
        key = os.path.normpath(im["file_name"])
        if key in files:
            j, other = files[key]
            raise bad(f"images[{j}] (id {other['id']}, {other['file_name']!r}) and images[{i}] (id {im['id']}, "
                      f"{im['file_name']!r}) name one file; give each image one entry")
        files[key] = (i, im)
    anns = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not all(is_int(a.get(k)) for k in ("id", "image_id", "category_id")):
            raise bad(f"annotations[{i}] must be an object with integers 'id', 'image_id', 'category_id'")
        # COCOeval indexes ground truths by id and records a match as the matched id, 0 meaning "none":
        # with a repeated id or an id 0, perfect detections score below AP 1.0
        if a["id"] == 0:
            raise bad(f"annotations[{i}] has id 0, which pycocotools reads as 'no match'; use ids >= 1")
        if a["id"] in anns:
            raise bad(f"annotation id {a['id']} appears twice (annotations[{i}])")
        anns.add(a["id"])
        box = a.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(is_num(v) for v in box):
            raise bad(f"annotations[{i}] (id {a['id']}): 'bbox' must be a list of 4 numbers, got {box!r}")
        # COCOeval reads both of these from every ground truth (KeyError if absent): default as training does
        a.setdefault("iscrowd", 0)
        a.setdefault("area", box[2] * box[3])
        if not (is_int(a["iscrowd"]) and a["iscrowd"] in (0, 1)):
            raise bad(f"annotations[{i}] (id {a['id']}): 'iscrowd' must be 0 or 1, got {a['iscrowd']!r}")
        if not is_num(a["area"]):
            raise bad(f"annotations[{i}] (id {a['id']}): 'area' must be a number, got {a['area']!r}")
        if a["image_id"] not in images:
            raise bad(f"annotations[{i}] (id {a['id']}) refers to image {a['image_id']}, which is not in 'images'")
        if a["category_id"] not in cats:
            raise bad(f"annotations[{i}] (id {a['id']}) has category {a['category_id']}, "
                      f"which is not in 'categories'")
    return data


def coco_class_names(data: dict) -> list:
    """Label -> name of a checked json: "__background__", then the categories in id order."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return ["__background__"] + [str(c.get("name", c["id"])) for c in cats]
