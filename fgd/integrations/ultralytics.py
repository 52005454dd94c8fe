"""FGFI for Ultralytics YOLO (needs the ``ultralytics`` extra: ``pip install "fgd-distill[ultralytics]"``).

    from ultralytics import YOLO
    from fgd.integrations.ultralytics import FGFITrainer

    YOLO("yolo26n.yaml").train(data="data.yaml", distill_model="teacher.pt", trainer=FGFITrainer,
                               fgfi_lambda=0.1)

Built on Ultralytics' own ``DistillationModel`` (its hooks on the layers that feed the Detect head,
its frozen teacher, its checkpoint stripping and EMA handling); the loss on those neck levels is
fgd's ``FeatureImitation``. An anchor-free head has no anchors, so each level gets, at every point
of Ultralytics' ``make_anchors`` grid, square boxes of side ``fgfi_anchor_scale x stride`` (one of
8 x stride by default, as ATSS does; ``fgfi_anchor_ratios`` adds aspect ratios), and the paper's rule
runs on them unchanged. The checkpoints the trainer finishes with hold the plain student.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import threading
from typing import Sequence

import torch
from torch import Tensor

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.distill_model import DistillationModel
from ultralytics.utils import LOGGER

from ..distill.core import ADAPTERS, LEVEL_POLICIES, MASK_MODES, FeatureImitation

__all__ = ["FGFITrainer", "FGFIDistillationModel", "fgfi_settings", "point_anchors", "yolo_boxes", "yolo_levels"]

# fgfi_* keyword -> default. fgfi_lambda: Ultralytics' detection loss is a sum per image of gains
# 7.5 / 0.5 / 1.5 on box / cls / dfl (about 7.5 at the start of a run on the shapes data), where
# Faster R-CNN's is about 1, and the imitation loss sums squared errors over the teacher's channels
# (about 22-36 for a trained yolo26s teacher and a fresh yolo26n at 128 px). 0.1 puts lambda * L_imit
# at about 0.35 x the detection loss, the ratio at which fgd's torchvision demo did best (0.4 x, with
# lambda 0.01 / 0.1 / 0.2 tried); the paper's 0.01 is for its Faster R-CNN's scale.
DEFAULTS = {
    "fgfi_psi": 0.5,
    "fgfi_lambda": 0.1,
    "fgfi_warmup": None,            # None: min(400, a tenth of the run's iterations)
    "fgfi_adapter": "3x3",
    "fgfi_mask": "fgfi",
    "fgfi_levels": "assigned",
    "fgfi_anchor_scale": 8.0,       # a number or a list of numbers: boxes of side scale x stride
    "fgfi_anchor_ratios": (1.0,),   # height / width of each box
    "fgfi_ultralytics_kd": False,   # also Ultralytics' score-weighted loss (weight `dis`)
    "fgfi_sparse": True,            # adapter + loss at the masked locations only (masked_adapt_loss)
}
_CHOICES = {"fgfi_adapter": ADAPTERS, "fgfi_mask": MASK_MODES, "fgfi_levels": LEVEL_POLICIES}


def _positive_numbers(value, key) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                             for v in values):
        raise ValueError(f"FGFITrainer: {key} must be a positive number or a list of them, got {value!r}")
    return tuple(float(v) for v in values)


def fgfi_settings(kwargs: dict) -> tuple:
    """(the FGFI settings with defaults filled in, the other keyword arguments) of ``train(**kwargs)``.
    An unknown ``fgfi_*`` key or a bad value raises ValueError naming it."""
    given = {k: v for k, v in kwargs.items() if k.startswith("fgfi_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith("fgfi_")}
    for k in given:
        if k not in DEFAULTS:
            close = difflib.get_close_matches(k, DEFAULTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"FGFITrainer: unknown setting {k!r}{hint}; the settings are {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **given}
    for k, allowed in _CHOICES.items():
        if s[k] not in allowed:
            raise ValueError(f"FGFITrainer: {k} must be one of {allowed}, got {s[k]!r}")
    if not isinstance(s["fgfi_psi"], (int, float)) or not 0.0 <= s["fgfi_psi"] < 1.0:
        raise ValueError(f"FGFITrainer: fgfi_psi must be in [0, 1), got {s['fgfi_psi']!r}")
    if not isinstance(s["fgfi_lambda"], (int, float)) or not math.isfinite(s["fgfi_lambda"]) or s["fgfi_lambda"] < 0:
        raise ValueError(f"FGFITrainer: fgfi_lambda must be a number >= 0, got {s['fgfi_lambda']!r}")
    w = s["fgfi_warmup"]
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        raise ValueError(f"FGFITrainer: fgfi_warmup must be an int >= 0 (or None: automatic), got {w!r}")
    for k in ("fgfi_ultralytics_kd", "fgfi_sparse"):
        if not isinstance(s[k], bool):
            raise ValueError(f"FGFITrainer: {k} must be True or False, got {s[k]!r}")
    s["fgfi_anchor_scale"] = _positive_numbers(s["fgfi_anchor_scale"], "fgfi_anchor_scale")
    s["fgfi_anchor_ratios"] = _positive_numbers(s["fgfi_anchor_ratios"], "fgfi_anchor_ratios")
    return s, rest


def point_anchors(feats: Sequence[Tensor], strides: Sequence[float], scales=(8.0,), ratios=(1.0,)) -> list:
    """Anchors for an anchor-free head: per level [H*W*K, 4] xyxy boxes in pixels, K = len(scales) *
    len(ratios), centred on Ultralytics' anchor points (``make_anchors``: cell centres) and of area
    (scale * stride)^2 with height / width = ratio; location-major like torchvision's anchors."""
    from ultralytics.utils.tal import make_anchors

    out = []
    for f, stride in zip(feats, strides):
        points, _ = make_anchors([f.detach().float()], [float(stride)])  # [H*W, 2], grid units
        centres = points * float(stride)
        wh = torch.tensor([(s * stride / math.sqrt(r), s * stride * math.sqrt(r)) for s in scales for r in ratios],
                          dtype=centres.dtype, device=centres.device)  # [K, 2]
        boxes = torch.cat([centres[:, None] - wh[None] / 2, centres[:, None] + wh[None] / 2], dim=-1)
        out.append(boxes.reshape(-1, 4))
    return out


