"""Pictures for people: imitation masks over images, detections, loss curves, mAP bars.

``overlay_masks`` writes one RGB PNG of exactly ``(1 + len(masks)) * W`` by ``CAPTION_BAND + H``
pixels: a caption band of ``CAPTION_BAND`` (14) px on top of each panel and no other margins.
``draw_detections`` writes a PNG of exactly the image size. ``sample_masks`` / ``write_pictures``
give the imitation masks a distiller would use over the images it would see (`fgd viz`). Plots use matplotlib's
object-oriented ``Figure`` API (no pyplot), so no global backend is touched.
"""
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .files import write_atomic

CAPTION_BAND = 14  # px above every overlay_masks panel
TINT = (255, 0, 0)  # mask colour, blended at TINT_ALPHA
TINT_ALPHA = 0.5
BOX_COLOUR = (0, 255, 0)


def _to_uint8(image, name="image") -> np.ndarray:
    image = torch.as_tensor(image).detach().cpu()
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name} must be a float tensor [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _boxes(boxes, name="boxes") -> list:
    if boxes is None:
        return []
    boxes = torch.as_tensor(boxes).detach().cpu().float()
    if boxes.numel() == 0:
        return []
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be [n, 4] xyxy, got shape {tuple(boxes.shape)}")
    return boxes.tolist()


def _name(label, class_names) -> str:
    label = int(label)
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def _save(im: Image.Image, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda f: im.save(f, format="PNG"))  # a full disk leaves no half picture


def _draw_boxes(draw, boxes, texts, font):
    for (x1, y1, x2, y2), text in zip(boxes, texts):
        draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOUR, width=1)
        if text:
            draw.text((x1 + 1, y1 + 1), text, fill=BOX_COLOUR, font=font)


def overlay_masks(image, masks, path, boxes=None, labels=None, class_names=None, title=None) -> Path:
    """One PNG strip: ``image`` then, per level, the image tinted red (50 %) where ``masks[i]`` is on.

    ``image``: float [3, H, W] in [0, 1], at the resolution the masks refer to. ``masks``: 2-D
    tensors [h_l, w_l], upsampled to H x W with nearest. ``boxes`` (xyxy in image pixels) are drawn
    on every panel, with ``class_names[labels[j]]`` when labels are given. Each panel has a 14 px
    caption band on top: ``title`` (or "image") over the image, ``"level {i}: {h}x{w}"`` over level i.
    The PNG is RGB, ``(1 + len(masks)) * W`` wide and ``14 + H`` high. Returns ``path``.
    """
    base = _to_uint8(image)
    H, W = base.shape[:2]
    if len(masks) == 0:
        raise ValueError("masks must hold at least one 2-D mask")
    box_list = _boxes(boxes)
    if labels is not None and len(labels) != len(box_list):
        raise ValueError(f"labels has {len(labels)} entries but boxes has {len(box_list)}")
    texts = [_name(l, class_names) for l in labels] if labels is not None else [""] * len(box_list)

    panels, captions = [base], [title if title is not None else "image"]
    for i, mask in enumerate(masks):
        mask = torch.as_tensor(mask).detach().cpu()
        if mask.dim() != 2:
            raise ValueError(f"masks[{i}] must be 2-D [h, w], got shape {tuple(mask.shape)}")
        h, w = mask.shape
        on = F.interpolate((mask != 0).float()[None, None], size=(H, W), mode="nearest")[0, 0].bool().numpy()
        tinted = base.astype(np.float32)
        tinted[on] = (1 - TINT_ALPHA) * tinted[on] + TINT_ALPHA * np.array(TINT, np.float32)
        panels.append(tinted.round().astype(np.uint8))
        captions.append(f"level {i}: {h}x{w}")

    font = ImageFont.load_default()
    strip = Image.new("RGB", (len(panels) * W, CAPTION_BAND + H), (255, 255, 255))
    for k, (pixels, caption) in enumerate(zip(panels, captions)):
        # a panel of its own, so a long caption is clipped at the panel's edge
        panel = Image.new("RGB", (W, CAPTION_BAND + H), (255, 255, 255))
        panel.paste(Image.fromarray(pixels), (0, CAPTION_BAND))
        draw = ImageDraw.Draw(panel)
        draw.text((2, 1), caption, fill=(0, 0, 0), font=font)
        _draw_boxes(draw, [[x1, y1 + CAPTION_BAND, x2, y2 + CAPTION_BAND] for x1, y1, x2, y2 in box_list],
                    texts, font)
        strip.paste(panel, (k * W, 0))
    return _save(strip, path)


