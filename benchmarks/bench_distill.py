"""What distillation adds to a training step, piece by piece, against the student's own step.

    python benchmarks/bench_distill.py [--pair demo|tiny|torchvision] [--size 256] [--batch 4]

demo: the `fgd demo` models (fgd.models.build_detector: ResNet-34-FPN teacher -> ResNet-18-FPN
student, 128-channel FPN); tiny: ResNet-34-FPN (128 ch) -> ResNet-18-FPN (64 ch) with small heads
(the tests' tiny_detector); torchvision: fasterrcnn_resnet50_fpn -> fasterrcnn_mobilenet_v3_large_fpn.
Random weights, random images with 1-8 boxes each. Times are medians of --repeat steps after warm-up.
The distiller runs twice: adapters + loss at the masked locations only (masked_adapt_loss, the
default) and dense (conv2d + imitation_loss, sparse_adaptation=False).
"""
import argparse
import copy

import torch

import fgd
from fgd.distill import detector_levels
from fgd.distill.torchvision import same_stride
from fgd.models import build_detector
from fgd.synthetic import random_boxes
from fgd.timing import device_name, time_ms


def build(pair, size, device):
    torch.manual_seed(0)
    if pair == "demo":
        teacher = build_detector("resnet34-fpn", 4, size)
        student = build_detector("resnet18-fpn", 4, size)
    elif pair == "tiny":  # FPN on layer2-4 plus a pool level, anchors 8 px at stride 8, doubling
        small = dict(detector="fasterrcnn", anchor_sizes=(8, 16, 32), box_head=128, rois_per_image=64,
                     rpn_samples=64, layers=(2, 3, 4))
        teacher = build_detector("resnet34-fpn", 4, size, fpn_channels=128, **small)
        student = build_detector("resnet18-fpn", 4, size, fpn_channels=64, **small)
    else:
        from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn

        kw = dict(num_classes=4, min_size=size, max_size=size, weights=None, weights_backbone=None)
        teacher, student = fasterrcnn_resnet50_fpn(**kw), fasterrcnn_mobilenet_v3_large_fpn(**kw)
    return teacher.to(device), student.to(device)


def data(batch, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 9, (1,), generator=g))
        targets.append({"boxes": random_boxes(n, (size, size), min_size=8, generator=g).to(device),
                        "labels": torch.randint(1, 4, (n,), generator=g).to(device)})
    return images, targets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=["demo", "tiny", "torchvision"], default="tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    teacher, student = build(args.pair, args.size, device)
    d = fgd.Distiller(teacher, student, warmup_iters=0).train()
    d_dense = fgd.Distiller(teacher, student, warmup_iters=0, sparse_adaptation=False).train()
    d_dense.adapters.load_state_dict(d.adapters.state_dict())
    images, targets = data(args.batch, args.size, device)

    def student_step():
        student.zero_grad(set_to_none=True)
        sum(student(images, copy.deepcopy(targets)).values()).backward()

    def distill_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            sum(model(images, copy.deepcopy(targets)).values()).backward()
        return run

    # the pieces, on the inputs the distiller sees
    with torch.no_grad():
        levels = detector_levels(student, images, copy.deepcopy(targets))
        t_all = list(teacher.backbone(levels.batch).values())
    batch, masks = levels.batch, levels.masks
    s_feats = [f.detach().requires_grad_() for f in levels.features]
    t_feats = [same_stride(f, t_all, i) for i, f in enumerate(s_feats)]

    def imitation_masks():
        return d.masks(levels.anchors, levels.boxes, [f.shape[-2:] for f in s_feats], batch.shape[-2:])

    def teacher_forward():
        with torch.no_grad():
            teacher.backbone(batch)

    def adapt_and_loss(sparse):
        def run():
            if sparse:
                total = sum(fgd.ops.masked_adapt_loss(s, t, m, a.conv.weight, a.conv.bias, relu=a.relu)
                            for a, s, t, m in zip(d.adapters, s_feats, t_feats, masks))
            else:
                total = sum(fgd.ops.imitation_loss(a(s), t, m)
                            for a, s, t, m in zip(d.adapters, s_feats, t_feats, masks))
            total.backward()
        return run

    def timed(fn):
        return time_ms(fn, device, args.repeat, warmup=2)

    student_ms = timed(student_step)
    teacher_ms = timed(teacher_forward)
    rows = [("student step alone (fwd+bwd)", student_ms),
            ("distiller step, sparse adaptation (default)", timed(distill_step(d))),
            ("distiller step, dense adaptation", timed(distill_step(d_dense))),
            ("  teacher backbone forward", teacher_ms),
            ("  imitation masks (from the anchors)", timed(imitation_masks)),
            ("  adapters + imitation loss, fwd+bwd: sparse", timed(adapt_and_loss(True))),
            ("  adapters + imitation loss, fwd+bwd: dense", timed(adapt_and_loss(False)))]
    print(f"fgd {fgd.__version__} | torch {torch.__version__} | device: {device_name(device)}")
    density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    print(f"pair: {args.pair}, batch {args.batch} x {args.size}x{args.size}, "
          f"levels {[tuple(f.shape[-2:]) for f in s_feats]}, channels "
          f"{[(f.shape[1], t.shape[1]) for f, t in zip(s_feats, t_feats)]}, "
          f"N_p {[int(m.sum()) for m in masks]} ({density:.0%} of all locations)\n")
    print("| part | ms | % of the student's step |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {100 * ms / student_ms:.0f} % |")
    for path, (_, ms) in zip(("sparse", "dense"), rows[1:3]):
        extra = ms - student_ms - teacher_ms
        print(f"| overhead without the teacher's forward, {path} | {extra:.1f} | "
              f"{100 * extra / student_ms:.0f} % |")


if __name__ == "__main__":
    main()
