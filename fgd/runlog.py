"""One logger for every training fgd runs (`fgd train` and the Ultralytics adapter): rows of numbers
to a CSV, TensorBoard scalars when it is installed, and a progress bar when asked.

    log = RunLog(out / "log.csv", key="iteration", start=resumed_at, total=iterations, progress=True)
    log.log({"iteration": 10, "loss": 1.3})   # a row; the bar shows its other values
    log.advance()                              # one step done
    log.close()
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

from .files import write_atomic


class RunLog:
    """``path``: the CSV, rewritten whole at every row (``write_atomic``: a reader never sees half of one); the rows of
    an earlier run past ``start`` (a resume: ``row[key] > start``) are dropped, so a resumed log reads as
    one run. ``tensorboard``: a folder for TensorBoard's events (skipped when it is not installed).
    ``total``/``progress``: a tqdm bar of ``total`` steps from ``start``. ``main``: False on the ranks
    that do not write (DDP): then every call does nothing."""

    def __init__(self, path, *, key: str, start: int = 0, total: Optional[int] = None, progress: bool = False,
                 tensorboard=None, desc: Optional[str] = None, main: bool = True):
        self.path, self.key, self.main = Path(path), key, main
        self.rows: list = []
        self.tb = self.bar = None
        if not main:
            return
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if float(r[key]) <= start]
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard))
            except Exception:  # tensorboard not installed: the CSV is enough
                self.tb = None
        if progress and total is not None:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc=desc, unit="it", dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                self.bar = None

    def log(self, row: dict, shown: Optional[dict] = None) -> None:
        """Appends ``row`` (it holds ``key``); ``shown``: what the progress bar displays of it."""
        if not self.main:
            return
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        write_atomic(self.path, text.getvalue())
        if self.tb is not None:
            for k, v in row.items():
                if k != self.key:
                    self.tb.add_scalar(k, float(v), int(row[self.key]))
        if self.bar is not None and shown:
            self.bar.set_postfix(shown)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def imitation_columns(result, prefix: str = "imitation") -> dict:
    """An ImitationResult's per-level values as columns: ``<prefix>_l<i>`` and ``num_pos_l<i>``."""
    if result is None:
        return {}
    row = {}
    for i, (loss, n) in enumerate(zip(result.level_losses, result.num_pos)):
        row[f"{prefix}_l{i}"] = float(loss)
        row[f"num_pos_l{i}"] = float(n)
    return row
