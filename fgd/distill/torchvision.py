"""torchvision detectors: where their FPN features, anchors and boxes are, and ``fgd.Distiller``.

    d = fgd.Distiller(teacher, student)            # torchvision Faster R-CNN / RetinaNet
    losses = d(images, targets)                    # the student's losses + "loss_imitation"
    sum(losses.values()).backward()

The distiller records the student's feature maps with forward hooks that exist only while its
forward runs (so ``d.student`` stays a plain model), runs the teacher's backbone on the student's
transformed batch and hands both, with the student's anchors and the batch's GT boxes, to the
framework-free core (``FeatureImitation``). ``detector_levels`` shows the same view of a batch
outside training (``fgd viz``): both go through ``TorchvisionFinder``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .core import FeatureImitation, GTBoxes, ImitationResult
from .hooks import Found, HookTaps, as_teacher_input, flatten, recording
from .settings import ImitationSettings, door_keys, from_door, get


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


def is_torchvision_detector(model: nn.Module) -> bool:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    return (isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform)
            and hasattr(model, "backbone") and _anchor_generator(model) is not None)


def _transform_key(t) -> tuple:
    return (t.min_size, t.max_size, tuple(t.image_mean), tuple(t.image_std), t.size_divisible,
            t.fixed_size)


class TorchvisionFinder:
    """Where a torchvision detector's imitated levels are: every FPN output of its backbone, its
    anchors (made once per padded batch size, feature sizes, device and dtype) and the GT boxes of
    its transformed targets."""

    _MAX_CACHED = 64  # anchor sets kept (one per input size seen)

    def __init__(self, model: nn.Module):
        self.model = model
        self._anchors: dict = {}

    def features(self, backbone_out, role: str = "the backbone") -> list:
        return flatten(backbone_out, role)

    def anchors(self, image_list, feats: Sequence[Tensor]) -> list:
        batch = image_list.tensors
        key = (tuple(batch.shape), tuple(tuple(f.shape[-2:]) for f in feats), batch.device, batch.dtype)
        if key not in self._anchors:
            if len(self._anchors) >= self._MAX_CACHED:
                self._anchors.clear()
            with torch.no_grad():
                self._anchors[key] = level_anchors(self.model, image_list, feats)
        return self._anchors[key]

    @staticmethod
    def boxes(tv_targets, device) -> GTBoxes:
        return GTBoxes.from_list([t["boxes"] for t in tv_targets], device)


class Levels(NamedTuple):
    """A torchvision detector's view of a batch, per FPN level (see ``detector_levels``)."""

    batch: Tensor      # the transformed, padded batch [B, 3, H, W] the backbone saw
    features: list     # [B, C, H_l, W_l] per level
    anchors: list      # [H_l * W_l * K, 4] per level, shared by the batch
    boxes: list        # [n_i, 4] GT boxes per image, in pixels of ``batch``
    masks: list        # bool [B, H_l, W_l] per level (empty without targets)


def detector_levels(model: nn.Module, images, targets=None, settings: Optional[ImitationSettings] = None,
                    **overrides) -> Levels:
    """What FGFI sees of a torchvision detector on a batch: its transformed batch, FPN features,
    anchors, the GT boxes in the batch's pixels and the imitation masks (with ``targets``) under
    ``settings`` (``overrides``: some of them by name, ``mask_mode=`` ...). Runs the transform and the
    backbone only, under the caller's grad mode (the model's mode is left as is)."""
    from .core import imitation_masks

    settings = from_door(overrides, "python", base=settings or ImitationSettings(), who="fgd.distill.detector_levels")
    find = TorchvisionFinder(model)
    image_list, tv_targets = model.transform(list(images), None if targets is None else [dict(t) for t in targets])
    feats = find.features(model.backbone(image_list.tensors))
    anchors = find.anchors(image_list, feats)
    if tv_targets is None:
        return Levels(image_list.tensors, feats, anchors, [], [])
    boxes = find.boxes(tv_targets, image_list.tensors.device)
    masks = imitation_masks(anchors, boxes, [f.shape[-2:] for f in feats], image_list.tensors.shape[-2:],
                            settings.params)
    return Levels(image_list.tensors, feats, anchors, [t["boxes"] for t in tv_targets], masks)


