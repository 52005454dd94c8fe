"""The method, free of any detector framework: masks, adaptation layers and the imitation loss.

    core = FeatureImitation([(64, 128)] * 3)      # (student, teacher) channels per imitated level
    result = core(student_feats, teacher_feats, anchors, boxes, image_size)
    loss = detection_loss + result.loss           # lambda-weighted; 0 during the warm-up
    core.step()                                   # one training iteration done

An adapter per framework only *finds* the inputs: per-level student and teacher feature maps of the
same batch, each level's anchors ([H*W*K, 4], shared by the batch) and the batch's GT boxes in the
pixels of that batch (``GTBoxes``: padded [B, G, 4] and a count per image; a list of one [n_i, 4]
tensor per image is accepted too). Everything else -- the paper's mask (or a baseline's), the
adaptation convs, the masked loss and its warm-up -- lives here, once. The settings are one
``ImitationSettings`` (fgd.distill.settings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from .settings import (ADAPTERS, LEVEL_POLICIES, MASK_MODES, FGFIParams, ImitationSettings,  # noqa: F401
                       from_door)


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


def masked_adapt_supports(conv) -> bool:
    """Whether masked_adapt_loss computes exactly this conv: k = 1 or 3, stride 1, same padding."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size in ((1, 1), (3, 3))
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding == (conv.kernel_size[0] // 2,) * 2 and conv.padding_mode == "zeros")


class GTBoxes(NamedTuple):
    """A batch's GT boxes: ``boxes`` [B, G, 4] xyxy, zero-padded past ``counts[b]`` (int64 [B])."""

    boxes: Tensor
    counts: Tensor

    @classmethod
    def from_list(cls, boxes: Sequence[Tensor], device=None) -> "GTBoxes":
        """From one [n_i, 4] tensor per image."""
        device = device if device is not None else (boxes[0].device if len(boxes) else "cpu")
        G = max((len(b) for b in boxes), default=0)
        out = torch.zeros(len(boxes), G, 4, device=device)
        for i, b in enumerate(boxes):
            out[i, : len(b)] = b.detach().to(device=device, dtype=out.dtype)
        return cls(out, torch.tensor([len(b) for b in boxes], dtype=torch.long, device=device))


def as_gt_boxes(boxes, device) -> GTBoxes:
    if isinstance(boxes, GTBoxes):
        return GTBoxes(boxes.boxes.detach().to(device=device, dtype=torch.float32), boxes.counts.to(device))
    return GTBoxes.from_list(list(boxes), device)


def assign_fpn_levels(boxes: Tensor, levels: Sequence[int]) -> Tensor:
    """FPN's RoI-to-level rule: k = floor(4 + log2(sqrt(w * h) / 224)), clamped to the given levels
    (level k = the feature of stride 2^k); a k between two given levels goes to the finer one.
    Returns the level k of each box."""
    present = torch.tensor(sorted(set(levels)), device=boxes.device)
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0)
    scale = (wh[..., 0] * wh[..., 1]).sqrt().clamp_min(1e-6)
    k = torch.floor(4 + torch.log2(scale / 224)).clamp(min(levels), max(levels)).long()
    return present[torch.searchsorted(present, k, right=True) - 1]


def imitation_masks(anchors: Sequence[Tensor], boxes, feat_sizes, image_size,
                    params: FGFIParams = FGFIParams()) -> list:
    """The imitation mask of every level: bool [B, H_l, W_l] each.

    ``anchors``: [H_l*W_l*K, 4] per level (shared by the batch); ``boxes``: ``GTBoxes`` (or one
    [n_i, 4] tensor per image), in the coordinates of the padded batch of size ``image_size``
    (H, W), from which each level's stride, hence its FPN level, is inferred.
    """
    device = anchors[0].device
    gt, counts = as_gt_boxes(boxes, device)
    B, G = gt.shape[:2]
    strides = [image_size[0] / fs[0] for fs in feat_sizes]
    levels = [int(round(math.log2(s))) for s in strides]
    assigned = params.level_policy == "assigned" and G > 0
    if assigned:
        valid = torch.arange(G, device=device)[None, :] < counts[:, None]
        owner = assign_fpn_levels(gt, levels)  # [B, G]: the FPN level of each GT
    out = []
    for lvl, (a, fs) in enumerate(zip(anchors, feat_sizes)):
        if assigned:
            keep = valid & (owner == levels[lvl])  # levels of one stride share their GTs
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            gt_l = torch.gather(gt, 1, order[..., None].expand(-1, -1, 4))
            counts_l = keep.sum(dim=1)  # stays on the device: no sync
        else:
            gt_l, counts_l = gt, counts
        out.append(_mask(a.to(device=device, dtype=gt.dtype), gt_l, counts_l, tuple(fs), params))
    return out


