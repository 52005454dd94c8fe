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

The teacher's .pt is read as data (Ultralytics' restricted load, what ``ULTRALYTICS_SAFE_LOAD=1``
does, for the teacher only): a file whose pickle would run code or build classes other than
Ultralytics' and torch's model classes is refused with an error naming it. ``fgfi_trust_teacher=True``
unpickles it in full instead, as Ultralytics does by default; only for files you trust.

Multi-GPU (``device="0,1"``): Ultralytics rebuilds the trainer in each DDP worker from
``vars(trainer.args)``; the fgfi_* settings given ride in those arguments to the workers.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import pickle
import re
import threading
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.distill_model import DistillationModel
from ultralytics.utils import LOGGER

from ..distill.core import FeatureImitation, GTBoxes, imitation_masks
from ..distill.settings import ImitationSettings, SettingsError, door_keys, from_door, to_door
from ..runlog import RunLog

__all__ = ["FGFITrainer", "FGFIDistillationModel", "YoloFinder", "fgfi_settings", "imitation_settings",
           "load_teacher", "point_anchors", "yolo_boxes", "yolo_masks"]

# The method's settings as fgfi_* keys (fgd.distill.settings.NAMES; Ultralytics' defaults there too).
SETTING_KEYS = door_keys("ultralytics")
# This adapter's own settings: how it makes anchors for an anchor-free head, and Ultralytics' own KD.
ADAPTER_DEFAULTS = {
    "fgfi_anchor_scale": 8.0,       # a number or a list of numbers: boxes of side scale x stride
    "fgfi_anchor_ratios": (1.0,),   # height / width of each box
    "fgfi_ultralytics_kd": False,   # also Ultralytics' score-weighted loss (weight `dis`)
    "fgfi_trust_teacher": False,    # unpickle the teacher's .pt in full (code in it runs) instead of as data
}
BOOL_KEYS = ("fgfi_ultralytics_kd", "fgfi_trust_teacher")


def _positive_numbers(value, key) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                             for v in values):
        raise SettingsError(f"FGFITrainer: {key} must be a positive number or a list of them, got {value!r}")
    return tuple(float(v) for v in values)


def fgfi_settings(kwargs: dict) -> tuple:
    """(every fgfi_* setting, defaults filled in, the other keyword arguments) of ``train(**kwargs)``.
    An unknown ``fgfi_*`` key or a bad value raises ValueError naming it."""
    given = {k: v for k, v in kwargs.items() if k.startswith("fgfi_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith("fgfi_")}
    known = [*SETTING_KEYS, *ADAPTER_DEFAULTS]
    for k in given:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(f"FGFITrainer: unknown setting {k!r}{hint}; the settings are {', '.join(known)}")
    method = from_door({k: v for k, v in given.items() if k in SETTING_KEYS}, "ultralytics")
    s = {**to_door(method, "ultralytics"), **ADAPTER_DEFAULTS, **{k: v for k, v in given.items() if k in ADAPTER_DEFAULTS}}
    for k in BOOL_KEYS:
        if not isinstance(s[k], bool):
            raise SettingsError(f"FGFITrainer: {k} must be True or False, got {s[k]!r}")
    s["fgfi_anchor_scale"] = _positive_numbers(s["fgfi_anchor_scale"], "fgfi_anchor_scale")
    s["fgfi_anchor_ratios"] = _positive_numbers(s["fgfi_anchor_ratios"], "fgfi_anchor_ratios")
    return s, rest


def imitation_settings(s: dict) -> ImitationSettings:
    """The method's settings of an fgfi_* dict (``fgfi_settings``' first value, or one a run saved:
    a key it lacks takes Ultralytics' default)."""
    return from_door({k: v for k, v in s.items() if k in SETTING_KEYS}, "ultralytics")


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


def yolo_boxes(batch: dict, height: int, width: int) -> GTBoxes:
    """The batch's GT boxes, xyxy in pixels of ``batch["img"]``, padded per image, from Ultralytics'
    normalised xywh ``batch["bboxes"]`` and ``batch["batch_idx"]``, without a read back to the host
    (the padding is as long as the batch's number of boxes)."""
    n = batch["img"].shape[0]
    idx = batch["batch_idx"].view(-1).long()
    xywh = batch["bboxes"].view(-1, 4).float() * torch.tensor([width, height, width, height],
                                                               device=batch["bboxes"].device)
    xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], dim=1)
    order = torch.argsort(idx, stable=True)  # Ultralytics' collate keeps them by image already
    idx, xyxy = idx[order], xyxy[order]
    counts = torch.bincount(idx, minlength=n)
    slot = torch.arange(len(idx), device=idx.device) - (torch.cumsum(counts, 0) - counts)[idx]
    boxes = xyxy.new_zeros(n, len(idx), 4)
    boxes[idx, slot] = xyxy
    return GTBoxes(boxes, counts)


