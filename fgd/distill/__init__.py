"""Fine-grained feature imitation: the framework-free core and its adapters.

``settings``: ImitationSettings, every setting of the method, checked once, and the name table of the
doors (fgd.Distiller's keywords, `fgd train`'s keys, Ultralytics' ``fgfi_*``). ``core``:
FeatureImitation (masks, adaptation layers, the masked loss, warm-up) on per-level features.
``torchvision``: fgd.Distiller for torchvision detectors and ``detector_levels``. ``hooks``: the
generic path for any detector (named modules + an anchors function). ``fgd.integrations.ultralytics``:
Ultralytics YOLO.
"""
from .core import (Adapter, FeatureImitation, GTBoxes, ImitationResult, assign_fpn_levels,  # noqa: F401
                   imitation_masks, masked_adapt_supports)
from .settings import (ADAPTERS, LEVEL_POLICIES, MASK_MODES, METHOD_PARAMS, FGFIParams,  # noqa: F401
                       ImitationSettings, SettingsError, SettingsTypeError)
from .torchvision import Distiller, Levels, detector_levels, level_anchors  # noqa: F401

__all__ = ["Distiller", "FeatureImitation", "ImitationSettings", "FGFIParams", "ImitationResult", "GTBoxes",
           "Adapter", "assign_fpn_levels", "imitation_masks", "masked_adapt_supports", "detector_levels",
           "level_anchors", "Levels", "SettingsError", "SettingsTypeError"]
