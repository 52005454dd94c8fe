"""Checkpoints of the `fgd` application.

A checkpoint is data: tensors and plain containers only, loaded with weights_only=True, so a file
someone hands you cannot run code. It records its run's identity (run_id: a hash of the settings
that define what the run computes); its file name carries it, so pruning and resuming only ever
touch this run's files. ``TrainState`` is what one holds: the model (with its adaptation layers),
optimizer, schedule, AMP scaler, the position in the data and every RNG state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .distill.settings import short
from .files import RunError, aside_name, remove_temp_files, write_atomic  # noqa: F401  (RunError: imported from here)

log = logging.getLogger("fgd")


# Settings that do not change what a run computes: a resume may change them freely.
_NOT_IDENTITY = frozenset({"output_dir", "resume", "allow_changes", "progress", "log_every", "checkpoint_every",
                           "keep_checkpoints", "threads", "num_workers", "val_json", "val_voc", "val_split_file",
                           "val_images"})


# TrainConfig keys added after runs were first saved, with the value every earlier run had: a saved
# config without the key takes that value, and the key enters the run id only when it differs from
# it, so the ids (and checkpoints) of earlier runs stay theirs. Every key added from now on goes here.
LEGACY_VALUES = {"method": "fgfi", "adapter_relu": False, "offset": 0.0}


def with_legacy_values(saved: dict) -> dict:
    """A config saved by an earlier fgd, completed with the values it had for keys added since."""
    return {**LEGACY_VALUES, **saved}


def run_identity(config: dict) -> dict:
    """The settings that define what a run computes; a key added since runs were first saved counts
    only when it differs from the value earlier runs had (LEGACY_VALUES), so their ids stay."""
    return {k: v for k, v in config.items()
            if k not in _NOT_IDENTITY and not (k in LEGACY_VALUES and v == LEGACY_VALUES[k])}


def run_id(config: dict) -> str:
    text = json.dumps(run_identity(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rng_state() -> dict:
    # numpy's state as plain values (its array is not something weights_only loads)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: Path):
    """torch.save through ``write_atomic``: the old file or the new one, never part of one; a failed
    write raises RunError (a FileError) and keeps the previous file."""
    def save(f):
        torch.save(obj, f)

    write_atomic(path, save)


def load_checkpoint(path, required=("config",), mmap: bool = False) -> dict:
    """The dict an fgd checkpoint holds, loaded as data; RunError in one line naming the file and
    what was expected when it is missing, empty, truncated, foreign or would need code to load.
    ``mmap``: map the tensors' storage rather than read it (to look at the plain values only)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise RunError(f"checkpoint {path} {what}")  # a FIFO would block the reader forever
    if path.stat().st_size == 0:
        raise RunError(f"checkpoint {path} is empty (0 bytes): an interrupted copy? Expected a .pt file written "
                       "by fgd train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # zip/pickle readers raise several types for a truncated or foreign file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line or "global" in line), None)
        if isinstance(e, pickle.UnpicklingError) and code:  # weights_only refused what would run code
            raise RunError(f"refusing to load {path}: it holds objects that need code to load ({code}); an fgd "
                           "checkpoint holds only tensors and plain values. Never load files you do not trust") \
                from None
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reason = next((line for line in lines if not line.startswith(boilerplate)), type(e).__name__)
        raise RunError(f"checkpoint {path} is not readable as a PyTorch file ({reason[:200]}); expected a .pt "
                       "file written by fgd train") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"{path} is not an fgd checkpoint: no {', '.join(repr(k) for k in missing)} entries")
    return ckpt


_CKPT = re.compile(r"ckpt_(?:(?P<run>[0-9a-f]{12})_)?(?P<it>\d+)\.pt$")


def checkpoints(folder: Path, run: Optional[str] = None) -> list:
    """Checkpoints in ``folder``, oldest iteration first: of run ``run`` only, or of every run
    (names without a run id, from before ids existed, count as another run)."""
    found = []
    for path in Path(folder).glob("ckpt_*.pt"):
        m = _CKPT.match(path.name)
        if m and (run is None or m["run"] == run):
            found.append((int(m["it"]), path))
    return [p for _, p in sorted(found)]


