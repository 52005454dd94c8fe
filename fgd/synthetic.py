"""Synthetic inputs for the ops and benchmarks: anchors laid out like torchvision's AnchorGenerator,
random ground-truth boxes, and FGFI-like masks (what `fgd bench`, the README's examples and the
tests feed the ops)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .ops import imitation_mask


def grid_anchors(
    feat_size: Sequence[int],
    stride: float,
    sizes: Sequence[float] = (128, 256, 512),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> Tensor:
    """[H*W*K, 4] anchors centred on the stride grid, location-major, K = len(ratios) * len(sizes).

    Same shapes and order as torchvision's AnchorGenerator for one level (ratio = h / w).
    """
    H, W = feat_size
    r = torch.as_tensor(ratios, dtype=torch.float64)
    s = torch.as_tensor(sizes, dtype=torch.float64)
    h_ratio = r.sqrt()
    ws = (s[None, :] / h_ratio[:, None]).reshape(-1)
    hs = (s[None, :] * h_ratio[:, None]).reshape(-1)
    base = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [K, 4], rounded as torchvision does
    ys = torch.arange(H, dtype=torch.float64) * stride
    xs = torch.arange(W, dtype=torch.float64) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4).to(dtype=dtype, device=device)


def random_boxes(
    n: int,
    image_size: Sequence[float],
    min_size: float = 8.0,
    max_size: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    batch: Sequence[int] = (),
) -> Tensor:
    """[*batch, n, 4] boxes inside an image of (height, width) with sides in [min_size, max_size]."""
    ih, iw = image_size
    max_size = max_size or min(ih, iw) / 2
    shape = (*batch, n)
    wh = min_size + torch.rand(*shape, 2, generator=generator, dtype=torch.float64) * (max_size - min_size)
    room = torch.tensor([iw, ih], dtype=torch.float64) - wh
    xy = torch.rand(*shape, 2, generator=generator, dtype=torch.float64) * room.clamp_min(0)
    return torch.cat([xy, xy + wh], dim=-1).to(dtype)


def random_gt_batch(
    batch: int,
    max_gts: int,
    image_size: Sequence[float],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    min_size: float = 8.0,
    max_size: float | None = None,
):
    """(gt_boxes [B, G, 4] zero-padded, gt_counts int64 [B]) with 0..G boxes per image."""
    counts = torch.randint(0, max_gts + 1, (batch,), generator=generator)
    boxes = random_boxes(max_gts, image_size, min_size, max_size, generator, dtype, batch=(batch,))
    pad = torch.arange(max_gts)[None, :] >= counts[:, None]
    boxes[pad] = 0
    return boxes, counts


def fgfi_like_mask(
    batch: int,
    feat_size: Sequence[int],
    density: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Bool [B, H, W] masks of rectangular blobs (as FGFI masks look) covering about `density`."""
    H, W = feat_size
    mask = torch.zeros(batch, H, W, dtype=torch.bool)
    for b in range(batch):
        while mask[b].float().mean().item() < density:
            side = torch.randint(2, max(3, int(math.sqrt(H * W * max(density, 0.01)) / 1.5)), (2,),
                                 generator=generator)
            y = int(torch.randint(0, max(1, H - int(side[0]) + 1), (1,), generator=generator))
            x = int(torch.randint(0, max(1, W - int(side[1]) + 1), (1,), generator=generator))
            mask[b, y:y + int(side[0]), x:x + int(side[1])] = True
    return mask


def imitation_mask_at_density(
    batch: int,
    feat_size: Sequence[int],
    density: float,
    generator: torch.Generator | None = None,
    stride: int = 16,
) -> Tensor:
    """Real FGFI masks (bool [B, H, W]) covering about `density` of each image: random GT boxes
    are added to an image until fgd.imitation_mask (psi 0.5, anchors 32-256 px) turns on that much."""
    H, W = feat_size
    image = (H * stride, W * stride)
    anchors = grid_anchors(feat_size, stride, sizes=(32, 64, 128, 256))
    out = torch.zeros(batch, H, W, dtype=torch.bool)
    for b in range(batch):
        boxes = torch.zeros(0, 4)
        while out[b].float().mean().item() < density:
            if len(boxes) >= H * W:
                raise ValueError(f"imitation_mask_at_density: cannot reach density {density} on a "
                                 f"{H}x{W} map (got {out[b].float().mean().item():.3f})")
            side = max(24.0, min(image) * math.sqrt(density) / 2)
            boxes = torch.cat([boxes, random_boxes(1, image, 16, side, generator)])
            out[b] = imitation_mask(anchors, boxes[None], torch.tensor([len(boxes)]), feat_size)[0]
    return out