def same_stride(s_feat: Tensor, t_feats: Sequence[Tensor], lvl: int) -> Tensor:
    """The teacher's FPN level of the student's stride (a MobileNetV3-FPN student has only the
    coarse levels of a ResNet-FPN teacher): both saw the same padded batch, so equal sizes."""
    for t in t_feats:
        if t.shape[-2:] == s_feat.shape[-2:]:
            return t
    raise ValueError(
        f"fgd.Distiller: the student's FPN level {lvl} is {tuple(s_feat.shape[-2:])} but the teacher's "
        f"levels are {[tuple(t.shape[-2:]) for t in t_feats]}: the teacher has no level of that stride")


class TorchvisionTaps:
    """Every FPN output of the student's backbone and the teacher's level of the same stride."""

    names = ("['backbone']", "['backbone']")

    def __init__(self, teacher: nn.Module, student: nn.Module, channels=None):
        for role, m in (("teacher", teacher), ("student", student)):
            if not is_torchvision_detector(m):
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
        if channels is None:
            levels = len(_anchor_generator(student).sizes)
            channels = [(student.backbone.out_channels, teacher.backbone.out_channels)] * levels
        self.channels = list(channels)
        self.find = TorchvisionFinder(student)

    def run(self, teacher: nn.Module, student: nn.Module, images, targets, warm: bool):
        """(the student's losses, Found or None during the warm-up: no teacher runs then)."""
        with recording({"transform": student.transform, "features": student.backbone}) as seen:
            losses = student(images, targets)
        if warm:
            return losses, None
        image_list, tv_targets = seen["transform"]
        s_feats = self.find.features(seen["features"], "the student's backbone")
        batch = image_list.tensors
        with torch.no_grad():
            t_all = flatten(teacher.backbone(as_teacher_input(teacher, batch)), "the teacher's backbone")
            t_feats = [same_stride(f, t_all, lvl) for lvl, f in enumerate(s_feats)]
        anchors = self.find.anchors(image_list, s_feats)
        return losses, Found(s_feats, t_feats, anchors, self.find.boxes(tv_targets, batch.device),
                             tuple(batch.shape[-2:]))


def _alias(name: str) -> property:
    path = door_keys("python")[name]
    return property(lambda self: get(self.settings, path),
                    lambda self, v: setattr(self, "settings", self.settings.updated("fgd.Distiller", **{name: v})),
                    doc=f"d.settings' {path}")