class YoloFinder:
    """Where FGFI's inputs are in a YOLO batch: the point anchors of each level (made once per
    feature size and device) and the batch's GT boxes. The trainer's loss and ``yolo_masks`` use it."""

    def __init__(self, strides: Sequence[float], scales=(8.0,), ratios=(1.0,)):
        # fixed for the model's life: read once, so no step reads a device tensor back to the host
        self.strides = [float(x) for x in strides]
        self.scales, self.ratios = tuple(scales), tuple(ratios)
        self._anchors: dict = {}  # (feature sizes, device) -> anchors per level

    def __getstate__(self):
        return {**self.__dict__, "_anchors": {}}  # made again where it is unpickled

    def anchors(self, feat_sizes, device) -> list:
        key = (tuple(tuple(int(x) for x in fs) for fs in feat_sizes), device)
        if key not in self._anchors:  # multi_scale changes the size between batches
            stand_ins = [torch.empty(1, 1, *fs, device=device) for fs in key[0]]
            self._anchors[key] = point_anchors(stand_ins, self.strides, self.scales, self.ratios)
        return self._anchors[key]

    def find(self, batch: dict, feat_sizes) -> tuple:
        """(anchors per level, GTBoxes, (H, W)): what the core needs of a batch besides its features."""
        H, W = batch["img"].shape[-2:]
        return self.anchors(feat_sizes, batch["img"].device), yolo_boxes(batch, H, W), (H, W)


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


class FGFITeacherError(RuntimeError):
    pass


def load_teacher(path, channels: int = 3, trust: bool = False) -> torch.nn.Module:
    """The teacher's model (float, eval) of an Ultralytics .pt, as DistillationModel would load it.

    Unless ``trust``, the file is read as data: Ultralytics' own restricted load (``torch.load(
    weights_only=True)`` allowing only its and torch's model classes, as ``ULTRALYTICS_SAFE_LOAD=1``),
    so a pickle that would run code raises FGFITeacherError instead. ``trust``: Ultralytics' full
    unpickling (``load_checkpoint``), for files you trust."""
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import _SafeLoad, load_checkpoint, torch_safe_load
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.checks import REMOTE_FILE_PREFIXES, check_file
    from ultralytics.utils.torch_utils import restore_qat

    if trust:
        model = load_checkpoint(path)[0]
    else:
        if str(path).lower().startswith(REMOTE_FILE_PREFIXES):
            path = check_file(path, download_dir=SETTINGS["weights_dir"])
        refused = (f"FGFITrainer: the teacher {path} is not plain model data: fgd reads the teacher's .pt as data "
                   "(Ultralytics' restricted load) and this file")
        opt_out = "; if you trust this file, pass fgfi_trust_teacher=True to unpickle it in full (code in it runs)"
        try:
            ckpt, _ = torch_safe_load(path, safe_only=True)
        except TypeError as e:
            if not isinstance(e.__cause__, pickle.UnpicklingError):
                raise  # not a checkpoint at all (empty, truncated, TorchScript): Ultralytics' message says so
            what = ", ".join(re.findall(r"GLOBAL (\S+)", str(e.__cause__))) or "types outside the allow-list"
            raise FGFITeacherError(f"{refused} needs {what}{opt_out}") from None
        model = ckpt.get("ema") or ckpt.get("model")
        if not isinstance(model, torch.nn.Module):
            raise FGFITeacherError(f"{refused} holds no model{opt_out}")
        # what load_checkpoint does after its (full) load, for a model that only runs forward
        model = model.float()
        if ckpt.get("modelopt"):
            restore_qat(model, ckpt["modelopt"])
        model.args = {**DEFAULT_CFG_DICT, **ckpt.get("train_args", {})}
        model.pt_path = str(path)
        model.eval()
        for m in model.modules():
            if hasattr(m, "inplace"):
                m.inplace = True
    if model.yaml.get("channels", 3) != channels:  # as DistillationModel: rebuilt for the student's input channels
        # restricted as the load was: the rebuild would otherwise eval() the yaml's activation string
        with contextlib.nullcontext() if trust else _SafeLoad.loading(path):
            weights, model = model, type(model)(model.yaml.copy(), ch=channels, nc=model.yaml["nc"], verbose=False)
        model.load(weights)
    return model