def yolo_boxes(batch: dict, height: int, width: int) -> list:
    """Each image's GT boxes, xyxy in pixels of ``batch["img"]``, from Ultralytics' normalised xywh
    ``batch["bboxes"]`` and ``batch["batch_idx"]``."""
    n = batch["img"].shape[0]
    idx = batch["batch_idx"].view(-1).long()
    xywh = batch["bboxes"].view(-1, 4).float() * torch.tensor([width, height, width, height],
                                                               device=batch["bboxes"].device)
    xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], dim=1)
    return [xyxy[idx == i] for i in range(n)]


def yolo_levels(feats: Sequence[Tensor], batch: dict, strides: Sequence[float], scales=(8.0,), ratios=(1.0,)):
    """(anchors per level, GT boxes per image, (H, W)): what the core needs of a YOLO batch."""
    H, W = batch["img"].shape[-2:]
    return point_anchors(feats, strides, scales, ratios), yolo_boxes(batch, H, W), (H, W)


# Unpickled FGFI checkpoints refuse to give their projector to anyone but FGFITrainer: Ultralytics'
# own resume path would rebuild a plain DistillationModel from them and drop FGFI without a word.
_CLAIM = threading.local()


@contextlib.contextmanager
def _claiming():
    before = getattr(_CLAIM, "active", False)
    _CLAIM.active = True
    try:
        yield
    finally:
        _CLAIM.active = before


class FGFIResumeError(RuntimeError):
    pass


