"""Fine-grained feature imitation: the framework-free core and its adapters.

``core``: FeatureImitation (masks, adaptation layers, the masked loss, warm-up) on per-level
features. ``torchvision``: fgd.Distiller for torchvision detectors and ``detector_levels``.
``hooks``: the generic path for any detector (named modules + an anchors function).
``fgd.integrations.ultralytics``: Ultralytics YOLO.
"""
from .core import (ADAPTERS, LEVEL_POLICIES, MASK_MODES, Adapter, FeatureImitation, ImitationResult,  # noqa: F401
                   _sparse_ok, assign_fpn_levels, imitation_masks)
from .torchvision import Distiller, Levels, detector_levels, level_anchors  # noqa: F401

__all__ = ["Distiller", "FeatureImitation", "ImitationResult", "Adapter", "assign_fpn_levels", "imitation_masks",
           "detector_levels", "level_anchors", "Levels"]
