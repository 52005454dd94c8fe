"""The training loop of the `fgd` application: a student alone or distilled from a teacher, on
COCO-format data, with DDP (torchrun), AMP, atomic checkpoints, bit-exact resume and progress.

Resuming reproduces an uninterrupted run exactly on the CPU (fixed thread count): the data order
and the flips are pure functions of (seed, epoch, index), the DataLoader has its own generator, and
a checkpoint holds every RNG state at an iteration boundary.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .distill import Distiller
from .models import build_detector

log = logging.getLogger("fgd")


# What each numeric setting allows beyond its type (None passes wherever the type is Optional).
_RANGES = {
    **{k: (lambda v: v >= 1, ">= 1") for k in ("iterations", "batch_size", "checkpoint_every", "log_every",
                                               "keep_checkpoints", "student_fpn_channels", "teacher_fpn_channels",
                                               "teacher_iterations", "threads")},
    **{k: (lambda v: v >= 0, ">= 0") for k in ("weight_decay", "lr_warmup_iters", "imitation_weight",
                                               "imitation_warmup", "num_workers")},
    # below 33 a batch of one square image, padded to 32 by torchvision, reaches the stride-32 stage
    # as 1x1: BatchNorm cannot train on one value per channel (tried: 32 fails, 33 trains)
    "image_size": (lambda v: v >= 33, ">= 33"),
    "lr": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    # clip_grad_norm_ scales by max / norm: a negative max reverses every gradient (training climbs
    # the loss) and 0 zeroes them; null turns clipping off
    "grad_clip": (lambda v: v > 0, "> 0 (or null: no clipping)"),
    "thresh": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32) (numpy's seed range)"),
}


def _check_settings(cls, values: dict) -> None:
    """TypeError / ValueError naming the setting, its value and what it allows. Flags, YAML and JSON
    all pass here, so "false" or 1 is no bool, 2.5 no count and "abc" no learning rate."""
    import typing

    hints = typing.get_type_hints(cls)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    for name, value in values.items():
        optional = type(None) in typing.get_args(hints[name])
        if value is None and optional:
            continue
        kind = next((t for t in typing.get_args(hints[name]) if t is not type(None)), hints[name])
        # bool is an int to Python, and an int is a fine float
        ok = isinstance(value, (int, float) if kind is float else kind)
        if not ok or (kind is not bool and isinstance(value, bool)):
            tip = ""
            if kind is float and isinstance(value, str):
                try:  # PyYAML reads 1e-3 as text: YAML 1.1 wants a dot in a float
                    tip = f"; in YAML write {float(value)!r}"
                except ValueError:
                    pass
            raise TypeError(f"config: {name} must be {words[kind]}{' or null' if optional else ''}, "
                            f"got {value!r} ({type(value).__name__}){tip}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"config: {name} must be a finite number, got {value!r}")
        test, allowed = _RANGES.get(name, (None, None))
        if test is not None and not test(value):
            raise ValueError(f"config: {name} must be {allowed}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json beside its checkpoints."""

    train_json: str = ""
    train_images: str = ""
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    output_dir: str = "runs/train"
    # models
    student_arch: str = "resnet18-fpn"
    student_fpn_channels: int = 64
    detector: str = "fasterrcnn"
    image_size: int = 128
    distill: bool = True
    teacher_arch: Optional[str] = None        # trained from scratch first when no checkpoint is given
    teacher_fpn_channels: int = 128
    teacher_checkpoint: Optional[str] = None
    teacher_iterations: Optional[int] = None  # for a teacher trained from scratch (default: iterations)
    # optimisation (official: SGD 0.9 / 5e-4)
    iterations: int = 1000
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_warmup_iters: int = 50
    lr_schedule: str = "cosine"               # or "step": x0.1 at 2/3 and 8/9 of the run
    grad_clip: Optional[float] = 10.0         # max global gradient norm (None: no clipping)
    # imitation (official: lambda 0.01, psi 0.5, warm-up 400)
    imitation_weight: float = 0.01
    thresh: float = 0.5
    imitation_warmup: Optional[int] = None    # None: min(400, iterations // 10)
    level_policy: str = "assigned"
    mask_mode: str = "fgfi"
    adapter: str = "3x3"
    sparse_adaptation: bool = True            # adapter + loss at masked locations only (same values)
    # running
    amp: Optional[str] = None                 # "bf16" or "fp16"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    threads: Optional[int] = None
    num_workers: int = 0
    flip: bool = True
    resume: bool = False
    allow_changes: Optional[str] = None       # with resume: settings that may differ from the checkpoint's run
    progress: bool = True

    def resolved_imitation_warmup(self) -> int:
        if self.imitation_warmup is not None:
            return self.imitation_warmup
        return min(400, self.iterations // 10)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known: {sorted(names)}")
        _check_settings(cls, d)  # here too, so a bad file fails before anything else runs
        return cls(**d)

    def check(self):
        _check_settings(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for name in ("train_json", "train_images"):
            if not getattr(self, name):
                raise ValueError(f"config: {name} is required")
        if (self.val_json is None) != (self.val_images is None):
            raise ValueError("config: give both val_json and val_images, or neither")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"config: amp must be bf16, fp16 or unset, got {self.amp!r}")
        if self.lr_schedule not in ("cosine", "step"):
            raise ValueError(f"config: lr_schedule must be cosine or step, got {self.lr_schedule!r}")
        from .distill import ADAPTERS, LEVEL_POLICIES, MASK_MODES
        from .models import ARCHS, DETECTORS

        for name, allowed in (("student_arch", ARCHS), ("detector", DETECTORS), ("level_policy", LEVEL_POLICIES),
                              ("mask_mode", MASK_MODES), ("adapter", ADAPTERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.teacher_arch is not None and self.teacher_arch not in ARCHS:
            raise ValueError(f"config: teacher_arch must be one of {ARCHS}, got {self.teacher_arch!r}")
        if self.distill and not (self.teacher_checkpoint or self.teacher_arch):
            raise ValueError("config: distillation needs teacher_checkpoint or teacher_arch (or set distill: false)")


# ---- distributed ------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank, world, local, device)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- checkpoints ------------------------------------------------------------------------------
# A checkpoint is data: tensors and plain containers only, loaded with weights_only=True, so a file
# someone hands you cannot run code. It records its run's identity (run_id: a hash of the settings
# that define what the run computes); its file name carries it, so pruning and resuming only ever
# touch this run's files.

class RunError(RuntimeError):
    """A reason a run cannot go on that the user can act on; `fgd` prints it as one line."""


# Settings that do not change what a run computes: a resume may change them freely.
_NOT_IDENTITY = frozenset({"output_dir", "resume", "allow_changes", "progress", "log_every", "checkpoint_every",
                           "keep_checkpoints", "threads", "num_workers", "val_json", "val_images"})


def run_identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NOT_IDENTITY}


def run_id(config: dict) -> str:
    text = json.dumps(run_identity(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _rng_state() -> dict:
    # numpy's state as plain values (its array is not something weights_only loads)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_TMP = ".{name}.tmp{pid}"


def save_atomic(obj, path: Path):
    """Write to a temporary file in the same folder, then os.replace: a reader (or a resume after a
    kill) sees the old file or the new one, never half of one. A failed write (disk full, file too
    large, the path a folder) removes its partial file, leaves the previous file as it was and
    raises RunError; a kill leaves the temporary file, which the next start removes."""
    tmp = path.with_name(_TMP.format(name=path.name, pid=os.getpid()))
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
        tmp.unlink(missing_ok=True)
        raise RunError(f"could not write {path}: {e}; nothing was replaced (the previous file, if any, is "
                       "intact)") from e


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary files that killed or failed writes left in ``folder``; returns how many."""
    removed = 0
    for tmp in folder.glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def load_checkpoint(path, required=("config",)) -> dict:
    """The dict an fgd checkpoint holds, loaded as data; RunError in one line naming the file and
    what was expected when it is missing, empty, truncated, foreign or would need code to load."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    if path.stat().st_size == 0:
        raise RunError(f"checkpoint {path} is empty (0 bytes): an interrupted copy? Expected a .pt file written "
                       "by fgd train")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
    keys = sorted(set(run_identity(old)) | set(run_identity(new)))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def _checkpoint_to_resume(ckpt_dir: Path, cfg) -> tuple:
    """(path, checkpoint) to resume, or (None, None) to start fresh. This run's newest checkpoint;
    else another run's only if the settings that differ are all in cfg.allow_changes."""
    rid = run_id(dataclasses.asdict(cfg))
    path, ckpt = load_latest(ckpt_dir, rid)
    if ckpt is not None or not checkpoints(ckpt_dir):
        return path, ckpt
    path, ckpt = load_latest(ckpt_dir)
    if ckpt is None:
        return None, None
    diff = _differences(ckpt["config"], dataclasses.asdict(cfg))
    allowed = {k.strip() for k in (cfg.allow_changes or "").split(",") if k.strip()}
    refused = {k: v for k, v in diff.items() if k not in allowed and "*" not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in refused.items())
        raise RunError(f"--resume: the newest checkpoint in {ckpt_dir} ({path.name}) belongs to another run: "
                       f"{listed}. To continue it with the new settings pass --allow-changes "
                       f"{','.join(refused)}; to start this run afresh, use another --output-dir or drop --resume")
    log.warning("resuming %s, a run with other settings (%s), as --allow-changes permits", path.name,
                ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    return path, ckpt


def _set_aside_old_checkpoints(ckpt_dir: Path) -> None:
    """A fresh run starts with no checkpoints beside it: earlier ones are moved (never deleted) to
    a folder of their own, so that pruning and a later --resume can only meet this run's."""
    old = checkpoints(ckpt_dir)
    if not old:
        return
    aside = ckpt_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for path in old:
        os.replace(path, aside / path.name)
    log.warning("a fresh run in %s: moved %d checkpoints of an earlier run to %s (pass --resume to "
                "continue a run instead)", ckpt_dir, len(old), aside)


# ---- schedule ---------------------------------------------------------------------------------

def lr_factor(cfg: TrainConfig, it: int) -> float:
    warm = min(1.0, (it + 1) / max(1, cfg.lr_warmup_iters))
    if cfg.lr_schedule == "step":
        decay = 0.1 ** sum(it >= m for m in (cfg.iterations * 2 // 3, cfg.iterations * 8 // 9))
    else:
        decay = 0.5 * (1 + math.cos(math.pi * min(it, cfg.iterations) / cfg.iterations))
    return warm * decay


# ---- data -------------------------------------------------------------------------------------

def make_loader(json_path, image_dir, cfg: TrainConfig, dist: Dist, train: bool):
    from .data import CocoDetection, Compose, RandomHorizontalFlip, ResumableSampler, collate_fn

    transforms = Compose([RandomHorizontalFlip(0.5, seed=cfg.seed)]) if (train and cfg.flip) else None
    ds = CocoDetection(image_dir, json_path, transforms=transforms)
    if len(ds) == 0:
        raise ValueError(f"{json_path}: no usable images (skipped: {dict(ds.skipped)})")
    sampler = ResumableSampler(len(ds), shuffle=train, seed=cfg.seed, rank=dist.rank, world_size=dist.world)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=cfg.num_workers,
        # its own generator: creating an iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
    return ds, sampler, loader


# ---- models -----------------------------------------------------------------------------------

def build_student(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return build_detector(cfg.student_arch, num_classes, cfg.image_size, detector=cfg.detector,
                          fpn_channels=cfg.student_fpn_channels)


def load_detector(path, device="cpu") -> tuple:
    """(model, config dict, class names) from a checkpoint written by `fgd train`."""
    ckpt = load_checkpoint(path, ("config", "num_classes"))
    if "student" not in ckpt:
        raise RunError(f"{path} is a training checkpoint (what --resume reads); a detector's weights are in "
                       "the run's final.pt")
    c = ckpt["config"]
    try:
        model = build_detector(c["student_arch"], ckpt["num_classes"], c["image_size"], detector=c["detector"],
                               fpn_channels=c["student_fpn_channels"])
        model.load_state_dict(ckpt["student"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: its weights do not fit the detector its config describes "
                       f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.to(device).eval(), c, ckpt.get("class_names")


def _teacher(cfg: TrainConfig, num_classes: int, dist: Dist) -> nn.Module:
    if cfg.teacher_checkpoint:
        teacher, c, _ = load_detector(cfg.teacher_checkpoint)
        if c["image_size"] != cfg.image_size:
            raise ValueError(f"teacher checkpoint {cfg.teacher_checkpoint} was trained at image_size "
                             f"{c['image_size']}, this run uses {cfg.image_size}: the two transforms must match")
        return teacher
    # from scratch: a run of its own, in output_dir/teacher, reused if that run (same settings) finished
    tcfg = dataclasses.replace(
        cfg, distill=False, teacher_arch=None, teacher_checkpoint=None, student_arch=cfg.teacher_arch,
        student_fpn_channels=cfg.teacher_fpn_channels, iterations=cfg.teacher_iterations or cfg.iterations,
        output_dir=str(Path(cfg.output_dir) / "teacher"), val_json=None, val_images=None, allow_changes=None)
    final = Path(tcfg.output_dir) / "final.pt"
    rid = run_id(dataclasses.asdict(tcfg))
    if not (final.exists() and load_checkpoint(final).get("run_id") == rid):
        # resume this teacher's own run if it was killed; another teacher's checkpoints are set aside
        own = bool(checkpoints(Path(tcfg.output_dir) / "checkpoints", rid))
        if dist.main:
            log.info("training the teacher (%s) from scratch for %d iterations in %s",
                     tcfg.student_arch, tcfg.iterations, tcfg.output_dir)
        train(dataclasses.replace(tcfg, resume=own))
    teacher, _, _ = load_detector(final)
    return teacher


# ---- the loop ---------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) one training; returns {"final": path, "metrics": dict or None}."""
    cfg.check()
    dist = setup_distributed()
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    rid = run_id(dataclasses.asdict(cfg))
    if dist.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_temp_files(ckpt_dir) + remove_temp_files(out)
        if removed:
            log.info("removed %d temporary files left by interrupted or failed writes in %s", removed, out)
        if not cfg.resume:
            _set_aside_old_checkpoints(ckpt_dir)
    if dist.world > 1:
        torch.distributed.barrier()  # every rank sees the folder as rank 0 left it
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    ds, sampler, loader = make_loader(cfg.train_json, cfg.train_images, cfg, dist, train=True)
    student = build_student(cfg, ds.num_classes)
    warmup = cfg.resolved_imitation_warmup()
    if cfg.distill:
        teacher = _teacher(cfg, ds.num_classes, dist)
        model = Distiller(teacher, student, imitation_weight=cfg.imitation_weight, thresh=cfg.thresh,
                          warmup_iters=warmup, level_policy=cfg.level_policy, mask_mode=cfg.mask_mode,
                          adapter=cfg.adapter, sparse_adaptation=cfg.sparse_adaptation)
    else:
        model = student
    model.to(dist.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(cfg, it))
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")

    it, epoch, position = 0, 0, 0
    if cfg.resume:
        path, ckpt = _checkpoint_to_resume(ckpt_dir, cfg)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            it, epoch, position = ckpt["iteration"], ckpt["epoch"], ckpt["position"]
            _set_rng_state(ckpt["rng"][dist.rank] if dist.rank < len(ckpt["rng"]) else ckpt["rng"][0])
            if dist.main:
                log.info("resumed from %s at iteration %d (epoch %d, batch %d)", path, it, epoch, position)
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    if dist.main:
        with open(out / "config.json", "w") as f:
            json.dump({**dataclasses.asdict(cfg), "resolved_imitation_warmup": warmup, "run_id": rid}, f, indent=2)
        if cfg.distill:
            log.info("imitation warm-up: %d iterations (of %d)", warmup, cfg.iterations)
    logger = _Logger(out, it, dist.main, cfg)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    bar = _progress(cfg, it, dist.main)
    t_last, n_last = time.perf_counter(), 0
    model.train()
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    while it < cfg.iterations:
        sampler.set_epoch(epoch)
        sampler.set_start(position * cfg.batch_size)  # resuming mid-epoch: skip the batches already seen
        if hasattr(ds.transforms, "set_epoch"):
            ds.transforms.set_epoch(epoch)
        for images, targets in loader:
            images = [im.to(dist.device, non_blocking=True) for im in images]
            targets = [{k: (v.to(dist.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = model(images, targets)
            loss = sum(losses.values())
            # fp16: the GradScaler skips overflowing steps; otherwise a non-finite loss is divergence
            if cfg.amp != "fp16" and not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss at iteration {it}: { {k: float(v.detach()) for k, v in losses.items()} }; "
                    "lower the learning rate or the imitation weight, or resume from an earlier checkpoint")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                # An imitation loss on large, unnormalised features can give huge early gradients
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            it, position = it + 1, position + 1
            n_last += len(images) * dist.world
            if it % cfg.log_every == 0 or it == cfg.iterations:
                now = time.perf_counter()
                ips = n_last / max(now - t_last, 1e-9)
                t_last, n_last = now, 0
                logger.log(it, losses, loss, opt.param_groups[0]["lr"], ips, _unwrap(model))
                if bar is not None:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", img_s=f"{ips:.1f}")
            if bar is not None:
                bar.update(1)
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                end_of_epoch = position >= batches_per_epoch
                _checkpoint(model, opt, sched, scaler, it, epoch + end_of_epoch, 0 if end_of_epoch else position,
                            cfg, ds, dist, ckpt_dir)
            if it >= cfg.iterations:
                break
        else:
            epoch, position = epoch + 1, 0
    if bar is not None:
        bar.close()
    logger.close()
    final = out / "final.pt"
    if dist.main:
        student_state = _unwrap(model).student.state_dict() if cfg.distill else _unwrap(model).state_dict()
        save_atomic({"student": student_state, "config": dataclasses.asdict(cfg), "num_classes": ds.num_classes,
                     "class_names": ds.class_names, "iteration": it, "run_id": rid}, final)
    metrics = None
    if cfg.val_json:
        student = _unwrap(model).student if cfg.distill else _unwrap(model)
        metrics = evaluate_model(student, cfg.val_json, cfg.val_images, cfg, dist)
        if dist.main:
            with open(out / "metrics.json", "w") as f:
                json.dump({k: v for k, v in metrics.items() if k != "summary"}, f, indent=2)
    if dist.world > 1:
        torch.distributed.barrier()
    return {"final": str(final), "metrics": metrics}


def _checkpoint(model, opt, sched, scaler, it, epoch, position, cfg, ds, dist, ckpt_dir):
    rng = [_rng_state()]
    if dist.world > 1:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = gathered
    if not dist.main:
        return
    config = dataclasses.asdict(cfg)
    rid = run_id(config)
    state = {"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": scaler.state_dict(), "iteration": it, "epoch": epoch, "position": position, "rng": rng,
             "config": config, "run_id": rid, "num_classes": ds.num_classes, "class_names": ds.class_names}
    save_atomic(state, ckpt_dir / f"ckpt_{rid}_{it:08d}.pt")
    for old in checkpoints(ckpt_dir, rid)[: -cfg.keep_checkpoints]:  # only this run's, by iteration
        old.unlink(missing_ok=True)


def _progress(cfg, start, main):
    if not (cfg.progress and main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.iterations, initial=start, desc=Path(cfg.output_dir).name, unit="it",
                dynamic_ncols=True, mininterval=1.0)


class _Logger:
    """log.csv: one row per logged step (losses, per-level imitation losses and N_p, lr, img/s); rows
    past a resumed iteration are dropped so a resumed log reads as one run. TensorBoard if installed."""

    def __init__(self, out: Path, start_it: int, main: bool, cfg: TrainConfig):
        self.main, self.path, self.rows = main, out / "log.csv", []
        self.tb = None
        if not main:
            return
        if self.path.exists():
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start_it]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed: the CSV is enough
            self.tb = None

    def log(self, it, losses, loss, lr, ips, model):
        if not self.main:
            return
        row = {"iteration": it, "loss": float(loss.detach()), "lr": lr, "images_per_s": ips}
        row.update({k: float(v.detach()) for k, v in losses.items()})
        if isinstance(model, Distiller):
            for i, (l, n) in enumerate(zip(model.last_level_losses, model.last_num_pos)):
                row[f"imitation_l{i}"] = float(l)
                row[f"num_pos_l{i}"] = float(n)
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)
        if self.tb is not None:
            for k, v in row.items():
                if k != "iteration":
                    self.tb.add_scalar(k, float(v), it)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ---- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_model(model, val_json, val_images, cfg: TrainConfig, dist: Optional[Dist] = None) -> dict:
    """COCOeval bbox mAP of ``model`` on a COCO json + images, plus images/s of inference. Each rank
    runs its shard; detections are gathered on rank 0, which runs COCOeval."""
    from .evaluate import coco_map

    dist = dist or Dist(device=next(model.parameters()).device)
    ds, _, loader = make_loader(val_json, val_images, dataclasses.replace(cfg, flip=False), dist, train=False)
    was_training = model.training
    model.eval()
    dets, n, t0 = [], 0, time.perf_counter()
    for images, targets in loader:
        outputs = model([im.to(dist.device) for im in images])
        for out, t in zip(outputs, targets):
            dets.append({"image_id": int(t["image_id"]), **{k: out[k].cpu() for k in ("boxes", "scores", "labels")}})
        n += len(images)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if dist.world > 1:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, dets)
        dets = list({d["image_id"]: d for part in gathered for d in part}.values())  # drop the padding repeats
    if not dist.main:
        return None  # rank 0 holds the gathered result
    metrics = coco_map(ds.coco, dets, ds.label_to_cat_id)
    metrics["img/s"] = n * dist.world / max(seconds, 1e-9)
    return metrics