def draw_detections(image, boxes, labels, scores, path, class_names=None, score_thresh=0.3) -> Path:
    """A PNG of ``image`` (same size) with the boxes scoring at least ``score_thresh`` and their
    ``"name score"``. Returns ``path``."""
    box_list = _boxes(boxes)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1).tolist()
    scores = torch.as_tensor(scores).detach().cpu().float().reshape(-1).tolist()
    if not len(box_list) == len(labels) == len(scores):
        raise ValueError(f"boxes, labels and scores must have the same length, got "
                         f"{len(box_list)}, {len(labels)} and {len(scores)}")
    im = Image.fromarray(_to_uint8(image))
    kept = [(b, f"{_name(l, class_names)} {s:.2f}") for b, l, s in zip(box_list, labels, scores) if s >= score_thresh]
    _draw_boxes(ImageDraw.Draw(im), [b for b, _ in kept], [t for _, t in kept], ImageFont.load_default())
    return _save(im, path)


def _figure(width, height):
    from matplotlib.figure import Figure  # the OO API: renders with Agg, leaves pyplot's backend alone

    return Figure(figsize=(width, height), dpi=100)


def _save_figure(fig, path) -> Path:
    fig.tight_layout()
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return write_atomic(path, png.getvalue())  # a full disk leaves no half picture


def _read_log(path, keys):
    """``iteration`` and each key's values from a CSV log; empty or unparsable cells are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plot_curves: log {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "iteration" not in reader.fieldnames:
            raise ValueError(f"plot_curves: log {path} has no 'iteration' column")
        series = {k: ([], []) for k in keys if k in reader.fieldnames}
        for row in reader:
            for k, (xs, ys) in series.items():
                try:
                    x, y = float(row["iteration"]), float(row[k])
                except (TypeError, ValueError):
                    continue
                xs.append(x)
                ys.append(y)
    return series


def plot_curves(logs: dict, path, keys=("loss",), title=None) -> Path:
    """One subplot per key of ``keys``, one line per run; ``logs`` maps a run name to its CSV log
    (columns ``iteration`` and the keys; a key a run lacks is skipped for that run)."""
    if isinstance(keys, str):
        keys = (keys,)
    series = {name: _read_log(p, keys) for name, p in logs.items()}
    fig = _figure(5 * len(keys), 3.5)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        drawn = False
        for name, per_key in series.items():
            if per_key.get(key) and per_key[key][0]:
                ax.plot(*per_key[key], label=name)
                drawn = True
        ax.set_title(key)
        ax.set_xlabel("iteration")
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def plot_map_table(rows: dict, path, metrics=("AP", "AP50", "AP75")) -> Path:
    """A grouped bar chart (x100) of ``metrics`` per model; missing values and COCO's -1 get no bar."""
    names = list(rows)
    fig = _figure(max(4.0, 1.5 + 0.5 * len(metrics) * max(len(names), 1)), 3.5)
    ax = fig.subplots()
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(metrics))
    for j, name in enumerate(names):
        values = [rows[name].get(m) for m in metrics]
        heights = [100 * float(v) if v is not None and float(v) >= 0 else np.nan for v in values]
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * width, heights, width, label=str(name))
        ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:.1f}" for h in heights], fontsize="x-small")
    ax.set_xticks(x, list(metrics))
    ax.set_ylabel("COCO metric (x100)")
    if names:
        ax.legend(fontsize="small")
    return _save_figure(fig, path)


# ---- imitation masks of a detector ----------------------------------------------------------

@torch.no_grad()
def sample_masks(model, images, targets, settings=None):
    """(display images [B, 3, H, W] in [0, 1] at the padded model resolution, masks per level
    [B, h, w], GT boxes per image in that resolution) for a torchvision detector's anchors, under
    ``settings`` (an ImitationSettings; default the official ones)."""
    from .distill import detector_levels

    model.eval()
    levels = detector_levels(model, images, targets, settings)
    batch, masks, boxes = levels.batch, levels.masks, levels.boxes
    mean = torch.tensor(model.transform.image_mean, device=batch.device)[:, None, None]
    std = torch.tensor(model.transform.image_std, device=batch.device)[:, None, None]
    shown = (batch * std + mean).clamp(0, 1)
    return shown, masks, boxes


def write_pictures(model, ds, indices, folder, settings=None, *, detections=False, title=None) -> list:
    """For each dataset index: <id>_masks.png (the image and every level's mask, GT boxes drawn) and,
    with ``detections``, <id>_detections.png (the model's detections on the original image)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        image, target = ds[i]
        shown, masks, boxes = sample_masks(model, [image], [target], settings)
        name = f"{target['image_id']:06d}"
        paths.append(overlay_masks(shown[0], [m[0] for m in masks], folder / f"{name}_masks.png", boxes=boxes[0],
                                   labels=target["labels"], class_names=ds.class_names,
                                   title=title or f"image {target['image_id']}"))
        if detections:
            with torch.no_grad():
                det = model([image])[0]
            paths.append(draw_detections(image, det["boxes"], det["labels"], det["scores"],
                                         folder / f"{name}_detections.png", class_names=ds.class_names))
    return paths
