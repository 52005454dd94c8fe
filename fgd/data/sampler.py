"""The order of an epoch's samples, fixed by (seed, epoch) alone (fgd.data.seeding), so a run
resumed mid-epoch takes the same samples it would have taken."""
from __future__ import annotations

import math

import numpy as np
import torch

from .seeding import mix_seed

__all__ = ["ResumableSampler"]


class ResumableSampler(torch.utils.data.Sampler):
    """This rank's indices of one epoch, in an order fixed by (seed, epoch) alone.

    Sharded like DistributedSampler: the epoch's order is padded by wrapping around (or cut, with
    ``drop_last``) to a multiple of ``world_size``, and rank r takes positions r, r + world_size, ...
    ``set_start(n)`` skips the first n indices of the next iteration only (resuming mid-epoch).
    """

    def __init__(self, dataset_len: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        for name, value, low in (("dataset_len", dataset_len, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"ResumableSampler: {name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"ResumableSampler: rank must be < world_size ({world_size}), got {rank}")
        self.dataset_len, self.shuffle, self.seed = int(dataset_len), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.epoch, self.start = 0, 0
        if drop_last:
            self.num_samples = self.dataset_len // self.world_size
        else:
            self.num_samples = math.ceil(self.dataset_len / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, position: int) -> None:
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) \
                or not 0 <= position <= self.num_samples:
            raise ValueError(f"ResumableSampler.set_start: position must be an integer in "
                             f"[0, {self.num_samples}], got {position!r}")
        self.start = int(position)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        if order and total > len(order):
            order = (order * math.ceil(total / len(order)))[:total]
        mine = order[:total][self.rank::self.world_size]
        start, self.start = self.start, 0  # the skip is for this one (resumed) pass
        return iter(mine[start:])
