"""The README's Distiller and ops examples run as written, with torchvision's own detector builders."""
import re
from pathlib import Path

import torch

import fgd

README = Path(__file__).resolve().parents[1] / "README.md"


def test_distiller_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- distiller-example.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    losses, d = ns["losses"], ns["d"]
    assert "loss_imitation" in losses and losses["loss_imitation"].item() == 0.0  # warm-up
    d.warmup_iters = 0
    losses = d(ns["images"], ns["targets"])
    assert losses["loss_imitation"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.adapters.parameters())


def test_ops_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- ops-example.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    a = ns["adapter"]
    want = fgd.ops.imitation_loss(a(ns["raw"]), ns["teacher"], ns["mask"])
    torch.testing.assert_close(ns["loss"], want)
    assert ns["raw"].grad is not None and a.weight.grad is not None