class FGFIDistillationModel(DistillationModel):
    """Ultralytics' DistillationModel whose loss is FGFI on the neck levels (``self.fgfi``: fgd's
    FeatureImitation), plus Ultralytics' own score-weighted loss when ``fgfi_ultralytics_kd``."""

    def __init__(self, teacher_model, student_model, settings: dict):
        if isinstance(teacher_model, (str, Path)):  # DistillationModel would unpickle the path in full
            teacher_model = load_teacher(teacher_model, student_model.yaml.get("channels", 3),
                                         trust=settings.get("fgfi_trust_teacher", False))
        super().__init__(teacher_model, student_model)
        self.fgfi_settings = dict(settings)
        n = len(self.feats_idx) - 1  # the neck levels (the last index is the Detect head)
        # the dummy forward of DistillationModel.__init__ left each level's output in the hooks' dicts
        channels = [(self.decouple_outputs(self._student_feats[i]).shape[1],
                     self.decouple_outputs(self._teacher_feats[i]).shape[1]) for i in range(n)]
        self._student_feats.clear()
        self._teacher_feats.clear()
        self.fgfi = FeatureImitation(channels, imitation_settings(settings), who="FGFITrainer").to(
            next(student_model.parameters()).device)
        self.finder = YoloFinder(student_model.stride, settings["fgfi_anchor_scale"], settings["fgfi_anchor_ratios"])
        # The last training step's ImitationResult: FGFITrainer's per-epoch log reads it after each batch
        # (Ultralytics' trainer takes only the loss and its items from a step).
        self.last_imitation = None

    @property
    def strides(self) -> list:
        return self.finder.strides

    def __getstate__(self):
        state = super().__getstate__()
        state["last_imitation"] = None  # the last step's masks and losses: not for checkpoints
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
            result = core(s_feats, t_feats, *self.finder.find(batch, [f.shape[-2:] for f in s_feats]),
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
        for event, callback in (("on_train_batch_end", FGFITrainer._record_batch),
                                ("on_train_epoch_end", FGFITrainer._log_epoch)):
            if callback not in self.callbacks[event]:  # a DDP worker is given the launcher's callbacks
                self.add_callback(event, callback)

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
            trust = "fgfi_trust_teacher"  # a permission of this call for the teacher's file, not a setting of the run
            changed = {k: self.fgfi[k] for k in sorted(self._fgfi_given - {trust}) if self.fgfi[k] != saved.get(k)}
            if changed:
                LOGGER.warning(f"FGFITrainer: resume keeps the run's FGFI settings; ignoring {changed}")
            # checked again; keys added since it was saved take their defaults
            self.fgfi = {**fgfi_settings(saved)[0], trust: self.fgfi[trust]}
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
        core.total_iterations = iterations  # for the automatic warm-up (fgfi_warmup=None)
        # Ultralytics resumes at an epoch boundary: the imitation's iteration counter follows it
        core.iteration = self.start_epoch * len(self.train_loader)
        from ultralytics.utils import RANK

        self._fgfi_log = RunLog(self.save_dir / "fgfi.csv", key="epoch", start=self.start_epoch, main=RANK in {-1, 0})
        s = core.settings
        LOGGER.info(f"FGFI: warm-up {core.warmup_iters} of {iterations} iterations (from {core.iteration}); "
                    f"lambda {s.imitation_weight}, psi {s.params.thresh}, mask {s.params.mask_mode}, levels "
                    f"{s.params.level_policy}, anchors {self.fgfi['fgfi_anchor_scale']} x stride, ratios "
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
        with _claiming(), self._settings_in_args():
            return super().train()

    @contextlib.contextmanager
    def _settings_in_args(self):
        """The fgfi_* settings given, in self.args while a DDP launch writes its worker file: each worker
        rebuilds the trainer as FGFITrainer(overrides=vars(args)) and would otherwise get the defaults.
        Only then, as Ultralytics' validator refuses keys it does not know (the launching process itself
        trains nothing)."""
        given = {k: self.fgfi[k] for k in sorted(self._fgfi_given)} if self.ddp else {}
        vars(self.args).update(given)
        try:
            yield
        finally:
            for k in given:
                vars(self.args).pop(k, None)

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
        LOGGER.info(f"FGFI epoch {trainer.epoch + 1}: imitation loss per level {[round(x, 4) for x in loss]}, "
                    f"N_p per level (mean per batch) {[round(x, 1) for x in num_pos]}")
        trainer._fgfi_log.log({"epoch": trainer.epoch + 1, **{f"loss_l{i}": v for i, v in enumerate(loss)},
                               **{f"num_pos_l{i}": v for i, v in enumerate(num_pos)}})


def yolo_masks(batch: dict, strides: Sequence[float], **settings) -> list:
    """The imitation masks (bool [B, H/stride, W/stride] per level) FGFITrainer would use on
    ``batch`` (after Ultralytics' preprocessing) for a model of these strides; ``settings``: fgfi_*."""
    s, _ = fgfi_settings(settings)
    finder = YoloFinder(strides, s["fgfi_anchor_scale"], s["fgfi_anchor_ratios"])
    H, W = batch["img"].shape[-2:]
    sizes = [(math.ceil(H / st), math.ceil(W / st)) for st in finder.strides]
    anchors, boxes, size = finder.find(batch, sizes)
    return imitation_masks(anchors, boxes, sizes, size, imitation_settings(s).params)


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
    gt = yolo_boxes(batch, *batch["img"].shape[-2:])
    folder = Path(folder)
    paths = []
    for i in range(batch["img"].shape[0]):
        labels = batch["cls"].view(-1)[batch["batch_idx"].view(-1) == i].long()
        paths.append(overlay_masks(batch["img"][i], [m[i] for m in masks], folder / f"{Path(batch['im_file'][i]).stem}_masks.png",
                                   boxes=gt.boxes[i, : int(gt.counts[i])], labels=labels, class_names=[info["names"][k] for k in sorted(info["names"])],
                                   title=Path(batch["im_file"][i]).name))
    return paths
