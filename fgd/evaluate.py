"""COCO bbox mAP with pycocotools, and the results table the demo prints.

``coco_map`` returns COCOeval's summary as a dict. COCO reports ``-1`` for an area range with no
ground truth in the evaluated images (e.g. ``APl`` on a set of small objects only); that ``-1.0``
is kept as is, and ``format_table`` shows it as ``n/a``.
"""
import contextlib
import csv
import functools
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


@functools.lru_cache(maxsize=None)  # one class, made on first use (pycocotools imports lazily)
def _voc_aware_cocoeval():
    """COCOeval, except that ground truths marked ``difficult`` (Pascal VOC; stored as crowd so
    that they are ignored) are matched with the ordinary IoU.

    COCOeval ignores a crowd ground truth (a detection matched to it is neither a true nor a false
    positive, any number of detections may match it, and missing it is no miss), which is what VOC
    does with a difficult object. But its crowd IoU is intersection over the *detection's* area (a
    crowd region contains many objects), so a small detection anywhere inside a large difficult box
    would be ignored instead of counted as a false positive. Real crowd regions keep that IoU.
    """
    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    class VocAwareCOCOeval(COCOeval):
        def computeIoU(self, imgId, catId):
            p = self.params
            if p.iouType != "bbox":
                return super().computeIoU(imgId, catId)
            # as COCOeval.computeIoU: gts in stored order, detections by score, at most maxDets
            cat_ids = [catId] if p.useCats else p.catIds
            gt = [g for c in cat_ids for g in self._gts[imgId, c]]
            dt = [d for c in cat_ids for d in self._dts[imgId, c]]
            if not gt and not dt:
                return []
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][:p.maxDets[-1]]
            crowd = [int(bool(g["iscrowd"]) and not g.get("difficult")) for g in gt]
            return mask_utils.iou([d["bbox"] for d in dt], [g["bbox"] for g in gt], crowd)

    return VocAwareCOCOeval


def coco_map(coco_gt, detections, label_to_cat_id) -> dict:
    """COCOeval bbox summary of ``detections`` against ``coco_gt`` (a pycocotools ``COCO``).

    ``detections``: one dict per evaluated image, ``{"image_id", "boxes" [n, 4] xyxy in original
    image pixels, "scores" [n], "labels" [n] contiguous}``; only those image ids are evaluated.
    ``label_to_cat_id``: contiguous label -> COCO category id.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}`` as floats in
    [0, 1] (``-1.0`` where COCO has no ground truth of that area range) and ``"summary"``, the text
    COCOeval would print. With no detections at all every AP/AR is 0.0 (COCO's ``loadRes`` cannot
    take an empty list).

    Ground truths with ``iscrowd`` are ignored, as COCO does; those also marked ``difficult``
    (Pascal VOC, see ``fgd.data.voc``) are matched with the ordinary IoU, so that, as in VOC's
    evaluation, a detection of a difficult object (or a duplicate) is neither a true nor a false
    positive and a missed one is no miss.
    """
    results, image_ids = _results(detections, label_to_cat_id, set(coco_gt.getImgIds()))
    if not results:
        metrics = {k: 0.0 for k in STAT_KEYS}
        metrics["summary"] = (f"no detections on {len(image_ids)} evaluated images: "
                              "all AP/AR reported as 0.0 (COCOeval not run)")
        return metrics

    text = io.StringIO()
    with contextlib.redirect_stdout(text):  # loadRes/evaluate print progress; keep only the summary
        dt = coco_gt.loadRes(results)
        ev = _voc_aware_cocoeval()(coco_gt, dt, "bbox")
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


def _cells(rows, columns, std=None, joined=False):
    """Header and body of the table; with ``std`` (rows of standard deviations), ``joined`` puts
    "mean ± std" in one cell (Markdown), else the deviations get ``<metric>_std`` columns (CSV)."""
    header = ["model", *columns]
    body = [[str(name), *(_cell(c, metrics.get(c)) for c in columns)] for name, metrics in rows.items()]
    if std is None:
        return header, body
    devs = [[_cell(c, std.get(name, {}).get(c)) for c in columns] for name in rows]
    if joined:
        body = [[r[0], *(m if m in (MISSING, NOT_APPLICABLE) else f"{m} ± {d}" for m, d in zip(r[1:], dv))]
                for r, dv in zip(body, devs)]
        return header, body
    return header + [f"{c}_std" for c in columns], [r + dv for r, dv in zip(body, devs)]


def format_table(rows: dict, columns=DEFAULT_COLUMNS, std=None) -> str:
    """A Markdown table, one row per model name: AP/AR keys x100 with one decimal, other keys
    (``img/s``) with one decimal, a missing value as ``–`` and COCO's -1 as ``n/a``; with ``std``
    (the same rows holding standard deviations) each cell reads "mean ± std"."""
    header, body = _cells(rows, columns, std, joined=True)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def write_table(rows: dict, path_md, path_csv, columns=DEFAULT_COLUMNS, std=None) -> None:
    """``format_table`` to ``path_md``, and the same numbers as CSV to ``path_csv``: one number per
    cell, the standard deviations (with ``std``) in ``<metric>_std`` columns."""
    path_md, path_csv = Path(path_md), Path(path_csv)
    for p in (path_md, path_csv):
        p.parent.mkdir(parents=True, exist_ok=True)
    from .files import write_atomic

    write_atomic(path_md, format_table(rows, columns, std) + "\n")
    header, body = _cells(rows, columns, std)
    text = io.StringIO(newline="")
    csv.writer(text).writerows([header, *body])
    write_atomic(path_csv, text.getvalue())


@torch.no_grad()
def evaluate(model, loader, dist=None) -> dict:
    """COCOeval bbox mAP of a torchvision detector on ``loader`` (whose dataset is a
    ``fgd.data.CocoDetection`` / ``VocDetection``), plus images/s of inference. Under DDP each rank
    runs its shard (``dist``: ``fgd.engine.Dist``); rank 0 gathers the detections, runs COCOeval and
    returns the metrics, the other ranks None."""
    import time

    device = next(model.parameters()).device
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    was_training = model.training
    model.eval()
    dets, n, t0 = [], 0, time.perf_counter()
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        for out, t in zip(outputs, targets):
            dets.append({"image_id": int(t["image_id"]), **{k: out[k].cpu() for k in ("boxes", "scores", "labels")}})
        n += len(images)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, dets)
        dets = list({d["image_id"]: d for part in gathered for d in part}.values())  # drop the padding repeats
    if rank != 0:
        return None
    ds = loader.dataset
    metrics = coco_map(ds.coco, dets, ds.label_to_cat_id)
    metrics["img/s"] = n * world / max(seconds, 1e-9)
    return metrics