class Distiller(nn.Module):
    """Distils ``teacher`` into ``student`` by fine-grained feature imitation (Wang et al., CVPR 2019).

    torchvision Faster R-CNN and RetinaNet work out of the box: every FPN output is imitated (one
    mask, adapter and loss per level), anchors come from the student's own AnchorGenerator and the
    teacher's backbone runs on the student's transformed, padded batch. Any other detector: name the
    modules whose outputs to imitate (``student_layers`` / ``teacher_layers``, dotted paths) and give
    ``anchors_fn(images, student_features) -> [H*W*K, 4] anchors per level``; the teacher then runs
    whole, on the same ``images``.

    The method's settings: ``settings`` (an ``fgd.distill.ImitationSettings``; default the official
    ones), changed by keyword (``imitation_weight``, ``thresh``, ``warmup_iters``, ``mask_mode``,
    ``level_policy``, ``adapter``, ``adapter_relu``, ``offset``, ``sparse_adaptation``, ``method``);
    ``d.settings`` holds them. ``total_iterations``: the run's length, for ``warmup_iters=None`` (a
    tenth of the run). ``channels``: [(student_channels, teacher_channels)] per level, for detectors
    whose modules do not say (torchvision backbones expose ``out_channels``).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        settings: Optional[ImitationSettings] = None,
        *,
        teacher_layers: Optional[Sequence[str]] = None,
        student_layers: Optional[Sequence[str]] = None,
        anchors_fn: Optional[Callable[[Tensor, list], list]] = None,
        channels: Optional[Sequence[tuple]] = None,
        total_iterations: Optional[int] = None,
        **overrides,
    ):
        super().__init__()
        # the settings' errors before any about the models
        settings = from_door(overrides, "python", base=settings or ImitationSettings(), who="fgd.Distiller")
        if teacher_layers is not None or student_layers is not None or anchors_fn is not None:
            if teacher_layers is None or student_layers is None or anchors_fn is None:
                raise ValueError("fgd.Distiller: for a custom detector pass teacher_layers, "
                                 "student_layers and anchors_fn together")
            self.taps = HookTaps(teacher, student, teacher_layers, student_layers, anchors_fn, channels)
        else:
            self.taps = TorchvisionTaps(teacher, student, channels)
        self.student = student
        # Neither the teacher nor the core is a registered submodule: the teacher stays out of
        # parameters() (an optimizer over d.parameters() never sees it) and of the state dict; the
        # core's adapters are registered here, so the state dict keeps the keys saved runs have
        # ("adapters.*", the iteration in this module's extra state). _apply moves the teacher along.
        self._teacher = [teacher.eval().requires_grad_(False)]
        self._core = [FeatureImitation(self.taps.channels, settings, total_iterations=total_iterations,
                                       who="fgd.Distiller")]
        self.adapters = self.imitation.adapters
        # The last training step's per-level values: a convenience for users (a training loop gets
        # the ImitationResult from forward(..., with_result=True)).
        self.last_level_losses: list = []
        self.last_num_pos: list = []
        self.last_masks: list = []

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @property
    def imitation(self) -> FeatureImitation:
        """The framework-free core that holds the settings, the adapters and the iteration."""
        return self._core[0]

    @property
    def settings(self) -> ImitationSettings:
        return self.imitation.settings

    @settings.setter
    def settings(self, value: ImitationSettings) -> None:
        if not isinstance(value, ImitationSettings):
            raise TypeError(f"fgd.Distiller: settings must be an ImitationSettings, got {type(value).__name__}")
        self.imitation.settings = value

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def get_extra_state(self):
        return {"iteration": self.imitation.iteration}

    def set_extra_state(self, state):
        self.imitation.iteration = int(state["iteration"])

    def masks(self, anchors: Sequence[Tensor], boxes, feat_sizes, image_size) -> list:
        """The imitation mask of every level (bool [B, H_l, W_l]) under this distiller's settings."""
        return self.imitation.masks(anchors, boxes, feat_sizes, image_size)

    def forward(self, images, targets=None, *, with_result: bool = False):
        """Training: the student's loss dict plus ``loss_imitation`` -- with ``with_result``, the pair
        (losses, the step's ``ImitationResult``). Eval: the student's output."""
        if not self.training:
            return self.student(images) if targets is None else self.student(images, targets)
        if targets is None:
            raise ValueError("fgd.Distiller: training needs targets (a list of dicts with 'boxes')")
        core = self.imitation
        warm = core.warming_up
        losses, found = self.taps.run(self.teacher, self.student, images, targets, warm)
        if not isinstance(losses, dict):
            raise TypeError(f"fgd.Distiller: the student returned {type(losses).__name__} in training "
                            "mode; expected a dict of losses")
        result: ImitationResult = core.zero() if warm else core(*found, names=self.taps.names)
        self.last_level_losses, self.last_num_pos, self.last_masks = result.level_losses, result.num_pos, result.masks
        core.step()  # only now: a forward that raised (bad targets, OOM) must not shorten the warm-up
        losses = {**losses, "loss_imitation": result.loss}
        return (losses, result) if with_result else losses

    # Thin aliases of the settings most used by name (d.warmup_iters = 0 sets it, checked).
    imitation_weight = _alias("imitation_weight")
    warmup_iters = _alias("warmup_iters")
    sparse_adaptation = _alias("sparse_adaptation")
    thresh = _alias("thresh")
    mask_mode = _alias("mask_mode")
    level_policy = _alias("level_policy")
    offset = _alias("offset")

    @property
    def iteration(self) -> int:
        """Training iterations done (the warm-up counts them)."""
        return self.imitation.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.imitation.iteration = int(value)
