"""The data layer of the training application: a synthetic COCO-format data set, a COCO reader for
torchvision detectors, a Pascal VOC reader (XML -> COCO), a small real data set of tree crowns
(deepforest's example images, tiled), and the transforms and sampler that make training resumable
bit for bit."""
from .coco import BadImageError, CocoDetection, collate_fn
from .sampler import ResumableSampler
from .shapes import make_shapes_dataset
from .transforms import Compose, RandomHorizontalFlip
from .trees import find_deepforest_data, make_tree_tiles
from .voc import VocDetection, convert_voc, voc_to_coco, write_coco_json

__all__ = ["make_shapes_dataset", "CocoDetection", "BadImageError", "VocDetection", "collate_fn",
           "RandomHorizontalFlip", "Compose", "ResumableSampler", "voc_to_coco", "convert_voc", "write_coco_json",
           "find_deepforest_data", "make_tree_tiles"]
