"""Detector architectures by name, for the training application (random init, no downloads).

Every architecture is a torchvision ``FasterRCNN`` or ``RetinaNet`` on a ResNet/MobileNetV3 FPN
backbone, sized for small images: the default heads are small (a 256-wide box head, 128 RoIs per
image) since torchvision's 1024-wide head dominates the step time at 128 px.
"""
from __future__ import annotations

from torch import nn

ARCHS = ("resnet18-fpn", "resnet34-fpn", "resnet50-fpn", "mobilenet_v3-fpn")
DETECTORS = ("fasterrcnn", "retinanet")


def fpn_backbone(arch: str, fpn_channels: int, layers=(2, 3, 4)) -> nn.Module:
    """An FPN backbone with levels at the strides of the given ResNet stages (layer2: 8, layer3: 16,
    layer4: 32) plus a max-pool level at twice the last; MobileNetV3: torchvision's two coarse levels
    plus the pool level."""
    from torchvision.models import mobilenet_v3_large, resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor

    if arch == "mobilenet_v3-fpn":
        return _mobilenet_extractor(mobilenet_v3_large(weights=None), True, 6)
    builders = {"resnet18-fpn": (resnet.resnet18, 1), "resnet34-fpn": (resnet.resnet34, 1),
                "resnet50-fpn": (resnet.resnet50, 4)}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    build, expansion = builders[arch]
    channels = [64 * 2 ** (k - 1) * expansion for k in layers]
    return BackboneWithFPN(build(weights=None), {f"layer{k}": str(i) for i, k in enumerate(layers)}, channels,
                           fpn_channels)


def build_detector(arch: str, num_classes: int, image_size: int = 128, *, detector: str = "fasterrcnn",
                   fpn_channels: int = 128, anchor_sizes=(16, 32, 64, 128), box_head: int = 256,
                   rois_per_image: int = 128, rpn_samples: int = 128, layers=(2, 3, 4)) -> nn.Module:
    """A torchvision detector whose transform resizes images to ``image_size`` (shorter side, and at
    most ``image_size * 5 / 3`` on the longer, as 600 / 1000 in the paper's setting). ``anchor_sizes``:
    one per level, finest first (extended by doubling if short); ``layers``: the ResNet stages whose
    outputs feed the FPN."""
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {DETECTORS}")
    backbone = fpn_backbone(arch, fpn_channels, layers)
    names = [str(i) for i in range(2 if arch == "mobilenet_v3-fpn" else len(layers))]
    levels = len(names) + 1  # + the max-pool level
    sizes = tuple(anchor_sizes)
    if len(sizes) < levels:  # one size per level, doubling on the coarser ones
        sizes = sizes + tuple(sizes[-1] * 2 ** (i + 1) for i in range(levels - len(sizes)))
    sizes = sizes[-levels:] if arch == "mobilenet_v3-fpn" else sizes[:levels]
    common = dict(min_size=image_size, max_size=int(round(image_size * 5 / 3)))
    if detector == "retinanet":
        gen = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                              ((0.5, 1.0, 2.0),) * levels)
        return RetinaNet(backbone, num_classes, anchor_generator=gen, **common)
    gen = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * levels)
    out = backbone.out_channels
    return FasterRCNN(
        backbone, None, rpn_anchor_generator=gen, box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        box_head=TwoMLPHead(out * 49, box_head), box_predictor=FastRCNNPredictor(box_head, num_classes),
        rpn_batch_size_per_image=rpn_samples, box_batch_size_per_image=rois_per_image, **common)
