"""Transforms of an (image, target) sample, called as ``t(image, target, index)``; random ones
decide from (seed, epoch, index) alone (fgd.data.seeding), so a resumed run transforms alike."""
from __future__ import annotations

from numbers import Real

import numpy as np
import torch

from .seeding import mix_seed

__all__ = ["Compose", "RandomHorizontalFlip"]


class Compose:
    """Applies ``transforms`` in order as ``t(image, target, index)``; ``set_epoch`` reaches each."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def set_epoch(self, epoch: int) -> None:
        for t in self.transforms:
            if hasattr(t, "set_epoch"):
                t.set_epoch(epoch)

    def __call__(self, image, target, index):
        for t in self.transforms:
            image, target = t(image, target, index)
        return image, target

    def __repr__(self):
        return f"Compose({self.transforms!r})"


class RandomHorizontalFlip:
    """Mirrors an image [C, H, W] and its boxes with probability ``p``.

    The decision is a pure function of (seed, epoch, index): the same sample flips the same way in
    a resumed run, in any DataLoader worker, whatever else drew random numbers.
    """

    def __init__(self, p: float = 0.5, seed: int = 0):
        if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be a probability in [0, 1], got {p!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"RandomHorizontalFlip: seed must be an integer, got {seed!r}")
        self.p, self.seed, self.epoch = float(p), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def flips(self, index: int) -> bool:
        return mix_seed(self.seed, self.epoch, index) / 2**64 < self.p

    def __call__(self, image, target, index):
        if not self.flips(index):
            return image, target
        width = image.shape[-1]
        target = dict(target)  # the caller's dict stays as it was
        boxes = target["boxes"]
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image.flip(-1), target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p}, seed={self.seed})"
