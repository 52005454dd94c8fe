"""The method's settings, declared once: ``ImitationSettings``.

Every setting has its default, what it allows and a one-line doc here, and is checked here. The three
doors users come in by name the same settings their own way -- ``fgd.Distiller`` / ``FeatureImitation``
keywords ("python"), ``fgd train``'s config keys and flags ("config") and Ultralytics' ``fgfi_*`` keys
("ultralytics") -- and ``NAMES`` is the one table between them; a door may keep a default of its own
(``DOOR_DEFAULTS``). An invalid value gives the same text through every door, after the door's prefix.

    s = ImitationSettings(imitation_weight=0.1)            # the fields' own names
    s = from_door({"fgfi_lambda": 0.1}, "ultralytics")     # a door's names and defaults
    s.updated(thresh=0.6).params.thresh                    # python names, checked again

``method`` names the method and ``params`` holds that method's own parameters (``METHOD_PARAMS``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Optional

METHOD_PARAMS: dict = {}  # method name -> the dataclass of its own parameters (filled below)
MASK_MODES = ("fgfi", "gt_box", "full")
LEVEL_POLICIES = ("assigned", "per_level")
ADAPTERS = ("3x3", "1x1")
OFFICIAL_WARMUP = 400  # iterations (the official code's)


class SettingsError(ValueError):
    """A setting that is not allowed: one line naming the key as the door names it, the value and
    what is allowed."""


class SettingsTypeError(SettingsError, TypeError):
    """A setting of the wrong type."""


def setting(default, doc: str, allowed: str, test=None):
    """A field of a settings dataclass: ``test(value)`` says whether a value of the right type is
    allowed; ``allowed`` says so in words (the error reads "<key> must be <allowed>, got <value>")."""
    return dataclasses.field(default=default, metadata={"doc": doc, "allowed": allowed, "test": test})


def choice(default, doc: str, choices: tuple):
    return setting(default, doc, f"one of {choices}", lambda v: v in choices)


def short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message never prints a whole value (a YAML
    alias expands to gigabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + " ..."


def check_value(cls, name: str, value, who: str, key: Optional[str] = None) -> None:
    """SettingsError (SettingsTypeError for a wrong type) unless ``value`` is allowed for field
    ``name`` of ``cls``; the message names ``key`` (the field as the door calls it)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    # bool is an int to Python, and an int is a fine float
    ok_type = isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool))
    test = f.metadata.get("test")
    if ok_type and (test is None or test(value)):
        return
    text = f"{who}: {key or name} must be {f.metadata['allowed']}, got {short(value)}"
    if not ok_type:
        raise SettingsTypeError(f"{text} ({type(value).__name__}){yaml_tip(kind, value)}")
    raise SettingsError(text)


def yaml_tip(kind, value) -> str:
    """A hint for a number that arrived as text: PyYAML reads 1e-3 as a string (YAML 1.1 wants a dot)."""
    if kind is float and isinstance(value, str):
        try:
            return f"; in YAML write {float(value)!r}"
        except ValueError:
            pass
    return ""


def _check_all(obj, who: str) -> None:
    for f in dataclasses.fields(obj):
        if f.metadata.get("allowed") is not None:
            check_value(type(obj), f.name, getattr(obj, f.name), who)


@dataclass(frozen=True)
class FGFIParams:
    """FGFI's own parameters: which locations are imitated."""

    thresh: float = setting(0.5, "psi: a location is on where an anchor's IoU with a GT exceeds psi x that GT's "
                                 "best IoU (official: 0.5)", "in [0, 1)", lambda v: 0 <= v < 1)
    mask_mode: str = choice("fgfi", "fgfi: the paper's mask; gt_box: locations inside a GT box; full: every "
                                    "location (the paper's baselines)", MASK_MODES)
    level_policy: str = choice("assigned", "assigned: each GT on its FPN level (FPN's RoI rule); per_level: "
                                           "every GT on every level", LEVEL_POLICIES)
    offset: float = setting(0.0, "IoU pixel convention: 0 (torchvision's) or 1 (the legacy +1)", "0 or 1",
                            lambda v: v in (0, 1))

    def __post_init__(self):
        _check_all(self, "fgd.distill.FGFIParams")