def load_latest(folder: Path, run: Optional[str] = None):
    """The newest checkpoint of run ``run`` (any run if None) that loads; a corrupt one is reported
    and the previous one is used."""
    for path in reversed(checkpoints(folder, run)):
        try:
            return path, load_checkpoint(path, ("model", "iteration", "config"))
        except RunError as e:  # truncated or garbled file: say so, fall back
            log.error("%s; falling back to the previous checkpoint", e)
    return None, None


def _differences(old: dict, new: dict) -> dict:
    old, new = with_legacy_values(old), with_legacy_values(new)
    keys = sorted(set(run_identity(old)) | set(run_identity(new)))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def resume_candidates(ckpt_dir: Path, config: dict) -> list:
    """The checkpoints ``--resume`` may continue, newest first: this run's; without any, another
    run's, only if the settings that differ are all in config["allow_changes"] (RunError naming
    them otherwise)."""
    own = checkpoints(ckpt_dir, run_id(config))
    if own:
        return own[::-1]
    others = checkpoints(ckpt_dir)[::-1]
    for i, path in enumerate(others):  # the newest one that reads decides
        try:
            saved = load_checkpoint(path)["config"]
            if not isinstance(saved, dict):
                raise RunError(f"{path} holds no settings (its config is a {type(saved).__name__})")
        except RunError as e:
            log.error("%s; falling back to the previous checkpoint", e)
            continue
        diff = _differences(saved, config)
        allowed = {k.strip() for k in (config.get("allow_changes") or "").split(",") if k.strip()}
        refused = {k: v for k, v in diff.items() if k not in allowed and "*" not in allowed}
        if refused:
            listed = "; ".join(f"{k}: {short(a)} in the checkpoint, {short(b)} now" for k, (a, b) in refused.items())
            raise RunError(f"--resume: the newest checkpoint in {ckpt_dir} ({path.name}) belongs to another run: "
                           f"{listed}. To continue it with the new settings pass --allow-changes "
                           f"{','.join(refused)}; to start this run afresh, use another --output-dir or drop --resume")
        log.warning("resuming %s, a run with other settings (%s), as --allow-changes permits", path.name,
                    ", ".join(f"{k}: {short(a)} -> {short(b)}" for k, (a, b) in diff.items()))
        return others[i:]
    return []


def resume(state: "TrainState", ckpt_dir: Path, config: dict, rank: int = 0) -> Optional[Path]:
    """Loads the newest checkpoint ``--resume`` may continue (``resume_candidates``) into ``state``;
    one that is corrupt or of another shape is reported and the previous one tried. Returns its path,
    or None when none fits (the run starts fresh)."""
    for path in resume_candidates(ckpt_dir, config):
        try:
            ckpt = load_checkpoint(path, ("model", "iteration", "config"))
            state.check(ckpt, path)
        except RunError as e:
            log.error("%s; falling back to the previous checkpoint", e)
            continue
        try:
            state.load_state_dict(ckpt, rank)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            # past the checks the state may be half loaded: no fallback, one line
            raise RunError(f"cannot resume from {path}: {short(str(e), 200)}") from None
        return path
    return None


# What a run writes in its folder besides checkpoints/ (a fresh run moves an earlier run's aside)
RUN_OUTPUTS = ("final.pt", "config.json", "log.csv", "metrics.json", "eval.json", "tb")


