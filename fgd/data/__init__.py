"""The data layer of the training application: a synthetic COCO-format data set, a COCO reader for
torchvision detectors, and the transforms and sampler that make training resumable bit for bit."""
from .coco import CocoDetection, Compose, RandomHorizontalFlip, ResumableSampler, collate_fn
from .shapes import make_shapes_dataset

__all__ = ["make_shapes_dataset", "CocoDetection", "collate_fn", "RandomHorizontalFlip", "Compose",
           "ResumableSampler"]