class FGFIDistillationModel(DistillationModel):
    """Ultralytics' DistillationModel whose loss is FGFI on the neck levels (``self.fgfi``: fgd's
    FeatureImitation), plus Ultralytics' own score-weighted loss when ``fgfi_ultralytics_kd``."""

    def __init__(self, teacher_model, student_model, settings: dict):
        super().__init__(teacher_model, student_model)
        self.fgfi_settings = dict(settings)
        n = len(self.feats_idx) - 1  # the neck levels (the last index is the Detect head)
        # the dummy forward of DistillationModel.__init__ left each level's output in the hooks' dicts
        channels = [(self.decouple_outputs(self._student_feats[i]).shape[1],
                     self.decouple_outputs(self._teacher_feats[i]).shape[1]) for i in range(n)]
        self._student_feats.clear()
        self._teacher_feats.clear()
        warmup = settings["fgfi_warmup"]
        self.fgfi = FeatureImitation(
            channels, imitation_weight=settings["fgfi_lambda"], thresh=settings["fgfi_psi"],
            warmup_iters=400 if warmup is None else warmup, mask_mode=settings["fgfi_mask"],
            level_policy=settings["fgfi_levels"], adapter=settings["fgfi_adapter"],
            sparse_adaptation=settings["fgfi_sparse"], who="FGFITrainer").to(next(student_model.parameters()).device)
        self.last_imitation = None
        # fixed for the model's life: read once, so no step reads a device tensor back to the host
        self.strides = [float(x) for x in student_model.stride]
        self._anchors: dict = {}  # (feature sizes, device) -> anchors per level, made once per input size

    def __getstate__(self):
        state = super().__getstate__()
        state["last_imitation"] = None  # the last step's masks and losses: not for checkpoints
        state["_anchors"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__["_fgd_claimed"] = getattr(_CLAIM, "active", False)

    def __getattr__(self, name):
        if name == "projector" and not self.__dict__.get("_fgd_claimed", True):
            raise FGFIResumeError(
                "this checkpoint is a run distilled with fgd's FGFI; resume it with its trainer: "
                "YOLO(last).train(resume=True, trainer=fgd.integrations.ultralytics.FGFITrainer)")
        return super().__getattr__(name)

    def loss(self, batch, preds=None):
        """Training: the student's detection loss, Ultralytics' KD term (``dis_loss``, 0 unless
        fgfi_ultralytics_kd) and FGFI's (``fgfi_loss``), each summed over the batch as Ultralytics
        does. Validation (the EMA copy, whose teacher is None): the student's loss and two zeros."""
        device = batch["img"].device
        zero = torch.zeros(1, device=device)
        if not self.training:
            loss, items = super().loss(batch, preds)
            items["fgfi_loss"] = zero
            return torch.cat([loss, zero]), items
        core = self.fgfi
        if self.fgfi_settings["fgfi_ultralytics_kd"]:
            loss, items = super().loss(batch)  # runs teacher and student; the hooks keep their features
        else:
            self._teacher_feats.clear()
            self._student_feats.clear()
            if not core.warming_up:
                with torch.no_grad():
                    self.teacher_model(batch["img"])
            loss, items = self.student_model.loss(batch, self.student_model(batch["img"]))
            items["dis_loss"] = zero
            loss = torch.cat([loss, zero])
        if core.warming_up:
            result = core.zero()
        else:
            n = len(self.feats_idx) - 1
            s_feats = [self.decouple_outputs(self._student_feats[i]) for i in range(n)]
            t_feats = [self.decouple_outputs(self._teacher_feats[i]) for i in range(n)]
            H, W = batch["img"].shape[-2:]
            key = (tuple(tuple(f.shape[-2:]) for f in s_feats), s_feats[0].device)
            if key not in self._anchors:  # multi_scale changes the size between batches
                self._anchors[key] = point_anchors(s_feats, self.strides, self.fgfi_settings["fgfi_anchor_scale"],
                                                   self.fgfi_settings["fgfi_anchor_ratios"])
            result = core(s_feats, t_feats, self._anchors[key], yolo_boxes(batch, H, W), (H, W),
                          names=(f"student layer {self.feats_idx[:n]}", f"teacher layer {self.teacher_feats_idx[:n]}"))
        core.step()
        self._student_feats.clear()
        self._teacher_feats.clear()
        self.last_imitation = result
        items["fgfi_loss"] = result.loss.detach().reshape(1)
        return torch.cat([loss, result.loss.reshape(1) * batch["img"].shape[0]]), items


class FGFITrainer(DetectionTrainer):
    """Ultralytics' DetectionTrainer distilling ``distill_model`` into the student with FGFI.

    Settings arrive as ``fgfi_*`` keyword arguments of ``train()`` (see DEFAULTS); they are taken out
    before Ultralytics checks its arguments, kept in the run's checkpoints and restored on resume.
    After each epoch the mean imitation loss and N_p (masked locations) per level are logged and
    appended to ``fgfi.csv`` in the run's folder.
    """

    def __init__(self, cfg=None, overrides=None, _callbacks=None):
        from ultralytics.cfg import DEFAULT_CFG

        overrides = dict(overrides or {})
        self._fgfi_given = {k for k in overrides if k.startswith("fgfi_")}
        self.fgfi, overrides = fgfi_settings(overrides)
        with _claiming():
            super().__init__(DEFAULT_CFG if cfg is None else cfg, overrides, _callbacks)
        if self.args.distill_model is None:
            raise ValueError("FGFITrainer: distill_model (the teacher's .pt) is required")
        self._fgfi_epoch: list = []
        self.add_callback("on_train_batch_end", FGFITrainer._record_batch)
        self.add_callback("on_train_epoch_end", FGFITrainer._log_epoch)

    def setup_model(self):
        """The student (fresh, or the student of the run resumed) inside an FGFIDistillationModel."""
        from ultralytics.nn.tasks import load_checkpoint
        from ultralytics.utils import RANK

        weights = None
        if self.resume and str(self.model).lower().endswith(".pt"):
            with _claiming():
                weights, ckpt = load_checkpoint(self.model)
            if not isinstance(weights, FGFIDistillationModel):
                raise ValueError(f"FGFITrainer: {self.model} is not a run distilled with FGFI; resume it without "
                                 "trainer=FGFITrainer")
            student = self.get_model(cfg=weights.student_model.yaml, weights=weights.student_model,
                                     verbose=RANK in {-1, 0})
            saved = weights.fgfi_settings
            changed = {k: self.fgfi[k] for k in sorted(self._fgfi_given) if self.fgfi[k] != saved.get(k)}
            if changed:
                LOGGER.warning(f"FGFITrainer: resume keeps the run's FGFI settings; ignoring {changed}")
            self.fgfi = saved
        else:
            ckpt = super().setup_model()
            student = self.model
        self.model = student
        self.set_model_attributes()
        student.args = self.args
        model = FGFIDistillationModel(self.args.distill_model, student, self.fgfi)
        if weights is not None:
            model.fgfi.load_state_dict(weights.fgfi.state_dict())
            model.projector.load_state_dict(weights.projector.state_dict())
            model.criterion = None
        self.model = model
        return ckpt

    def _setup_train(self):
        super()._setup_train()
        core = self._core()
        iterations = len(self.train_loader) * self.epochs
        if self.fgfi["fgfi_warmup"] is None:
            core.warmup_iters = min(400, iterations // 10)
        # Ultralytics resumes at an epoch boundary: the imitation's iteration counter follows it
        core.iteration = self.start_epoch * len(self.train_loader)
        LOGGER.info(f"FGFI: warm-up {core.warmup_iters} of {iterations} iterations (from {core.iteration}); "
                    f"lambda {core.imitation_weight}, psi {core.thresh}, mask {core.mask_mode}, levels "
                    f"{core.level_policy}, anchors {self.fgfi['fgfi_anchor_scale']} x stride, ratios "
                    f"{self.fgfi['fgfi_anchor_ratios']}, channels "
                    f"{[(a.conv.in_channels, a.conv.out_channels) for a in core.adapters]}")

    def _core(self) -> FeatureImitation:
        from ultralytics.utils.torch_utils import unwrap_model

        return unwrap_model(self.model).fgfi

    def _handle_nan_recovery(self, epoch):
        with _claiming():
            recovered = super()._handle_nan_recovery(epoch)
            if recovered:  # Ultralytics restores the student and the projector; the adapters too
                from ultralytics.nn.tasks import load_checkpoint

                _, ckpt = load_checkpoint(self.last)
                self._core().load_state_dict(ckpt["ema"].float().fgfi.state_dict())
        return recovered

    def train(self):
        # Unpickled (and deep-copied: the EMA) FGFI models are claimed while this trainer runs
        with _claiming():
            return super().train()

    @staticmethod
    def _record_batch(trainer):
        from ultralytics.utils.torch_utils import unwrap_model

        result = getattr(unwrap_model(trainer.model), "last_imitation", None)
        if result is not None and not result.warming_up:  # kept on the device: no sync per step
            trainer._fgfi_epoch.append(torch.stack([torch.stack([l.float() for l in result.level_losses]),
                                                    torch.stack([n.float() for n in result.num_pos])]))

    @staticmethod
    def _log_epoch(trainer):
        from ultralytics.utils import RANK

        rows, trainer._fgfi_epoch = trainer._fgfi_epoch, []
        if RANK not in {-1, 0}:
            return
        if not rows:
            LOGGER.info(f"FGFI epoch {trainer.epoch + 1}: warm-up (no imitation yet)")
            return
        loss, num_pos = torch.stack(rows).mean(dim=0).tolist()  # per level, mean over the epoch's steps
        levels = len(loss)
        LOGGER.info(f"FGFI epoch {trainer.epoch + 1}: imitation loss per level {[round(x, 4) for x in loss]}, "
                    f"N_p per level (mean per batch) {[round(x, 1) for x in num_pos]}")
        path = trainer.save_dir / "fgfi.csv"
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write(",".join(["epoch"] + [f"loss_l{i}" for i in range(levels)] + [f"num_pos_l{i}" for i in range(levels)]) + "\n")
            f.write(",".join(str(x) for x in [trainer.epoch + 1, *loss, *num_pos]) + "\n")


def yolo_masks(batch: dict, strides: Sequence[float], **settings) -> list:
    """The imitation masks (bool [B, H/stride, W/stride] per level) FGFITrainer would use on
    ``batch`` (after Ultralytics' preprocessing) for a model of these strides; ``settings``: fgfi_*."""
    s, _ = fgfi_settings(settings)
    H, W = batch["img"].shape[-2:]
    stand_ins = [batch["img"].new_empty(1, 1, math.ceil(H / st), math.ceil(W / st)) for st in strides]
    anchors, boxes, size = yolo_levels(stand_ins, batch, strides, s["fgfi_anchor_scale"], s["fgfi_anchor_ratios"])
    from ..distill.core import imitation_masks

    return imitation_masks(anchors, boxes, [f.shape[-2:] for f in stand_ins], size, mask_mode=s["fgfi_mask"],
                           level_policy=s["fgfi_levels"], thresh=s["fgfi_psi"])


def write_mask_pictures(data: str, folder, *, model: str = "yolo26n.yaml", imgsz: int = 640, images: int = 4,
                        split: str = "val", **settings) -> list:
    """One PNG per image of ``split`` (the first ``images``): the image, then each neck level's
    imitation mask in red with the GT boxes, as FGFITrainer would imitate for ``model`` (a yaml or
    .pt: only its strides matter)."""
    from pathlib import Path

    from ultralytics import YOLO
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from ..viz import overlay_masks

    strides = [float(x) for x in YOLO(model).model.stride]
    info = check_det_dataset(data)
    ds = build_yolo_dataset(get_cfg(overrides={"imgsz": imgsz}), info[split], images, info, mode="val", rect=False)
    batch = ds.collate_fn([ds[i] for i in range(min(images, len(ds)))])
    batch["img"] = batch["img"].float() / 255
    masks = yolo_masks(batch, strides, **settings)
    boxes = yolo_boxes(batch, *batch["img"].shape[-2:])
    folder = Path(folder)
    paths = []
    for i in range(batch["img"].shape[0]):
        labels = batch["cls"].view(-1)[batch["batch_idx"].view(-1) == i].long()
        paths.append(overlay_masks(batch["img"][i], [m[i] for m in masks], folder / f"{Path(batch['im_file'][i]).stem}_masks.png",
                                   boxes=boxes[i], labels=labels, class_names=[info["names"][k] for k in sorted(info["names"])],
                                   title=Path(batch["im_file"][i]).name))
    return paths
