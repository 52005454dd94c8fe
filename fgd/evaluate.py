"""COCO bbox mAP with pycocotools, and the results table the demo prints.

``coco_map`` returns COCOeval's summary as a dict. COCO reports ``-1`` for an area range with no
ground truth in the evaluated images (e.g. ``APl`` on a set of small objects only); that ``-1.0``
is kept as is, and ``format_table`` shows it as ``n/a``.
"""
import contextlib
import csv
import io
import math
from pathlib import Path

import torch

# COCOeval.stats, in order; the last three (ARs, ARm, ARl) are not returned.
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
DEFAULT_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "img/s")
MISSING, NOT_APPLICABLE = "–", "n/a"


def _results(detections, label_to_cat_id, known_image_ids):
    """Detections (xyxy tensors, contiguous labels) -> COCO result dicts (xywh, category ids)."""
    results, image_ids = [], []
    for i, det in enumerate(detections):
        for key in ("image_id", "boxes", "scores", "labels"):
            if key not in det:
                raise ValueError(f"coco_map: detections[{i}] has no {key!r}")
        image_id = int(det["image_id"])
        if image_id not in known_image_ids:
            # loadRes would only fail later with a bare AssertionError
            raise ValueError(f"coco_map: detections[{i}] has image_id {image_id}, which coco_gt does not know")
        image_ids.append(image_id)
        boxes = torch.as_tensor(det["boxes"]).detach().cpu().double().reshape(-1, 4)
        scores = torch.as_tensor(det["scores"]).detach().cpu().double().reshape(-1)
        labels = torch.as_tensor(det["labels"]).detach().cpu().reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"coco_map: detections[{i}] has {len(boxes)} boxes, {len(scores)} scores "
                             f"and {len(labels)} labels; they must match")
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            if label not in label_to_cat_id:
                raise ValueError(f"coco_map: label {label} in detections[{i}] is not in label_to_cat_id")
            results.append({"image_id": image_id, "category_id": int(label_to_cat_id[label]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results, sorted(set(image_ids))


def coco_map(coco_gt, detections, label_to_cat_id) -> dict:
    """COCOeval bbox summary of ``detections`` against ``coco_gt`` (a pycocotools ``COCO``).

    ``detections``: one dict per evaluated image, ``{"image_id", "boxes" [n, 4] xyxy in original
    image pixels, "scores" [n], "labels" [n] contiguous}``; only those image ids are evaluated.
    ``label_to_cat_id``: contiguous label -> COCO category id.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}`` as floats in
    [0, 1] (``-1.0`` where COCO has no ground truth of that area range) and ``"summary"``, the text
    COCOeval would print. With no detections at all every AP/AR is 0.0 (COCO's ``loadRes`` cannot
    take an empty list).
    """
    from pycocotools.cocoeval import COCOeval

    results, image_ids = _results(detections, label_to_cat_id, set(coco_gt.getImgIds()))
    if not results:
        metrics = {k: 0.0 for k in STAT_KEYS}
        metrics["summary"] = (f"no detections on {len(image_ids)} evaluated images: "
                              "all AP/AR reported as 0.0 (COCOeval not run)")
        return metrics

    text = io.StringIO()
    with contextlib.redirect_stdout(text):  # loadRes/evaluate print progress; keep only the summary
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    metrics = {k: float(v) for k, v in zip(STAT_KEYS, ev.stats)}
    metrics["summary"] = summary.getvalue().rstrip("\n")
    return metrics


def _cell(key, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    value = float(value)
    if value == -1.0:
        return NOT_APPLICABLE
    if key.startswith(("AP", "AR")):
        value *= 100
    return f"{value:.1f}"


def _cells(rows, columns):
    header = ["model", *columns]
    body = [[str(name), *(_cell(c, metrics.get(c)) for c in columns)] for name, metrics in rows.items()]
    return header, body


def format_table(rows: dict, columns=DEFAULT_COLUMNS) -> str:
    """A Markdown table, one row per model name: AP/AR keys x100 with one decimal, other keys
    (``img/s``) with one decimal, a missing value as ``–`` and COCO's -1 as ``n/a``."""
    header, body = _cells(rows, columns)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def write_table(rows: dict, path_md, path_csv, columns=DEFAULT_COLUMNS) -> None:
    """``format_table`` to ``path_md``, and the same cells (same formatting) as CSV to ``path_csv``."""
    path_md, path_csv = Path(path_md), Path(path_csv)
    for p in (path_md, path_csv):
        p.parent.mkdir(parents=True, exist_ok=True)
    path_md.write_text(format_table(rows, columns) + "\n", encoding="utf-8")
    header, body = _cells(rows, columns)
    with open(path_csv, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *body])
