"""Settings of the `fgd` application: one dataclass per command (``TrainConfig`` for `fgd train`,
``DemoConfig`` for `fgd demo`), typed and range-checked wherever they come from (Python, a YAML /
JSON file, flags). The command line's flags are made from these dataclasses (``add_flags``), so a
setting is declared once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Optional

from .distill import settings as imitation
from .distill.settings import ImitationSettings, SettingsError, short


class ConfigError(SettingsError):
    """A setting that is not allowed: one line naming the key, its value and what is allowed."""


class ConfigTypeError(ConfigError, TypeError):
    """A setting of the wrong type."""


# The method's settings under their `fgd train` names (key -> path in ImitationSettings).
IMITATION_KEYS = imitation.door_keys("config")


# What each numeric setting allows beyond its type (None passes wherever the type is Optional).
_RANGES = {
    **{k: (lambda v: v >= 1, ">= 1") for k in ("iterations", "batch_size", "checkpoint_every", "log_every",
                                               "keep_checkpoints", "student_fpn_channels", "teacher_fpn_channels",
                                               "teacher_iterations", "threads", "rois_per_image", "roi_sampling",
                                               "seeds", "train_images", "val_images")},
    **{k: (lambda v: v >= 0, ">= 0") for k in ("weight_decay", "lr_warmup_iters", "num_workers")},
    # below 33 a batch of one square image, padded to 32 by torchvision, reaches the stride-32 stage
    # as 1x1: BatchNorm cannot train on one value per channel
    "image_size": (lambda v: v >= 33, ">= 33"),
    "lr": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    # clip_grad_norm_ scales by max / norm: a negative max reverses every gradient (training climbs
    # the loss) and 0 zeroes them; null turns clipping off
    "grad_clip": (lambda v: v > 0, "> 0 (or null: no clipping)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's seed range)"),
}


def _check_settings(cls, values: dict, skip=()) -> None:
    """TypeError / ValueError naming the setting, its value and what it allows. Flags, YAML and JSON
    all pass here, so "false" or 1 is no bool, 2.5 no count and "abc" no learning rate. ``skip``:
    keys checked elsewhere (the method's settings: ImitationSettings checks them)."""
    hints = typing.get_type_hints(cls)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    for name, value in values.items():
        if name in skip:
            continue
        optional = type(None) in typing.get_args(hints[name])
        if value is None and optional:
            continue
        kind = next((t for t in typing.get_args(hints[name]) if t is not type(None)), hints[name])
        # bool is an int to Python, and an int is a fine float
        ok = isinstance(value, (int, float) if kind is float else kind)
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise ConfigTypeError(f"config: {name} must be {words[kind]}{' or null' if optional else ''}, "
                                  f"got {short(value)} ({type(value).__name__}){imitation.yaml_tip(kind, value)}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"config: {name} must be a finite number, got {short(value)}")
        test, allowed = _RANGES.get(name, (None, None)) if kind in (int, float) else (None, None)
        if test is not None and not test(value):
            raise ConfigError(f"config: {name} must be {allowed}, got {short(value)}")


def _from_dict(cls, d: dict, skip=()):
    """``cls(**d)`` for settings read from a file or flags: unknown keys and bad types or ranges are
    refused here, before anything else runs."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names, key=str)
    if unknown:
        raise ConfigError(f"config: unknown keys {short(unknown, 200)}; known: {sorted(names)}")
    _check_settings(cls, d, skip)
    return cls(**d)


def _flatten_imitation(d: dict) -> dict:
    """A nested ``imitation:`` block (ImitationSettings.to_dict's form: ``imitation_weight``,
    ``warmup_iters``, ``params: {thresh: ...}``, ...) as the flat keys of `fgd train`."""
    d = dict(d)
    block = imitation.flatten(d.pop("imitation"), "config: imitation")
    flat = {imitation.NAMES[path]["config"]: v for path, v in block.items()}
    twice = sorted(set(flat) & set(d))
    if twice:
        raise ConfigError(f"config: {twice} given both flat and in the imitation block; give each once")
    return {**d, **flat}


def _imitation_fields(cls):
    """Adds the method's settings to ``cls`` as flat fields named as `fgd train` names them, with
    that door's defaults and docs (fgd.distill.settings: declared there, once)."""
    for key, path in IMITATION_KEYS.items():
        owner, name = imitation.field_of(path)
        cls.__annotations__[key] = typing.get_type_hints(owner)[name]
        setattr(cls, key, dataclasses.field(default=imitation.door_default("config", path),
                                            metadata={"help": imitation.doc(path)}))
    return cls


@dataclass
@_imitation_fields
class TrainConfig:
    """Everything a run depends on; saved as config.json beside its checkpoints."""

    # data: a COCO json, or a Pascal VOC annotation folder (a VOC tree or a folder of XML files), and
    # the image folder; the split files (VOC ImageSets/Main/*.txt) choose the XML files to read
    train_json: Optional[str] = None
    train_voc: Optional[str] = None
    train_split_file: Optional[str] = None
    train_images: str = ""
    val_json: Optional[str] = None
    val_voc: Optional[str] = None
    val_split_file: Optional[str] = None
    val_images: Optional[str] = None
    classes: Optional[str] = None             # VOC: "name,name,...", the categories in this order
                                              # (default: the names in the training XML, sorted)
    output_dir: str = "runs/train"
    # models
    student_arch: str = "resnet18-fpn"
    student_fpn_channels: int = 64
    detector: str = "fasterrcnn"
    image_size: int = 128
    rois_per_image: int = 128                 # RoIs sampled per image to train the box head
    roi_sampling: int = 2                     # RoIAlign samples per bin side (its CPU backward is slow)
    fpn_norm: bool = False                    # BatchNorm in the FPN (steadier from random init)
    distill: bool = True
    teacher_arch: Optional[str] = None        # trained from scratch first when no checkpoint is given
    teacher_fpn_channels: int = 128
    teacher_checkpoint: Optional[str] = None
    teacher_iterations: Optional[int] = None  # for a teacher trained from scratch (default: iterations)
    # optimisation (official: SGD 0.9 / 5e-4)
    optimizer: str = "sgd"                    # or "adamw" (momentum unused)
    iterations: int = 1000
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_warmup_iters: int = 50
    lr_schedule: str = "cosine"               # or "step": x0.1 at 2/3 and 8/9 of the run
    grad_clip: Optional[float] = 10.0         # max global gradient norm (None: no clipping)
    # imitation: the fields of ImitationSettings (imitation_weight, thresh, imitation_warmup, mask_mode,
    # ...), added by _imitation_fields; TrainConfig.imitation gives them as one ImitationSettings
    # running
    amp: Optional[str] = None                 # "bf16" or "fp16"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    threads: Optional[int] = None
    num_workers: int = 0
    flip: bool = True
    resume: bool = False
    allow_changes: Optional[str] = None       # with resume: settings that may differ from the checkpoint's run
    progress: bool = True

    @property
    def imitation(self) -> ImitationSettings:
        """The method's settings, checked (SettingsError naming the key otherwise)."""
        return imitation.from_door({k: getattr(self, k) for k in IMITATION_KEYS}, "config")

    def resolved_imitation_warmup(self) -> int:
        return self.imitation.warmup_for(self.iterations)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The method's settings may come as flat keys or as a nested ``imitation:`` block."""
        cfg = _from_dict(cls, _flatten_imitation(d) if "imitation" in d else d, skip=IMITATION_KEYS)
        cfg.imitation  # noqa: B018  (checks the method's settings)
        return cfg

    def check(self):
        _check_settings(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                        skip=IMITATION_KEYS)
        self.imitation  # noqa: B018  (checks the method's settings)
        if bool(self.train_json) == bool(self.train_voc):
            raise ConfigError("config: give the training annotations as train_json (COCO) or train_voc "
                              "(Pascal VOC), one of them")
        if not self.train_images:
            raise ConfigError("config: train_images is required")
        if self.val_json and self.val_voc:
            raise ConfigError("config: give val_json (COCO) or val_voc (Pascal VOC), not both")
        if bool(self.val_json or self.val_voc) != bool(self.val_images):
            raise ConfigError("config: give val_images with val_json or val_voc, or none of them")
        for split, source in (("train_split_file", self.train_voc), ("val_split_file", self.val_voc)):
            if getattr(self, split) and not source:
                raise ConfigError(f"config: {split} selects files of a VOC folder: give {split[:-11]}_voc too")
        if self.classes is not None and not [c for c in self.classes.split(",") if c.strip()]:
            raise ConfigError(f"config: classes must name at least one class, got {short(self.classes)}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ConfigError(f"config: amp must be bf16, fp16 or unset, got {short(self.amp)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"config: optimizer must be sgd or adamw, got {short(self.optimizer)}")
        if self.lr_schedule not in ("cosine", "step"):
            raise ConfigError(f"config: lr_schedule must be cosine or step, got {short(self.lr_schedule)}")
        from .models import ARCHS, DETECTORS

        for name, allowed in (("student_arch", ARCHS), ("detector", DETECTORS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.teacher_arch is not None and self.teacher_arch not in ARCHS:
            raise ConfigError(f"config: teacher_arch must be one of {ARCHS}, got {short(self.teacher_arch)}")
        if self.allow_changes is not None:
            names = {f.name for f in dataclasses.fields(self)}
            given = [k.strip() for k in self.allow_changes.split(",") if k.strip()]
            unknown = [k for k in given if k != "*" and k not in names]
            if unknown or not given:
                raise ConfigError(f"config: allow_changes must name settings (comma-separated, or *), got "
                                  f"{', '.join(map(repr, unknown)) if unknown else repr(self.allow_changes)}: "
                                  "not settings of fgd train")
        if self.distill and not (self.teacher_checkpoint or self.teacher_arch):
            raise ConfigError("config: distillation needs teacher_checkpoint or teacher_arch (or set distill: false)")


# ---- command-line flags -----------------------------------------------------------------------

def add_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per field of ``cls`` (--train-json, --no-distill, ...), default None = 'not given',
    so a config file and the flags have one meaning: flags override the file, the file the defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        help_text = (f.metadata.get("help", "") + f" (default: {f.metadata.get('default', f.default)})").strip()
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=None, metavar=base.__name__.upper(),
                                help=help_text)


def given_flags(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def _help(text: str):
    """A demo setting whose None means the preset's value."""
    return dataclasses.field(default=None, metadata={"help": text, "default": "the preset's"})


@dataclass
class DemoConfig:
    """`fgd demo`: settings left at None take the preset's value (``fgd.demo.DEFAULT``, or
    ``fgd.demo.QUICK`` with ``quick``)."""

    out: str = dataclasses.field(default="runs/demo", metadata={"help": "output folder"})
    data: str = dataclasses.field(default="shapes", metadata={"help": "shapes (synthetic, generated) or trees "
                                                                     "(real aerial images: pip install --no-deps deepforest)"})
    quick: bool = dataclasses.field(default=False, metadata={"help": "a tiny run (seconds) that checks "
                                                                     "the pipeline"})
    seeds: int = dataclasses.field(default=1, metadata={"help": "repeat with seeds seed, seed + 1, ...; the "
                                                                "table shows mean and std"})
    seed: int = 0
    ablation: bool = dataclasses.field(default=False, metadata={"help": "also train the paper's baselines "
                                                                        "(imitation on the full map, inside GT boxes)"})
    train_images: Optional[int] = _help("training images")
    val_images: Optional[int] = _help("validation images")
    image_size: Optional[int] = _help("image side in px")
    batch_size: Optional[int] = _help("batch size")
    iterations: Optional[int] = _help("iterations of each student")
    teacher_iterations: Optional[int] = _help("iterations of the teacher")
    teacher_arch: Optional[str] = _help("the teacher's architecture")
    student_arch: Optional[str] = _help("the students' architecture")
    threads: Optional[int] = _help("torch CPU threads (default: torch's)")
    force: bool = dataclasses.field(default=False, metadata={"help": "retrain even where a finished run is "
                                                                     "cached"})

    @classmethod
    def from_dict(cls, d: dict) -> "DemoConfig":
        cfg = _from_dict(cls, d)
        if cfg.data not in ("shapes", "trees"):
            raise ConfigError(f"config: data must be shapes or trees, got {cfg.data!r}")
        return cfg
