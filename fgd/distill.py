"""fgd.Distiller: fine-grained feature imitation around a frozen teacher and a trainable student.

    d = fgd.Distiller(teacher, student)            # torchvision Faster R-CNN / RetinaNet
    losses = d(images, targets)                    # the student's losses + "loss_imitation"
    sum(losses.values()).backward()

The distiller records the student's and the teacher's feature maps with forward hooks that exist
only while its forward runs (so ``d.student`` stays a plain model), builds one imitation mask per
imitated level from the student's own anchors and the batch's ground truth, maps the student
features to the teacher's channels with an adaptation conv per level and adds
``imitation_weight * sum_levels imitation_loss(adapt(s), t, mask)`` -- computed at the masked
locations only (fgd.ops.masked_adapt_loss) unless ``sparse_adaptation=False``.
"""
from __future__ import annotations

import contextlib
import difflib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["Distiller", "Adapter", "assign_fpn_levels", "imitation_masks"]

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


def _module(root: nn.Module, path: str, role: str) -> nn.Module:
    names = dict(root.named_modules())
    if path in names:
        return names[path]
    close = difflib.get_close_matches(path, [n for n in names if n], n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"fgd.Distiller: {role} has no module {path!r}.{hint}")


def _flatten(out, where: str) -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and all(isinstance(o, Tensor) for o in out):
        return list(out)
    raise TypeError(f"fgd.Distiller: {where} returned {type(out).__name__}; expected a tensor, "
                    "or a dict / list / tuple of tensors (one per imitated level)")


@contextlib.contextmanager
def _recording(modules: dict):
    """Forward hooks that store each module's output, removed on exit whatever happens."""
    seen = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out))
               for key, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _anchor_generator(model: nn.Module):
    if hasattr(model, "rpn") and hasattr(model.rpn, "anchor_generator"):
        return model.rpn.anchor_generator  # Faster R-CNN / Mask R-CNN
    return getattr(model, "anchor_generator", None)  # RetinaNet, FCOS


def level_anchors(model: nn.Module, image_list, feats: Sequence[Tensor]) -> list:
    """A torchvision detector's anchors per level, [H_l*W_l*K_l, 4] each (one image's: all images of
    a padded batch share them), for ``image_list`` (its transform's output) and its feature maps.
    They are computed from float32 stand-ins of the feature shapes, so they stay exact under autocast."""
    gen = _anchor_generator(model)
    device = image_list.tensors.device
    shapes = [torch.empty((1, 1, *f.shape[-2:]), device=device) for f in feats]
    anchors = gen(image_list, shapes)[0]
    return list(anchors.split([f.shape[-2] * f.shape[-1] * k
                               for f, k in zip(feats, gen.num_anchors_per_location())]))


def _is_torchvision_detector(model: nn.Module) -> bool:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    return (isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform)
            and hasattr(model, "backbone") and _anchor_generator(model) is not None)


def _transform_key(t) -> tuple:
    return (t.min_size, t.max_size, tuple(t.image_mean), tuple(t.image_std), t.size_divisible,
            t.fixed_size)