def set_aside_earlier_run(out: Path, rid: str) -> Optional[Path]:
    """A fresh run starts in a folder holding no earlier run's files: its checkpoints and outputs
    (``RUN_OUTPUTS``) are moved (never deleted) to ``out/previous-<time>/``, said in one line, so
    that pruning, a later --resume and this run's final.pt only ever meet this run's. The logs of
    this run (``rid``) killed before it finished or checkpointed are its own: they stay."""
    out = Path(out)
    try:
        own = json.loads((out / "config.json").read_text()).get("run_id") == rid
    except (OSError, ValueError, AttributeError):
        own = False
    if own and not (out / "final.pt").exists() and not checkpoints(out / "checkpoints"):
        return None
    found = [out / "checkpoints" / p.name for p in checkpoints(out / "checkpoints")]
    found += [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if not found:
        return None
    aside = aside_name(out / "checkpoints", bare=True)
    (aside / "checkpoints").mkdir(parents=True)
    for path in found:
        os.replace(path, aside / path.relative_to(out))
    log.warning("a fresh run in %s: moved %d files of an earlier run to %s (pass --resume to continue a run "
                "instead)", out, len(found), aside)
    return aside


@dataclass
class TrainState:
    """Everything a resumed run needs, at an iteration boundary: ``position`` batches of ``epoch``
    are done (a checkpoint taken at the end of an epoch records the next one, position 0)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    epoch: int = 0
    position: int = 0

    def state_dict(self, rng: list, config: dict, extra: dict) -> dict:
        module = self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model
        return {"model": module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "epoch": self.epoch, "position": self.position, "rng": rng,
                "config": config, "run_id": run_id(config), **extra}

    def check(self, ckpt: dict, path) -> None:
        """RunError naming ``path`` and the first thing that does not fit this state, before anything
        is loaded (a checkpoint of another shape never leaves the state half loaded)."""
        def bad(what):
            return RunError(f"cannot resume from {path}: {what}")

        for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("scaler", dict),
                          ("iteration", int), ("epoch", int), ("position", int), ("rng", list), ("config", dict)):
            if key not in ckpt:
                raise bad(f"it has no {key!r} entry")
            value = ckpt[key]
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
                raise bad(f"its {key!r} is {short(value)}, not a {'count' if kind is int else kind.__name__}")
        module = self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model
        want, got = module.state_dict(), ckpt["model"]
        if set(want) != set(got):
            missing, extra = sorted(set(want) - set(got), key=str), sorted(set(got) - set(want), key=str)
            raise bad(f"its model is another architecture ({len(missing)} weights missing, e.g. "
                      f"{(missing or ['-'])[0]}; {len(extra)} unexpected, e.g. {short((extra or ['-'])[0])})")
        for name, t in want.items():
            g = got[name]
            if not torch.is_tensor(t):  # a module's extra state
                continue
            if not torch.is_tensor(g) or g.is_meta or g.shape != t.shape or g.dtype != t.dtype:
                what = (f"a {type(g).__name__}" if not torch.is_tensor(g) else "a meta tensor (no data)"
                        if g.is_meta else f"{g.dtype} {tuple(g.shape)}")
                raise bad(f"its weight {name} is {what}, this model's is {t.dtype} {tuple(t.shape)}")
        groups = ckpt["optimizer"].get("param_groups")
        sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
                 for g in groups] if isinstance(groups, list) else None
        if sizes != [len(g["params"]) for g in self.optimizer.state_dict()["param_groups"]]:
            raise bad("its optimizer holds other parameter groups than this run's (another model or optimizer)")
        if not ckpt["rng"]:
            raise bad("it holds no random-number states")

    def load_state_dict(self, ckpt: dict, rank: int) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration, self.epoch, self.position = ckpt["iteration"], ckpt["epoch"], ckpt["position"]
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])


def save_checkpoint(state: TrainState, config: dict, extra: dict, folder: Path, keep: int, world: int = 1,
                    main: bool = True) -> None:
    """Writes ``folder/ckpt_<run id>_<iteration>.pt`` and prunes this run's older ones to ``keep``.
    Every rank calls it (each rank's RNG state is gathered); rank 0 writes."""
    rng = [rng_state()]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = gathered
    if not main:
        return
    rid = run_id(config)
    save_atomic(state.state_dict(rng, config, extra), folder / f"ckpt_{rid}_{state.iteration:08d}.pt")
    for old in checkpoints(folder, rid)[:-keep]:  # only this run's, by iteration
        old.unlink(missing_ok=True)