METHOD_PARAMS["fgfi"] = FGFIParams


@dataclass(frozen=True)
class ImitationSettings:
    """Every setting of the method; the defaults are the official code's."""

    method: str = choice("fgfi", "the imitation method", tuple(METHOD_PARAMS))
    imitation_weight: float = setting(0.01, "lambda: the imitation loss's weight (official: 0.01)", "a number >= 0",
                                      lambda v: math.isfinite(v) and v >= 0)
    warmup_iters: Optional[int] = setting(
        OFFICIAL_WARMUP, "iterations during which the imitation loss is 0 (official: 400; None: a tenth of the run, "
                         "at most 400)", "an int >= 0, or None for a tenth of the run (at most 400)", lambda v: v >= 0)
    adapter: str = choice("3x3", "the adaptation layer: a 3x3 (official) or 1x1 conv", ADAPTERS)
    adapter_relu: bool = setting(False, "a ReLU after the adaptation layer (official, for post-ReLU features)",
                                 "True or False")
    sparse_adaptation: bool = setting(True, "the adaptation layer and the loss at the masked locations only (the "
                                            "same values; False: a dense conv)", "True or False")
    params: FGFIParams = dataclasses.field(default_factory=FGFIParams, metadata={"doc": "the method's own parameters"})

    def __post_init__(self):
        _check_all(self, "fgd.distill.ImitationSettings")
        if not isinstance(self.params, METHOD_PARAMS[self.method]):
            raise SettingsTypeError(f"fgd.distill.ImitationSettings: params must be a {METHOD_PARAMS[self.method].__name__} "
                                    f"for method {self.method!r}, got {type(self.params).__name__}")

    def warmup_for(self, total_iterations: Optional[int] = None) -> int:
        """The warm-up in iterations: ``warmup_iters``, or when it is None a tenth of a run of
        ``total_iterations`` (at most the official 400; 400 when the run's length is unknown). The
        one place the automatic warm-up is decided."""
        if self.warmup_iters is not None:
            return self.warmup_iters
        return OFFICIAL_WARMUP if total_iterations is None else min(OFFICIAL_WARMUP, total_iterations // 10)

    def updated(self, who: str = "fgd.distill.ImitationSettings", **names) -> "ImitationSettings":
        """These settings with some changed, given by their python names (``thresh=``, ...)."""
        return from_door(names, "python", base=self, who=who)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, who: str = "fgd.distill.ImitationSettings") -> "ImitationSettings":
        """From ``to_dict``'s form (``params`` a mapping); unknown keys are refused."""
        given = {NAMES[path]["python"]: v for path, v in flatten(d, who).items()}
        return from_door(given, "python", base=cls(), who=who)


# ---- the doors ---------------------------------------------------------------------------------

DOORS = ("python", "config", "ultralytics")
WHO = {"python": "fgd.Distiller", "config": "config", "ultralytics": "FGFITrainer"}

# Each setting (a path into ImitationSettings) under its name at each door.
NAMES = {
    "method": {"python": "method", "config": "method", "ultralytics": "fgfi_method"},
    "imitation_weight": {"python": "imitation_weight", "config": "imitation_weight", "ultralytics": "fgfi_lambda"},
    "warmup_iters": {"python": "warmup_iters", "config": "imitation_warmup", "ultralytics": "fgfi_warmup"},
    "adapter": {"python": "adapter", "config": "adapter", "ultralytics": "fgfi_adapter"},
    "adapter_relu": {"python": "adapter_relu", "config": "adapter_relu", "ultralytics": "fgfi_adapter_relu"},
    "sparse_adaptation": {"python": "sparse_adaptation", "config": "sparse_adaptation", "ultralytics": "fgfi_sparse"},
    "params.thresh": {"python": "thresh", "config": "thresh", "ultralytics": "fgfi_psi"},
    "params.mask_mode": {"python": "mask_mode", "config": "mask_mode", "ultralytics": "fgfi_mask"},
    "params.level_policy": {"python": "level_policy", "config": "level_policy", "ultralytics": "fgfi_levels"},
    "params.offset": {"python": "offset", "config": "offset", "ultralytics": "fgfi_offset"},
}

