"""The README's Distiller example runs as written, with torchvision's own detector builders."""
import re
from pathlib import Path

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
