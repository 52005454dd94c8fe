"""Helpers the tests share that are not part of fgd."""
from fgd.models import build_detector


def tiny_detector(kind: str = "fasterrcnn", depth: int = 18, out_channels: int = 64, num_classes: int = 4,
                  image_size: int = 96, layers=(2, 3, 4)):
    """fgd.models.build_detector with small heads, for quick tests: ResNet-``depth`` FPN on the given
    stages (layer2: stride 8) plus a pool level, anchors 8 px at stride 8, doubling."""
    return build_detector(f"resnet{depth}-fpn", num_classes, image_size, detector=kind, fpn_channels=out_channels,
                          anchor_sizes=tuple(8 * 2 ** (k - 2) for k in layers), box_head=128, rois_per_image=64,
                          rpn_samples=64, layers=tuple(layers))