# Where a door's default differs from the official one (the README lists them). Ultralytics' detection
# loss is a per-image sum with gains 7.5 / 0.5 / 1.5 on box / cls / dfl where the paper's Faster R-CNN's
# is about 1, so its lambda is larger (the README's "lambda for Ultralytics' loss scale" has the
# measurements). A run of `fgd train` or of Ultralytics knows its length: its warm-up is a tenth of it.
DOOR_DEFAULTS = {
    "python": {},
    "config": {"warmup_iters": None},
    "ultralytics": {"imitation_weight": 0.1, "warmup_iters": None},
}


def field_paths() -> list:
    return list(NAMES)


def field_of(path: str):
    """(the dataclass holding the field, its name) of a path."""
    if path.startswith("params."):
        return FGFIParams, path.split(".", 1)[1]
    return ImitationSettings, path


def flatten(d: dict, who: str) -> dict:
    """{path: value} of the settings a nested mapping (``to_dict``'s form, some keys only) gives;
    a key that is no setting is refused."""
    if not isinstance(d, dict):
        raise SettingsTypeError(f"{who}: the imitation settings must be a mapping, got {type(d).__name__}")
    params = d.get("params", {})
    if not isinstance(params, dict):
        raise SettingsTypeError(f"{who}: params must be a mapping, got {type(params).__name__}")
    out = {k: v for k, v in d.items() if k != "params"}
    out.update({f"params.{k}": v for k, v in params.items()})
    unknown = [k for k in out if k not in NAMES]
    if unknown:
        raise SettingsError(f"{who}: unknown imitation settings {unknown}; known: {list(NAMES)}")
    return out


def door_keys(door: str) -> dict:
    """The door's key -> the field path, for every setting."""
    return {names[door]: path for path, names in NAMES.items()}


def door_default(door: str, path: str):
    """A setting's default at a door."""
    if path in DOOR_DEFAULTS[door]:
        return DOOR_DEFAULTS[door][path]
    cls, name = field_of(path)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default


def doc(path: str) -> str:
    cls, name = field_of(path)
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["doc"]


def get(settings: ImitationSettings, path: str):
    obj = settings.params if path.startswith("params.") else settings
    return getattr(obj, field_of(path)[1])


def from_door(values: dict, door: str, base: Optional[ImitationSettings] = None,
              who: Optional[str] = None) -> ImitationSettings:
    """The settings a door's ``values`` (keys as that door names them) give: each value checked and
    named as the door names it; a setting not in ``values`` comes from ``base``, else from the door's
    default. A key that is no setting raises SettingsError with the closest names."""
    who = who or WHO[door]
    keys = door_keys(door)
    unknown = [k for k in values if k not in keys]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(keys), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(f"{who}: unknown setting {unknown[0]!r}{hint}; the settings are {', '.join(keys)}")
    top, params = {}, {}
    for key, path in keys.items():
        if key in values:
            value = values[key]
            check_value(*field_of(path), value, who, key)
        elif base is not None:
            value = get(base, path)
        else:
            value = door_default(door, path)
        (params if path.startswith("params.") else top)[field_of(path)[1]] = value
    return ImitationSettings(**top, params=METHOD_PARAMS[top["method"]](**params))


def to_door(settings: ImitationSettings, door: str) -> dict:
    """The settings as a door's flat keys."""
    return {names[door]: get(settings, path) for path, names in NAMES.items()}
