"""The generic path: imitate the outputs of named modules of any detector (forward hooks)."""
from __future__ import annotations

import contextlib
import difflib
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn


class Found(NamedTuple):
    """What an adapter finds for one batch: the core's inputs (see FeatureImitation.forward)."""

    student_feats: list
    teacher_feats: list
    anchors: list
    boxes: object        # GTBoxes, or one [n_i, 4] tensor per image
    image_size: tuple


def find_module(root: nn.Module, path: str, role: str, who: str = "fgd.Distiller") -> nn.Module:
    names = dict(root.named_modules())
    if path in names:
        return names[path]
    close = difflib.get_close_matches(path, [n for n in names if n], n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"{who}: {role} has no module {path!r}.{hint}")


def flatten(out, where: str, who: str = "fgd.Distiller") -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and all(isinstance(o, Tensor) for o in out):
        return list(out)
    raise TypeError(f"{who}: {where} returned {type(out).__name__}; expected a tensor, "
                    "or a dict / list / tuple of tensors (one per imitated level)")


@contextlib.contextmanager
def recording(modules: dict):
    """Forward hooks that store each module's output, removed on exit whatever happens."""
    seen = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out))
               for key, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def as_teacher_input(teacher: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the dtype of the teacher's parameters (a half-precision teacher under fp32 training)."""
    p = next(teacher.parameters(), None)
    return x.to(p.dtype) if p is not None and p.is_floating_point() else x


class HookTaps:
    """Features of the modules at dotted paths, anchors from ``anchors_fn(images, student_features)``;
    the teacher runs whole, on the same batched ``images``."""

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_layers, student_layers,
                 anchors_fn: Callable, channels=None):
        self.teacher_layers = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers)
        self.student_layers = [student_layers] if isinstance(student_layers, str) else list(student_layers)
        self.anchors_fn = anchors_fn
        # resolved once: the modules a step records
        self.s_mods = {p: find_module(student, p, "student") for p in self.student_layers}
        self.t_mods = {p: find_module(teacher, p, "teacher") for p in self.teacher_layers}
        self.channels = list(channels) if channels is not None else self._infer_channels(self.s_mods, self.t_mods)
        self.names = (str(self.student_layers), str(self.teacher_layers))

    @staticmethod
    def _infer_channels(s_mods, t_mods) -> list:
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

    def run(self, teacher: nn.Module, student: nn.Module, images, targets, warm: bool):
        """(the student's losses, Found or None during the warm-up: no teacher runs then)."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise TypeError("fgd.Distiller: with custom layers, images must be one batched tensor [B, C, H, W]")
        with recording(self.s_mods) as seen:
            losses = student(images, targets)
        if warm:
            return losses, None
        s_feats = [f for p in self.student_layers for f in flatten(seen[p], f"student module {p!r}")]
        with torch.no_grad(), recording(self.t_mods) as tseen:
            teacher(as_teacher_input(teacher, images))
        t_feats = [f for p in self.teacher_layers for f in flatten(tseen[p], f"teacher module {p!r}")]
        with torch.no_grad():
            anchors = [a.float() for a in self.anchors_fn(images, s_feats)]
        return losses, Found(s_feats, t_feats, anchors, [t["boxes"] for t in targets], tuple(images.shape[-2:]))
