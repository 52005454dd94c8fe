"""The method, free of any detector framework: masks, adaptation layers and the imitation loss.

    core = FeatureImitation([(64, 128)] * 3)      # (student, teacher) channels per imitated level
    result = core(student_feats, teacher_feats, anchors, boxes, image_size)
    loss = detection_loss + result.loss           # lambda-weighted; 0 during the warm-up
    core.step()                                   # one training iteration done

An adapter per framework only *finds* the inputs: per-level student and teacher feature maps of the
same batch, each level's anchors ([H*W*K, 4], shared by the batch) and each image's GT boxes in the
pixels of that batch. Everything else -- the paper's mask (or a baseline's), the adaptation convs,
the masked loss and its warm-up -- lives here, once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops

LEVEL_POLICIES = ("assigned", "per_level")
MASK_MODES = ("fgfi", "gt_box", "full")
ADAPTERS = ("3x3", "1x1")


class Adapter(nn.Module):
    """The adaptation layer: a k x k conv (padding k // 2) from student to teacher channels, with
    weights drawn from N(0, 1e-4) truncated at 2 sigma as in the official code, and an optional ReLU
    (the official setting, for post-ReLU features such as VGG conv5; FPN outputs can be negative)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.trunc_normal_(self.conv.weight, mean=0.0, std=1e-4, a=-2e-4, b=2e-4)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return torch.relu(x) if self.relu else x


def _sparse_ok(conv) -> bool:
    """Whether masked_adapt_loss computes exactly this conv: k = 1 or 3, stride 1, same padding."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size in ((1, 1), (3, 3))
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding == (conv.kernel_size[0] // 2,) * 2 and conv.padding_mode == "zeros")


def assign_fpn_levels(boxes: Tensor, levels: Sequence[int]) -> Tensor:
    """FPN's RoI-to-level rule: k = floor(4 + log2(sqrt(w * h) / 224)), clamped to the given levels
    (level k = the feature of stride 2^k); a k between two given levels goes to the finer one.
    Returns the level k of each box."""
    present = torch.tensor(sorted(set(levels)), device=boxes.device)
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0)
    scale = (wh[..., 0] * wh[..., 1]).sqrt().clamp_min(1e-6)
    k = torch.floor(4 + torch.log2(scale / 224)).clamp(min(levels), max(levels)).long()
    return present[torch.searchsorted(present, k, right=True) - 1]


def imitation_masks(anchors: Sequence[Tensor], boxes: Sequence[Tensor], feat_sizes, image_size, *,
                    mask_mode: str = "fgfi", level_policy: str = "assigned", thresh: float = 0.5,
                    offset: float = 0.0) -> list:
    """The imitation mask of every level: bool [B, H_l, W_l] each.

    ``anchors``: [H_l*W_l*K, 4] per level (shared by the batch); ``boxes``: one [n_i, 4] tensor per
    image, in the coordinates of the padded batch of size ``image_size`` (H, W), from which each
    level's stride, hence its FPN level, is inferred.
    """
    B = len(boxes)
    device = anchors[0].device
    G = max((len(b) for b in boxes), default=0)
    gt = torch.zeros(B, G, 4, device=device)
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.long)
    for i, b in enumerate(boxes):
        gt[i, : len(b)] = b.detach().to(device=device, dtype=gt.dtype)
    strides = [image_size[0] / fs[0] for fs in feat_sizes]
    levels = [int(round(math.log2(s))) for s in strides]
    valid = torch.arange(G, device=device)[None, :] < counts.to(device)[:, None]
    if level_policy == "assigned" and G > 0:
        owner = assign_fpn_levels(gt, levels)  # [B, G]: the FPN level of each GT
    out = []
    for lvl, (a, fs) in enumerate(zip(anchors, feat_sizes)):
        if level_policy == "assigned" and G > 0:
            keep = valid & (owner == levels[lvl])  # levels of one stride share their GTs
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            gt_l = torch.gather(gt, 1, order[..., None].expand(-1, -1, 4))
            counts_l = keep.sum(dim=1)  # stays on the device: no sync
        else:
            gt_l, counts_l = gt, counts
        out.append(_mask(a.to(device=device, dtype=gt.dtype), gt_l, counts_l, tuple(fs),
                         mask_mode, thresh, offset))
    return out


def _mask(anchors: Tensor, gt: Tensor, counts: Tensor, feat_size, mask_mode, thresh, offset) -> Tensor:
    B, (H, W) = gt.shape[0], feat_size
    if mask_mode == "full":
        return torch.ones(B, H, W, dtype=torch.bool, device=gt.device)
    if mask_mode == "fgfi":
        return ops.imitation_mask(anchors, gt, counts, (H, W), thresh=thresh, offset=offset)
    # gt_box: a location is on if its centre (the mean centre of its anchors) is inside a GT box
    centres = anchors.view(H * W, -1, 4).mean(dim=1)
    cx = ((centres[:, 0] + centres[:, 2]) / 2)[None, :, None]
    cy = ((centres[:, 1] + centres[:, 3]) / 2)[None, :, None]
    g = gt[:, None, :, :]
    inside = (cx >= g[..., 0]) & (cx <= g[..., 2]) & (cy >= g[..., 1]) & (cy <= g[..., 3])
    valid = torch.arange(gt.shape[1], device=gt.device)[None, None, :] < counts.to(gt.device)[:, None, None]
    return (inside & valid).any(dim=2).view(B, H, W)


@dataclass
class ImitationResult:
    """What one training step's imitation computed. ``loss``: lambda * the sum of the per-level
    losses (a zero that still reaches every adapter during the warm-up); the lists hold one entry
    per level, detached, and are empty during the warm-up."""

    loss: Tensor
    level_losses: list = field(default_factory=list)
    num_pos: list = field(default_factory=list)
    masks: list = field(default_factory=list)

    @property
    def warming_up(self) -> bool:
        return not self.level_losses


class FeatureImitation(nn.Module):
    """Fine-grained feature imitation (Wang et al., CVPR 2019) over per-level feature maps.

    Args:
        channels: [(student_channels, teacher_channels)] per imitated level.
        imitation_weight: lambda (official: 0.01).
        thresh: psi, the fraction of each GT's best IoU an anchor must exceed (official: 0.5).
        warmup_iters: training iterations during which the imitation loss is 0 (official: 400).
        mask_mode: "fgfi" (the paper's mask), "gt_box" (locations inside a GT box) or "full"
            (everywhere) -- the paper's baselines.
        level_policy: "assigned" -- each GT counts only on its FPN level, floor(4 + log2(sqrt(wh)/224))
            clamped to the imitated levels; "per_level" -- every GT on every level.
        adapter: "3x3" (official) or "1x1"; adapter_relu: ReLU after it.
        offset: IoU pixel convention (0: torchvision's).
        sparse_adaptation: compute the adapter and the loss only at the masked locations
            (fgd.ops.masked_adapt_loss: cost in proportion to N_p); False: dense conv2d + imitation_loss.
        who: the name error messages start with (the adapter the user called).
    """

    def __init__(self, channels: Sequence[tuple], *, imitation_weight: float = 0.01, thresh: float = 0.5,
                 warmup_iters: int = 400, mask_mode: str = "fgfi", level_policy: str = "assigned",
                 adapter: str = "3x3", adapter_relu: bool = False, offset: float = 0.0,
                 sparse_adaptation: bool = True, who: str = "fgd.FeatureImitation"):
        super().__init__()
        for name, value, allowed in (("mask_mode", mask_mode, MASK_MODES),
                                     ("level_policy", level_policy, LEVEL_POLICIES),
                                     ("adapter", adapter, ADAPTERS)):
            if value not in allowed:
                raise ValueError(f"{who}: {name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= thresh < 1.0:
            raise ValueError(f"{who}: thresh must be in [0, 1), got {thresh}")
        if imitation_weight < 0 or not math.isfinite(imitation_weight):
            raise ValueError(f"{who}: imitation_weight must be >= 0, got {imitation_weight}")
        if int(warmup_iters) != warmup_iters or warmup_iters < 0:
            raise ValueError(f"{who}: warmup_iters must be an int >= 0, got {warmup_iters}")
        self.who = who
        self.imitation_weight = float(imitation_weight)
        self.thresh = float(thresh)
        self.warmup_iters = int(warmup_iters)
        self.mask_mode = mask_mode
        self.level_policy = level_policy
        self.offset = float(offset)
        self.sparse_adaptation = bool(sparse_adaptation)
        # Not in the state dict (Ultralytics' EMA takes every entry for a tensor): the host keeps it
        # (fgd.Distiller in its own extra state; FGFITrainer from the epoch it resumes at).
        self.iteration = 0
        k = 3 if adapter == "3x3" else 1
        self.adapters = nn.ModuleList(Adapter(int(cs), int(ct), k, adapter_relu) for cs, ct in channels)

    @property
    def warming_up(self) -> bool:
        return self.iteration < self.warmup_iters

    def step(self) -> None:
        """One training iteration done (call it after a forward that did not raise, so a failed
        step does not shorten the warm-up)."""
        self.iteration += 1

    def masks(self, anchors: Sequence[Tensor], boxes: Sequence[Tensor], feat_sizes, image_size) -> list:
        """The imitation mask of every level (bool [B, H_l, W_l]) under these settings."""
        return imitation_masks(anchors, boxes, feat_sizes, image_size, mask_mode=self.mask_mode,
                               level_policy=self.level_policy, thresh=self.thresh, offset=self.offset)

    def zero(self) -> ImitationResult:
        """The warm-up's result: zero, but through every adapter, so DDP sees all parameters used."""
        return ImitationResult(sum(p.sum() for p in self.adapters.parameters()) * 0.0)

    def forward(self, s_feats: Sequence[Tensor], t_feats: Sequence[Tensor], anchors: Sequence[Tensor],
                boxes: Sequence[Tensor], image_size, *, names: tuple = ("", "")) -> ImitationResult:
        """The lambda-weighted loss of one batch. ``image_size``: (H, W) of the batch the boxes and
        anchors are in pixels of; ``names``: how to name the student's and the teacher's features in
        errors (e.g. their layers)."""
        s_name, t_name = (f" ({n})" if n else "" for n in names)
        n = len(self.adapters)
        if not (len(s_feats) == len(t_feats) == len(anchors) == n):
            raise ValueError(
                f"{self.who}: {len(s_feats)} student features{s_name}, {len(t_feats)} teacher features{t_name}, "
                f"{len(anchors)} anchor levels and {n} adaptation layers: they must be one per imitated level")
        masks = self.masks(anchors, boxes, [f.shape[-2:] for f in s_feats], image_size)
        total, level_losses, num_pos = None, [], []
        for lvl, (s, t, mask, adapt) in enumerate(zip(s_feats, t_feats, masks, self.adapters)):
            if s.shape[-2:] != t.shape[-2:] or s.shape[0] != t.shape[0]:
                raise ValueError(
                    f"{self.who}: level {lvl}: the student feature{s_name} has shape {tuple(s.shape)} and the "
                    f"teacher's{t_name} {tuple(t.shape)}; the batch and spatial sizes must match (the channels "
                    "may differ)")
            conv = adapt.conv if isinstance(adapt, Adapter) else None
            if conv is not None and (conv.in_channels, conv.out_channels) != (s.shape[1], t.shape[1]):
                raise ValueError(
                    f"{self.who}: level {lvl}: the adaptation layer maps {conv.in_channels} to "
                    f"{conv.out_channels} channels but the student feature has {s.shape[1]} and the "
                    f"teacher's {t.shape[1]}")
            if self.sparse_adaptation and _sparse_ok(conv):
                loss = ops.masked_adapt_loss(s, t.detach().to(s.dtype), mask, conv.weight, conv.bias,
                                             relu=adapt.relu)
            else:
                a = adapt(s)
                if a.shape[1] != t.shape[1]:
                    raise ValueError(f"{self.who}: level {lvl}: the adaptation layer gives {a.shape[1]} "
                                     f"channels but the teacher feature has {t.shape[1]}")
                loss = ops.imitation_loss(a, t.detach().to(a.dtype), mask)
            level_losses.append(loss.detach())
            num_pos.append(mask.sum().detach())
            total = loss if total is None else total + loss.to(total.dtype)
        return ImitationResult(self.imitation_weight * total, level_losses, num_pos, [m.detach() for m in masks])
