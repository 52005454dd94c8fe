"""`fgd viz`: the imitation masks a distiller would use, over the images it would see."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .distill import imitation_masks, level_anchors


@torch.no_grad()
def sample_masks(model, images, targets, *, mask_mode="fgfi", level_policy="assigned", thresh=0.5):
    """(display images [B, 3, H, W] in [0, 1] at the padded model resolution, masks per level
    [B, h, w], GT boxes per image in that resolution) for a torchvision detector's anchors."""
    model.eval()
    image_list, tt = model.transform(list(images), [dict(t) for t in targets])
    feats = list(model.backbone(image_list.tensors).values())
    anchors = level_anchors(model, image_list, feats)
    boxes = [t["boxes"] for t in tt]
    masks = imitation_masks(anchors, boxes, [f.shape[-2:] for f in feats], image_list.tensors.shape[-2:],
                            mask_mode=mask_mode, level_policy=level_policy, thresh=thresh)
    mean = torch.tensor(model.transform.image_mean, device=image_list.tensors.device)[:, None, None]
    std = torch.tensor(model.transform.image_std, device=image_list.tensors.device)[:, None, None]
    shown = (image_list.tensors * std + mean).clamp(0, 1)
    return shown, masks, boxes


def write_pictures(model, ds, indices, folder, *, mask_mode="fgfi", level_policy="assigned", thresh=0.5,
                   detections=False, title=None) -> list:
    """For each dataset index: <id>_masks.png (the image and every level's mask, GT boxes drawn) and,
    with ``detections``, <id>_detections.png (the model's detections on the original image)."""
    from .viz import draw_detections, overlay_masks

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        image, target = ds[i]
        shown, masks, boxes = sample_masks(model, [image], [target], mask_mode=mask_mode,
                                           level_policy=level_policy, thresh=thresh)
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


def visualise(args) -> list:
    from .data import CocoDetection
    from .engine import load_detector
    from .models import build_detector

    out = Path(args.out)  # checked before the model runs, not after
    if out.exists() and not out.is_dir():
        raise SystemExit(f"fgd viz: --out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise SystemExit(f"fgd viz: cannot write to --out {out}: {e.strerror or e}")
    ds = CocoDetection(args.images, args.json)
    if args.checkpoint:
        model, _, _ = load_detector(args.checkpoint)
    else:
        if args.detections:
            raise SystemExit("fgd viz: --detections needs --checkpoint")
        model = build_detector(args.arch, ds.num_classes, args.image_size)
    return write_pictures(model, ds, range(min(args.num, len(ds))), args.out, mask_mode=args.mask_mode,
                          level_policy=args.level_policy, thresh=args.thresh, detections=args.detections)
