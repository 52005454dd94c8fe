"""Detector architectures by name, for the training application (random init, no downloads).

Every architecture is a torchvision ``FasterRCNN`` or ``RetinaNet`` on a ResNet/MobileNetV3 FPN
backbone, sized for small images: the default heads are small (a 256-wide box head, 128 RoIs per
image) since torchvision's 1024-wide head dominates the step time at 128 px.
"""
from __future__ import annotations

from torch import nn

ARCHS = ("resnet18-fpn", "resnet34-fpn", "resnet50-fpn", "mobilenet_v3-fpn", "resnet18-slim-fpn")
DETECTORS = ("fasterrcnn", "retinanet")


def fpn_backbone(arch: str, fpn_channels: int, layers=(2, 3, 4), fpn_norm: bool = False) -> nn.Module:
    """An FPN backbone with levels at the strides of the given ResNet stages (layer2: 8, layer3: 16,
    layer4: 32) plus a max-pool level at twice the last; MobileNetV3: torchvision's two coarse levels
    plus the pool level. ``fpn_norm``: BatchNorm after every FPN convolution (trained from random
    initialisation, the demo's teacher without it stalled on one seed in three)."""
    from torchvision.models import mobilenet_v3_large, resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, _mobilenet_extractor

    norm = nn.BatchNorm2d if fpn_norm else None
    if arch == "mobilenet_v3-fpn":
        return _mobilenet_extractor(mobilenet_v3_large(weights=None), True, 6, norm_layer=norm)
    builders = {"resnet18-fpn": (resnet.resnet18, 1), "resnet34-fpn": (resnet.resnet34, 1),
                "resnet50-fpn": (resnet.resnet50, 4), "resnet18-slim-fpn": (_slim_resnet18, 0.5)}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    build, expansion = builders[arch]
    channels = [int(64 * 2 ** (k - 1) * expansion) for k in layers]
    return BackboneWithFPN(build(weights=None), {f"layer{k}": str(i) for i, k in enumerate(layers)}, channels,
                           fpn_channels, norm_layer=norm)


def _slim_resnet18(weights=None) -> nn.Module:
    """ResNet-18 at half width (32-64-128-256 channels: a quarter of its convolution work), with
    torchvision's blocks, initialisation and child names (what BackboneWithFPN reads)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [2, 2, 2, 2])
    net.inplanes = width = 32
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for i in range(4):
        planes, stride = width * 2 ** i, 1 if i == 0 else 2
        setattr(net, f"layer{i + 1}", net._make_layer(BasicBlock, planes, 2, stride=stride))
    net.fc = nn.Linear(width * 8, 1000)
    for m in net.modules():  # torchvision's initialisation, for the new modules too
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    return net


def build_detector(arch: str, num_classes: int, image_size: int = 128, *, detector: str = "fasterrcnn",
                   fpn_channels: int = 128, anchor_sizes=(16, 32, 64, 128), box_head: int = 256,
                   rois_per_image: int = 128, rpn_samples: int = 128, layers=(2, 3, 4),
                   roi_sampling: int = 2, fpn_norm: bool = False) -> nn.Module:
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
    backbone = fpn_backbone(arch, fpn_channels, layers, fpn_norm)
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
        backbone, None, rpn_anchor_generator=gen, box_roi_pool=MultiScaleRoIAlign(names, 7, roi_sampling),
        box_head=TwoMLPHead(out * 49, box_head), box_predictor=FastRCNNPredictor(box_head, num_classes),
        rpn_batch_size_per_image=rpn_samples, box_batch_size_per_image=rois_per_image, **common)


def load_detector(path, device="cpu") -> tuple:
    """(model, config dict, class names) from a checkpoint written by `fgd train` (its final.pt)."""
    from .checkpoint import RunError, load_checkpoint

    ckpt = load_checkpoint(path, ("config", "num_classes"))
    if "student" not in ckpt:
        raise RunError(f"{path} is a training checkpoint (what --resume reads); a detector's weights are in "
                       "the run's final.pt")
    c = ckpt["config"]
    try:
        model = build_detector(c["student_arch"], ckpt["num_classes"], c["image_size"], detector=c["detector"],
                               fpn_channels=c["student_fpn_channels"], rois_per_image=c.get("rois_per_image", 128),
                               roi_sampling=c.get("roi_sampling", 2),  # older checkpoints: the defaults
                               fpn_norm=c.get("fpn_norm", False))
        model.load_state_dict(ckpt["student"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: its weights do not fit the detector its config describes "
                       f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    names = ckpt.get("class_names")
    if names is not None and not (isinstance(names, (list, tuple)) and len(names) == ckpt["num_classes"]
                                  and all(isinstance(n, str) for n in names)):
        raise RunError(f"{path}: its class_names must be a list of {ckpt['num_classes']} names (background "
                       f"first), got a {type(names).__name__}{f' of {len(names)}' if isinstance(names, (list, tuple)) else ''}")
    return model.to(device).eval(), c, names
