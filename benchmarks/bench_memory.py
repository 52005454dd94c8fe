"""How close is `fgd train`'s memory check to a real training step? For each detector and size: the
estimate `fgd.engine.check_memory` makes (the backbone's activations in a 128 px forward, scaled by
area and batch) against the peak resident memory one training step (forward + backward) adds,
measured in a fresh child process per case (ru_maxrss). The check refuses a step only when its
estimate exceeds the free memory, so an estimate a little under the peak is the safe side.

    python benchmarks/bench_memory.py
"""
import json
import subprocess
import sys

CASES = [("resnet18-fpn", 384, 2), ("resnet18-fpn", 512, 2), ("resnet18-slim-fpn", 512, 2), ("resnet50-fpn", 512, 2),
         ("mobilenet_v3-fpn", 512, 2)]

CHILD = r"""
import json, resource, sys, torch
from fgd.config import TrainConfig
from fgd.engine import check_memory
from fgd.models import build_detector
torch.set_num_threads(1)
arch, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = TrainConfig(student_arch=arch, image_size=size, batch_size=batch, distill=False, train_json="x", train_images="x")
est = check_memory(cfg, torch.device("cpu"))
model = build_detector(arch, 2, size, fpn_channels=cfg.student_fpn_channels, fpn_norm=cfg.fpn_norm).train()
images = [torch.rand(3, size, size) for _ in range(batch)]
targets = [{"boxes": torch.tensor([[10.0, 10.0, 90.0, 120.0]]), "labels": torch.tensor([1])} for _ in range(batch)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sum(model(images, targets).values()).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"est": est, "peak": peak}))
"""


def main():
    from fgd.timing import device_name

    print(f"device: {device_name('cpu')}; each case in a child with 1 torch thread")
    print("| detector | image size | batch | estimate (MiB) | step's peak (MiB) | estimate / peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch, size, batch in CASES:
        out = subprocess.run([sys.executable, "-c", CHILD, arch, str(size), str(batch)], capture_output=True,
                             text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {arch} | {size} | {batch} | {r['est'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} | "
              f"{r['est'] / r['peak']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
