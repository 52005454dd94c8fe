"""What distillation adds to a training step, piece by piece, against the student's own step.

    python benchmarks/bench_distill.py [--pair tiny|torchvision] [--size 256] [--batch 4]

tiny: ResNet-34-FPN (128 ch) teacher -> ResNet-18-FPN (64 ch) student (fgd.testing.tiny_detector);
torchvision: fasterrcnn_resnet50_fpn -> fasterrcnn_mobilenet_v3_large_fpn. Random weights, random
images with 1-8 boxes each. Times are medians of --repeat steps after warm-up.
"""
import argparse
import copy
import statistics
import time

import torch

import fgd
from fgd.bench import device_name
from fgd.testing import random_boxes, tiny_detector


def build(pair, size, device):
    torch.manual_seed(0)
    if pair == "tiny":
        teacher = tiny_detector("fasterrcnn", depth=34, out_channels=128, image_size=size)
        student = tiny_detector("fasterrcnn", depth=18, out_channels=64, image_size=size)
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


def timed(fn, repeat, device):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=["tiny", "torchvision"], default="tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    teacher, student = build(args.pair, args.size, device)
    d = fgd.Distiller(teacher, student, warmup_iters=0).train()
    images, targets = data(args.batch, args.size, device)

    def student_step():
        student.zero_grad(set_to_none=True)
        sum(student(images, copy.deepcopy(targets)).values()).backward()

    def distill_step():
        d.zero_grad(set_to_none=True)
        sum(d(images, copy.deepcopy(targets)).values()).backward()

    # the pieces, on the inputs the distiller sees
    image_list, tv_targets = student.transform(images, copy.deepcopy(targets))
    batch = image_list.tensors
    s_feats = [f.detach().requires_grad_() for f in student.backbone(batch).values()]
    with torch.no_grad():
        t_all = list(teacher.backbone(batch).values())
    t_feats = [d._same_stride(f, t_all, i) for i, f in enumerate(s_feats)]
    gen = student.rpn.anchor_generator
    shapes = [torch.empty((1, 1, *f.shape[-2:]), device=device) for f in s_feats]
    boxes = [t["boxes"] for t in tv_targets]

    def anchors_and_masks():
        a = gen(image_list, shapes)[0]
        a = a.split([f.shape[-2] * f.shape[-1] * k for f, k in zip(s_feats, gen.num_anchors_per_location())])
        return d.masks(list(a), boxes, [f.shape[-2:] for f in s_feats], batch.shape[-2:])

    masks = anchors_and_masks()

    def teacher_forward():
        with torch.no_grad():
            teacher.backbone(batch)

    def adapt_and_loss():
        total = sum(fgd.ops.imitation_loss(a(s), t, m) for a, s, t, m in zip(d.adapters, s_feats, t_feats, masks))
        total.backward()

    r = args.repeat
    rows = [("student step alone (fwd+bwd)", timed(student_step, r, device)),
            ("distiller step (fwd+bwd)", timed(distill_step, r, device)),
            ("  teacher backbone forward", timed(teacher_forward, r, device)),
            ("  anchors + imitation masks", timed(anchors_and_masks, r, device)),
            ("  adaptation layers + imitation loss, fwd+bwd", timed(adapt_and_loss, r, device))]
    base = rows[0][1]
    print(f"fgd {fgd.__version__} | torch {torch.__version__} | device: {device_name(device)}")
    print(f"pair: {args.pair}, batch {args.batch} x {args.size}x{args.size}, "
          f"levels {[tuple(f.shape[-2:]) for f in s_feats]}, N_p {[int(m.sum()) for m in masks]}\n")
    print("| part | ms | % of the student's step |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {100 * ms / base:.0f} % |")
    print(f"| distillation overhead (distiller step - student step) | {rows[1][1] - base:.1f} | "
          f"{100 * (rows[1][1] - base) / base:.0f} % |")


if __name__ == "__main__":
    main()