class Distiller(nn.Module):
    """Distils ``teacher`` into ``student`` by fine-grained feature imitation (Wang et al., CVPR 2019).

    torchvision Faster R-CNN and RetinaNet work out of the box: every FPN output is imitated (one
    mask, adapter and loss per level), anchors come from the student's own AnchorGenerator and the
    teacher's backbone runs on the student's transformed, padded batch. Any other detector: name the
    modules whose outputs to imitate (``student_layers`` / ``teacher_layers``, dotted paths) and give
    ``anchors_fn(images, student_features) -> [H*W*K, 4] anchors per level``; the teacher then runs
    whole, on the same ``images``.

    Args:
        imitation_weight: lambda (official: 0.01).
        thresh: psi, the fraction of each GT's best IoU an anchor must exceed (official: 0.5).
        warmup_iters: training iterations during which the imitation loss is 0 (official: 400).
        mask_mode: "fgfi" (the paper's mask), "gt_box" (locations inside a GT box) or "full"
            (everywhere) -- the paper's baselines.
        level_policy: "assigned" -- each GT counts only on its FPN level, floor(4 + log2(sqrt(wh)/224))
            clamped to the imitated levels (what the paper's author answered for FPN); "per_level" --
            every GT on every level, its best IoU taken within that level.
        adapter: "3x3" (official) or "1x1"; adapter_relu: ReLU after it (official, for post-ReLU
            features; off by default since FPN outputs can be negative).
        channels: [(student_channels, teacher_channels)] per level, for detectors whose modules do
            not say (torchvision backbones expose ``out_channels``).
        offset: IoU pixel convention (0: torchvision's).
        sparse_adaptation: compute a k x k conv adapter (k = 1 or 3, +ReLU) and the loss only at the
            masked locations (fgd.ops.masked_adapt_loss: cost in proportion to N_p, no dense adapted
            map); False forces the dense conv2d + imitation_loss. Same values either way.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        teacher_layers: Optional[Sequence[str]] = None,
        student_layers: Optional[Sequence[str]] = None,
        anchors_fn: Optional[Callable[[Tensor, list], list]] = None,
        channels: Optional[Sequence[tuple]] = None,
        imitation_weight: float = 0.01,
        thresh: float = 0.5,
        warmup_iters: int = 400,
        mask_mode: str = "fgfi",
        level_policy: str = "assigned",
        adapter: str = "3x3",
        adapter_relu: bool = False,
        offset: float = 0.0,
        sparse_adaptation: bool = True,
    ):
        super().__init__()
        for name, value, allowed in (("mask_mode", mask_mode, MASK_MODES),
                                     ("level_policy", level_policy, LEVEL_POLICIES),
                                     ("adapter", adapter, ADAPTERS)):
            if value not in allowed:
                raise ValueError(f"fgd.Distiller: {name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= thresh < 1.0:
            raise ValueError(f"fgd.Distiller: thresh must be in [0, 1), got {thresh}")
        if imitation_weight < 0 or not math.isfinite(imitation_weight):
            raise ValueError(f"fgd.Distiller: imitation_weight must be >= 0, got {imitation_weight}")
        if int(warmup_iters) != warmup_iters or warmup_iters < 0:
            raise ValueError(f"fgd.Distiller: warmup_iters must be an int >= 0, got {warmup_iters}")
        self.student = student
        # The teacher is not a registered submodule: it stays out of parameters() (so an optimizer
        # over d.parameters() never sees it) and out of the state dict; _apply moves it along.
        self._teacher = [teacher.eval().requires_grad_(False)]
        self.imitation_weight = float(imitation_weight)
        self.thresh = float(thresh)
        self.warmup_iters = int(warmup_iters)
        self.mask_mode = mask_mode
        self.level_policy = level_policy
        self.offset = float(offset)
        self.sparse_adaptation = bool(sparse_adaptation)
        self.iteration = 0

        generic = teacher_layers is not None or student_layers is not None or anchors_fn is not None
        if generic:
            if teacher_layers is None or student_layers is None or anchors_fn is None:
                raise ValueError("fgd.Distiller: for a custom detector pass teacher_layers, "
                                 "student_layers and anchors_fn together")
            self.torchvision = False
            self.teacher_layers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
            self.student_layers = [student_layers] if isinstance(student_layers, str) else list(student_layers)
            self.anchors_fn = anchors_fn
            s_mods = {p: _module(student, p, "student") for p in self.student_layers}
            t_mods = {p: _module(teacher, p, "teacher") for p in self.teacher_layers}
            if channels is None:
                channels = self._infer_channels(s_mods, t_mods)
        else:
            for role, m in (("teacher", teacher), ("student", student)):
                if not _is_torchvision_detector(m):
                    raise TypeError(
                        f"fgd.Distiller: the {role} ({type(m).__name__}) is not a torchvision detector with "
                        "a transform, a backbone and an anchor generator; for other detectors pass "
                        "teacher_layers=, student_layers= and anchors_fn=")
            if _transform_key(teacher.transform) != _transform_key(student.transform):
                raise ValueError(
                    "fgd.Distiller: the teacher's and the student's transforms differ "
                    f"(teacher: {teacher.transform!r}; student: {student.transform!r}). The teacher sees the "
                    "student's transformed batch, so its features would not match what it was trained on: "
                    "build both with the same min_size, max_size, image_mean, image_std and size_divisible")
            self.torchvision = True
            self.teacher_layers = ["backbone"]
            self.student_layers = ["backbone"]
            self.anchors_fn = None
            if channels is None:
                levels = len(_anchor_generator(student).sizes)
                channels = [(student.backbone.out_channels, teacher.backbone.out_channels)] * levels
        k = 3 if adapter == "3x3" else 1
        self.adapters = nn.ModuleList(Adapter(cs, ct, k, adapter_relu) for cs, ct in channels)
        # What the last training step computed, for logging and visualisation (not in the loss dict).
        self.last_level_losses: list = []
        self.last_num_pos: list = []
        self.last_masks: list = []

    # ---- the teacher stays frozen -------------------------------------------------------------

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def get_extra_state(self):
        return {"iteration": self.iteration}

    def set_extra_state(self, state):
        self.iteration = int(state["iteration"])

    def _infer_channels(self, s_mods, t_mods):
        def out_channels(m, path, role):
            c = getattr(m, "out_channels", None)
            if not isinstance(c, int):
                raise ValueError(f"fgd.Distiller: cannot tell the channels of {role} module {path!r}; "
                                 "pass channels=[(student_channels, teacher_channels), ...] per level")
            return c
        if len(s_mods) != len(t_mods):
            raise ValueError("fgd.Distiller: cannot pair the levels of student_layers "
                             f"{list(s_mods)} and teacher_layers {list(t_mods)} to infer their channels; "
                             "pass channels=[(student_channels, teacher_channels), ...] per level")
        return [(out_channels(sm, sp, "student"), out_channels(tm, tp, "teacher"))
                for (sp, sm), (tp, tm) in zip(s_mods.items(), t_mods.items())]

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, images, targets=None):
        """Training: the student's loss dict plus ``loss_imitation``. Eval: the student's output."""
        if not self.training:
            return self.student(images) if targets is None else self.student(images, targets)
        if targets is None:
            raise ValueError("fgd.Distiller: training needs targets (a list of dicts with 'boxes')")
        step = self.iteration
        warm = step < self.warmup_iters
        if self.torchvision:
            losses, s_feats, t_feats, anchors, boxes, image_size = self._torchvision_step(images, targets, warm)
        else:
            losses, s_feats, t_feats, anchors, boxes, image_size = self._generic_step(images, targets, warm)
        if not isinstance(losses, dict):
            raise TypeError(f"fgd.Distiller: the student returned {type(losses).__name__} in training "
                            "mode; expected a dict of losses")
        if warm:
            # Zero, but through every adapter, so DDP sees all parameters used and no teacher runs.
            zero = sum(p.sum() for p in self.adapters.parameters()) * 0.0
            self.last_level_losses, self.last_num_pos, self.last_masks = [], [], []
        else:
            zero = None
        losses = dict(losses)
        losses["loss_imitation"] = zero if warm else self._imitation(s_feats, t_feats, anchors, boxes, image_size)
        # counted only now: a forward that raised (bad targets, OOM) must not shorten the warm-up
        self.iteration = step + 1
        return losses

    def _torchvision_step(self, images, targets, warm):
        student = self.student
        with _recording({"transform": student.transform, "features": student.backbone}) as seen:
            losses = student(images, targets)
        if warm:
            return losses, None, None, None, None, None
        image_list, tv_targets = seen["transform"]
        s_feats = _flatten(seen["features"], "the student's backbone")
        batch = image_list.tensors
        with torch.no_grad():
            t_param = next(self.teacher.parameters(), None)
            t_in = batch.to(t_param.dtype) if t_param is not None and t_param.is_floating_point() else batch
            t_all = _flatten(self.teacher.backbone(t_in), "the teacher's backbone")
            t_feats = [self._same_stride(f, t_all, lvl) for lvl, f in enumerate(s_feats)]
            anchors = level_anchors(student, image_list, s_feats)
        return losses, s_feats, t_feats, anchors, [t["boxes"] for t in tv_targets], batch.shape[-2:]

    @staticmethod
    def _same_stride(s_feat, t_feats, lvl):
        """The teacher's FPN level of the student's stride (a MobileNetV3-FPN student has only the
        coarse levels of a ResNet-FPN teacher): both saw the same padded batch, so equal sizes."""
        for t in t_feats:
            if t.shape[-2:] == s_feat.shape[-2:]:
                return t
        raise ValueError(
            f"fgd.Distiller: the student's FPN level {lvl} is {tuple(s_feat.shape[-2:])} but the teacher's "
            f"levels are {[tuple(t.shape[-2:]) for t in t_feats]}: the teacher has no level of that stride")

    def _generic_step(self, images, targets, warm):
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise TypeError("fgd.Distiller: with custom layers, images must be one batched tensor [B, C, H, W]")
        s_mods = {p: _module(self.student, p, "student") for p in self.student_layers}
        with _recording(s_mods) as seen:
            losses = self.student(images, targets)
        if warm:
            return losses, None, None, None, None, None
        s_feats = [f for p in self.student_layers for f in _flatten(seen[p], f"student module {p!r}")]
        t_mods = {p: _module(self.teacher, p, "teacher") for p in self.teacher_layers}
        with torch.no_grad(), _recording(t_mods) as tseen:
            t_param = next(self.teacher.parameters(), None)
            self.teacher(images.to(t_param.dtype) if t_param is not None else images)
        t_feats = [f for p in self.teacher_layers for f in _flatten(tseen[p], f"teacher module {p!r}")]
        with torch.no_grad():
            anchors = [a.float() for a in self.anchors_fn(images, s_feats)]
        return losses, s_feats, t_feats, anchors, [t["boxes"] for t in targets], images.shape[-2:]

    # ---- masks and loss -------------------------------------------------------------------------

    def _imitation(self, s_feats, t_feats, anchors, boxes, image_size) -> Tensor:
        n = len(self.adapters)
        if not (len(s_feats) == len(t_feats) == len(anchors) == n):
            raise ValueError(
                f"fgd.Distiller: {len(s_feats)} student features ({self.student_layers}), {len(t_feats)} "
                f"teacher features ({self.teacher_layers}), {len(anchors)} anchor levels and {n} "
                "adaptation layers: they must be one per imitated level")
        masks = self.masks(anchors, boxes, [f.shape[-2:] for f in s_feats], image_size)
        total, self.last_level_losses, self.last_num_pos = None, [], []
        for lvl, (s, t, mask, adapt) in enumerate(zip(s_feats, t_feats, masks, self.adapters)):
            if s.shape[-2:] != t.shape[-2:] or s.shape[0] != t.shape[0]:
                raise ValueError(
                    f"fgd.Distiller: level {lvl}: the student feature ({self.student_layers}) has shape "
                    f"{tuple(s.shape)} and the teacher's ({self.teacher_layers}) {tuple(t.shape)}; the batch "
                    "and spatial sizes must match (the channels may differ)")
            conv = adapt.conv if isinstance(adapt, Adapter) else None
            if conv is not None and (conv.in_channels, conv.out_channels) != (s.shape[1], t.shape[1]):
                raise ValueError(
                    f"fgd.Distiller: level {lvl}: the adaptation layer maps {conv.in_channels} to "
                    f"{conv.out_channels} channels but the student feature has {s.shape[1]} and the "
                    f"teacher's {t.shape[1]}")
            if self.sparse_adaptation and _sparse_ok(conv):
                loss = ops.masked_adapt_loss(s, t.detach().to(s.dtype), mask, conv.weight, conv.bias,
                                             relu=adapt.relu)
            else:
                a = adapt(s)
                if a.shape[1] != t.shape[1]:
                    raise ValueError(f"fgd.Distiller: level {lvl}: the adaptation layer gives {a.shape[1]} "
                                     f"channels but the teacher feature has {t.shape[1]}")
                loss = ops.imitation_loss(a, t.detach().to(a.dtype), mask)
            self.last_level_losses.append(loss.detach())
            self.last_num_pos.append(mask.sum().detach())
            total = loss if total is None else total + loss.to(total.dtype)
        self.last_masks = [m.detach() for m in masks]
        return self.imitation_weight * total

    def masks(self, anchors: Sequence[Tensor], boxes: Sequence[Tensor], feat_sizes, image_size) -> list:
        """The imitation mask of every level (bool [B, H_l, W_l]) under this distiller's settings."""
        return imitation_masks(anchors, boxes, feat_sizes, image_size, mask_mode=self.mask_mode,
                               level_policy=self.level_policy, thresh=self.thresh, offset=self.offset)


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