def _mask(anchors: Tensor, gt: Tensor, counts: Tensor, feat_size, params: FGFIParams) -> Tensor:
    B, (H, W) = gt.shape[0], feat_size
    if params.mask_mode == "full":
        return torch.ones(B, H, W, dtype=torch.bool, device=gt.device)
    if params.mask_mode == "fgfi":
        return ops.imitation_mask(anchors, gt, counts, (H, W), thresh=params.thresh, offset=params.offset)
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
        settings: an ``ImitationSettings`` (default: the official ones); ``overrides`` change some of
            them by their python names (``imitation_weight=``, ``thresh=``, ... see
            fgd.distill.settings.NAMES).
        total_iterations: the run's length, for the automatic warm-up (``warmup_iters=None``).
        who: the name error messages start with (the adapter the user called).
    """

    def __init__(self, channels: Sequence[tuple], settings: Optional[ImitationSettings] = None, *,
                 total_iterations: Optional[int] = None, who: str = "fgd.FeatureImitation", **overrides):
        super().__init__()
        self.who = who
        self.settings = from_door(overrides, "python", base=settings or ImitationSettings(), who=who)
        self.total_iterations = total_iterations
        # Not in the state dict (Ultralytics' EMA takes every entry for a tensor): the host keeps it
        # (fgd.Distiller in its own extra state; FGFITrainer from the epoch it resumes at).
        self.iteration = 0
        k = 3 if self.settings.adapter == "3x3" else 1
        self.adapters = nn.ModuleList(Adapter(int(cs), int(ct), k, self.settings.adapter_relu) for cs, ct in channels)

    @property
    def warmup_iters(self) -> int:
        return self.settings.warmup_for(self.total_iterations)

    @property
    def warming_up(self) -> bool:
        return self.iteration < self.warmup_iters

    def step(self) -> None:
        """One training iteration done (call it after a forward that did not raise, so a failed
        step does not shorten the warm-up)."""
        self.iteration += 1

    def masks(self, anchors: Sequence[Tensor], boxes, feat_sizes, image_size) -> list:
        """The imitation mask of every level (bool [B, H_l, W_l]) under these settings."""
        return imitation_masks(anchors, boxes, feat_sizes, image_size, self.settings.params)

    def zero(self) -> ImitationResult:
        """The warm-up's result: zero, but through every adapter, so DDP sees all parameters used."""
        # + 0.0: a negative sum times 0 is -0.0, which the logs would print as "-0.0000"
        return ImitationResult(sum(p.sum() for p in self.adapters.parameters()) * 0.0 + 0.0)

    def forward(self, s_feats: Sequence[Tensor], t_feats: Sequence[Tensor], anchors: Sequence[Tensor],
                boxes, image_size, *, names: tuple = ("", "")) -> ImitationResult:
        """The lambda-weighted loss of one batch. ``boxes``: ``GTBoxes`` or one [n_i, 4] tensor per
        image; ``image_size``: (H, W) of the batch the boxes and anchors are in pixels of;
        ``names``: how to name the student's and the teacher's features in errors (e.g. their layers)."""
        s_name, t_name = (f" ({n})" if n else "" for n in names)
        n = len(self.adapters)
        if not (len(s_feats) == len(t_feats) == len(anchors) == n):
            raise ValueError(
                f"{self.who}: {len(s_feats)} student features{s_name}, {len(t_feats)} teacher features{t_name}, "
                f"{len(anchors)} anchor levels and {n} adaptation layers: they must be one per imitated level")
        masks = self.masks(anchors, boxes, [f.shape[-2:] for f in s_feats], image_size)
        sparse = self.settings.sparse_adaptation
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
            if sparse and masked_adapt_supports(conv):
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
        return ImitationResult(self.settings.imitation_weight * total, level_losses, num_pos,
                               [m.detach() for m in masks])
