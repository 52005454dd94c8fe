"""The training loop of the `fgd` application, read top to bottom as torchvision's
references/detection reads: ``train_one_epoch`` runs the steps of one epoch, ``run`` one training
(set up, resume, the epochs, the final weights, the evaluation), and ``train`` is the main: the
teacher first when it is trained from scratch (``train_teacher``), then the run. Settings live in ``fgd.config``,
checkpoints in ``fgd.checkpoint``, models in ``fgd.models``, evaluation in ``fgd.evaluate``.

Resuming reproduces an uninterrupted run exactly on the CPU (fixed thread count): the data order
and the flips are pure functions of (seed, epoch, index), the DataLoader has its own generator, and
a checkpoint holds every RNG state at an iteration boundary.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import (RunError, TrainState, checkpoints, load_checkpoint, load_latest,  # noqa: F401
                         remove_temp_files, resume, run_id, save_atomic, save_checkpoint, set_aside_earlier_run)
from .config import ConfigError, TrainConfig  # noqa: F401  (TrainConfig: imported from here by users)
from .distill import Distiller
from .files import RunLock, check_output_folder, command_line, same_file, write_atomic
from .models import build_detector, load_detector
from .runlog import RunLog, imitation_columns

log = logging.getLogger("fgd")


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


# ---- schedule ---------------------------------------------------------------------------------

def lr_factor(cfg: TrainConfig, it: int) -> float:
    warm = min(1.0, (it + 1) / max(1, cfg.lr_warmup_iters))
    if cfg.lr_schedule == "step":
        decay = 0.1 ** sum(it >= m for m in (cfg.iterations * 2 // 3, cfg.iterations * 8 // 9))
    else:
        decay = 0.5 * (1 + math.cos(math.pi * min(it, cfg.iterations) / cfg.iterations))
    return warm * decay


def make_optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ---- data -------------------------------------------------------------------------------------

def make_dataset(cfg: TrainConfig, split: str, class_names: Optional[list] = None, train: bool = False):
    """The training ("train") or validation ("val") set of ``cfg``: COCO json or Pascal VOC XML.
    VOC categories: ``cfg.classes``, else ``class_names`` (the training set's, for validation), else
    the names found in the XML."""
    from .data import CocoDetection, Compose, RandomHorizontalFlip, VocDetection

    transforms = Compose([RandomHorizontalFlip(0.5, seed=cfg.seed)]) if (train and cfg.flip) else None
    images = getattr(cfg, f"{split}_images")
    voc = getattr(cfg, f"{split}_voc")
    try:
        if voc:
            classes = [c.strip() for c in cfg.classes.split(",") if c.strip()] if cfg.classes else None
            classes = classes or (class_names[1:] if class_names else None)
            ds = VocDetection(voc, images, split_file=getattr(cfg, f"{split}_split_file"), classes=classes,
                              transforms=transforms)
        else:
            ds = CocoDetection(images, getattr(cfg, f"{split}_json"), transforms=transforms)
    except (ValueError, FileNotFoundError) as e:  # a bad file or folder: its message names it
        raise RunError(str(e)) from None
    if len(ds) == 0:
        raise RunError(f"{voc or getattr(cfg, f'{split}_json')}: no usable images (skipped: {dict(ds.skipped)})")
    return ds


def make_loader(ds, cfg: TrainConfig, dist: Dist, train: bool):
    from .data import ResumableSampler, collate_fn

    sampler = ResumableSampler(len(ds), shuffle=train, seed=cfg.seed, rank=dist.rank, world_size=dist.world)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=cfg.num_workers,
        # its own generator: creating an iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
    return sampler, loader


# ---- models -----------------------------------------------------------------------------------

def build_student(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return build_detector(cfg.student_arch, num_classes, cfg.image_size, detector=cfg.detector,
                          fpn_channels=cfg.student_fpn_channels, rois_per_image=cfg.rois_per_image,
                          roi_sampling=cfg.roi_sampling, fpn_norm=cfg.fpn_norm)


def teacher_config(cfg: TrainConfig) -> TrainConfig:
    """The run that trains ``cfg``'s teacher from scratch: in output_dir/teacher, without validation."""
    return dataclasses.replace(
        cfg, distill=False, teacher_arch=None, teacher_checkpoint=None, student_arch=cfg.teacher_arch,
        student_fpn_channels=cfg.teacher_fpn_channels, iterations=cfg.teacher_iterations or cfg.iterations,
        output_dir=str(Path(cfg.output_dir) / "teacher"), val_json=None, val_voc=None, val_images=None,
        val_split_file=None, allow_changes=None)


def train_teacher(cfg: TrainConfig) -> Optional[str]:
    """The checkpoint of the teacher ``cfg`` distils from (None when it does not distil): its
    teacher_checkpoint, or, without one, the final weights of a teacher trained from scratch by a run
    of its own (``teacher_config``), reused when that run (same settings) finished, resumed when it
    was killed."""
    if not cfg.distill:
        return None
    if cfg.teacher_checkpoint:
        return cfg.teacher_checkpoint
    tcfg = teacher_config(cfg)
    tid = run_id(dataclasses.asdict(tcfg))
    final = Path(tcfg.output_dir) / "final.pt"
    # its run id only: the weights are read once, when the run loads the teacher (mmap reads no tensor)
    if final.exists() and load_checkpoint(final, mmap=True).get("run_id") == tid:
        return str(final)
    # resume this teacher's own run if it was killed; another teacher's checkpoints are set aside
    own = bool(checkpoints(Path(tcfg.output_dir) / "checkpoints", tid))
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("training the teacher (%s) from scratch for %d iterations in %s",
                 tcfg.student_arch, tcfg.iterations, tcfg.output_dir)
    return run(dataclasses.replace(tcfg, resume=own))["final"]


def load_teacher(path: str, cfg: TrainConfig) -> nn.Module:
    teacher, c, _ = load_detector(path)
    if c["image_size"] != cfg.image_size:
        raise RunError(f"teacher checkpoint {path} was trained at image_size {c['image_size']}, this run "
                       f"uses {cfg.image_size}: the two transforms must match")
    return teacher


def build_model(cfg: TrainConfig, num_classes: int, teacher: Optional[str]) -> nn.Module:
    """The student alone, or the student inside a Distiller around its (frozen) teacher, read from
    the checkpoint ``teacher``. Read here, after the student is built, whether it was trained just
    now or long ago: the run's random numbers are then the same either way."""
    student = build_student(cfg, num_classes)
    if not cfg.distill:
        return student
    return Distiller(load_teacher(teacher, cfg), student, cfg.imitation, total_iterations=cfg.iterations)


# ---- memory -------------------------------------------------------------------------------------

_PROBE = 128  # px: large enough that the backbone's activations dominate, as they do at full size


def _backbone_bytes(model: nn.Module) -> int:
    """Bytes of the outputs of every leaf module of ``model``'s backbone in one inference forward of a
    _PROBE px image: what a training step keeps for its backward, per image, at that size (a little
    under a step's measured peak: README, "Your files")."""
    total = 0

    def count(module, args, output):
        nonlocal total
        for t in output if isinstance(output, (list, tuple)) else [output]:
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(count) for m in model.backbone.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()([torch.zeros(3, _PROBE, _PROBE)])
    finally:
        for h in hooks:
            h.remove()
    return total


def free_memory(device: torch.device) -> int:
    """Bytes free for a run on ``device``: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(cfg: TrainConfig, device: Optional[torch.device] = None) -> int:
    """RunError before any work when one training step of ``cfg`` cannot fit in memory: the
    student's (and a teacher_arch teacher's) activations, estimated from a forward at _PROBE px scaled
    by the area, against what ``device`` has free (a fixed cap would refuse big machines or pass small
    ones). Returns the estimate in bytes."""
    device = device or setup_distributed().device
    scale = (cfg.image_size / _PROBE) ** 2 * cfg.batch_size
    models = [(cfg.student_arch, cfg.student_fpn_channels, cfg.fpn_norm)]
    if cfg.distill and cfg.teacher_arch and not cfg.teacher_checkpoint:
        models.append((cfg.teacher_arch, cfg.teacher_fpn_channels, cfg.fpn_norm))
    need = 0
    with torch.random.fork_rng(devices=[]):  # building the probes draws no number of the run's
        for arch, channels, norm in models:
            probe = build_detector(arch, 2, _PROBE, detector=cfg.detector, fpn_channels=channels, fpn_norm=norm)
            need += int(_backbone_bytes(probe) * scale)
    free = free_memory(device)
    if need > free:
        gb = 2 ** 30
        raise RunError(f"image_size {cfg.image_size} with batch_size {cfg.batch_size} needs about {need / gb:.3g} GB "
                       f"for one training step ({cfg.student_arch}; estimated from a forward at {_PROBE} px "
                       f"scaled by area), and {free / gb:.3g} GB are free on {device.type}: lower --image-size or "
                       "--batch-size")
    return need


# ---- the loop ---------------------------------------------------------------------------------

def train_one_epoch(state: TrainState, loader, cfg: TrainConfig, dist: Dist, runlog: RunLog,
                    checkpoint: Callable[[bool], None]) -> None:
    """The steps of epoch ``state.epoch`` from batch ``state.position`` on, until the epoch or the
    run (``cfg.iterations``) ends. ``checkpoint(end_of_epoch)`` is called every
    ``cfg.checkpoint_every`` iterations and at the last one."""
    model, opt = state.model, state.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    batches = len(loader)
    t_last, n_last = time.perf_counter(), 0
    for images, targets in loader:
        images = [im.to(dist.device, non_blocking=True) for im in images]
        targets = [{k: (v.to(dist.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            # a Distiller hands back the step's ImitationResult beside the losses (for the log)
            losses, result = model(images, targets, with_result=True) if cfg.distill else (model(images, targets), None)
        loss = sum(losses.values())
        # fp16: the GradScaler skips overflowing steps; otherwise a non-finite loss is divergence
        if cfg.amp != "fp16" and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at iteration {state.iteration}: "
                f"{ {k: float(v.detach()) for k, v in losses.items()} }; lower the learning rate or the "
                "imitation weight, or resume from an earlier checkpoint")
        opt.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if cfg.grad_clip:
            # An imitation loss on large, unnormalised features can give huge early gradients
            state.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        state.scaler.step(opt)
        state.scaler.update()
        state.scheduler.step()
        state.iteration, state.position = state.iteration + 1, state.position + 1
        it = state.iteration
        n_last += len(images) * dist.world
        if it % cfg.log_every == 0 or it == cfg.iterations:
            now = time.perf_counter()
            ips = n_last / max(now - t_last, 1e-9)
            t_last, n_last = now, 0
            row = {"iteration": it, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], "images_per_s": ips,
                   **{k: float(v.detach()) for k, v in losses.items()}, **imitation_columns(result)}
            runlog.log(row, shown={"loss": f"{row['loss']:.3f}", "img_s": f"{ips:.1f}"})
        runlog.advance()
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            checkpoint(state.position >= batches)
        if it >= cfg.iterations:
            return


def train(cfg: TrainConfig) -> dict:
    """Trains ``cfg``'s teacher when it needs one from scratch (``train_teacher``), then runs (or
    resumes) ``cfg`` itself (``run``); returns {"final": path, "metrics": dict or None}. The output
    folder is this run's alone while it works (``RunLock``; rank 0 holds it under torchrun)."""
    cfg.check()
    with _folder_lock(cfg):
        check_memory(cfg)
        return run(cfg, train_teacher(cfg))


def _folder_lock(cfg: TrainConfig):
    """RunLock on cfg.output_dir, after checking that it is a folder fgd can write in (rank 0 only:
    under torchrun the ranks share the folder)."""
    import contextlib

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    check_output_folder(cfg.output_dir, "--output-dir", inside=("checkpoints",))
    return RunLock(cfg.output_dir, command_line())


def run(cfg: TrainConfig, teacher: Optional[str] = None) -> dict:
    """Runs (or resumes) one training, distilling from the teacher checkpoint ``teacher`` when
    ``cfg.distill``; returns {"final": path, "metrics": dict or None}."""
    cfg.check()
    if cfg.distill and teacher is None:
        raise ValueError("run: a distilled run needs its teacher (train_teacher(cfg) gives it)")
    out = Path(cfg.output_dir)
    if teacher is not None and same_file(teacher, out / "final.pt"):
        raise RunError(f"the teacher {teacher} is this run's own output ({out / 'final.pt'}), which the run "
                       "replaces: give the student another --output-dir")
    with _folder_lock(cfg):
        return _run(cfg, teacher, out)


def _run(cfg: TrainConfig, teacher: Optional[str], out: Path) -> dict:
    dist = setup_distributed()
    ckpt_dir = out / "checkpoints"
    config = dataclasses.asdict(cfg)
    if dist.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_temp_files(ckpt_dir) + remove_temp_files(out)
        if removed:
            log.info("removed %d temporary files left by interrupted or failed writes in %s", removed, out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    ds = make_dataset(cfg, "train", train=True)
    sampler, loader = make_loader(ds, cfg, dist, train=True)
    model = build_model(cfg, ds.num_classes, teacher).to(dist.device)
    opt = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(cfg, it)),
                       torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16"))
    resumed = resume(state, ckpt_dir, config, dist.rank) if cfg.resume else None
    if dist.world > 1:
        torch.distributed.barrier()  # every rank has read the checkpoints before any is moved
    if dist.main and resumed is not None:
        log.info("resumed from %s at iteration %d (epoch %d, batch %d)", resumed, state.iteration, state.epoch,
                 state.position)
    if dist.main and resumed is None:
        set_aside_earlier_run(out, run_id(config))  # a fresh run: an earlier run's files are moved, never overwritten
    if dist.world > 1:
        torch.distributed.barrier()  # every rank sees the folder as rank 0 left it
        state.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    if dist.main:
        write_atomic(out / "config.json", json.dumps(
            {**config, "resolved_imitation_warmup": cfg.resolved_imitation_warmup(), "run_id": run_id(config)},
            indent=2))
        if cfg.distill:  # the one place this is said (printed: it belongs with the progress bar)
            print(f"{out.name}: imitation warm-up = {cfg.resolved_imitation_warmup()} of {cfg.iterations} "
                  f"iterations; lambda = {cfg.imitation_weight}, psi = {cfg.thresh}, levels = "
                  f"{cfg.level_policy}, mask = {cfg.mask_mode}", flush=True)
    runlog = RunLog(out / "log.csv", key="iteration", start=state.iteration, total=cfg.iterations,
                    progress=cfg.progress, tensorboard=out / "tb", desc=out.name, main=dist.main)
    extra = {"num_classes": ds.num_classes, "class_names": ds.class_names}

    def checkpoint(end_of_epoch: bool):
        # taken at the end of an epoch, it records the next epoch's start
        epoch, position = state.epoch, state.position
        if end_of_epoch:
            state.epoch, state.position = epoch + 1, 0
        save_checkpoint(state, config, extra, ckpt_dir, cfg.keep_checkpoints, dist.world, dist.main)
        state.epoch, state.position = epoch, position

    state.model.train()
    while state.iteration < cfg.iterations:
        sampler.set_epoch(state.epoch)
        sampler.set_start(state.position * cfg.batch_size)  # resuming mid-epoch: skip the batches seen
        if hasattr(ds.transforms, "set_epoch"):
            ds.transforms.set_epoch(state.epoch)
        train_one_epoch(state, loader, cfg, dist, runlog, checkpoint)
        if state.iteration < cfg.iterations or state.position >= len(loader):
            state.epoch, state.position = state.epoch + 1, 0
    runlog.close()

    student = _unwrap(state.model).student if cfg.distill else _unwrap(state.model)
    final = out / "final.pt"
    if dist.main:
        save_atomic({"student": student.state_dict(), "config": config, "iteration": state.iteration,
                     "run_id": run_id(config), **extra}, final)
    metrics = None
    if cfg.val_images:
        from .evaluate import evaluate

        val = make_dataset(cfg, "val", class_names=ds.class_names)
        metrics = evaluate(student, make_loader(val, cfg, dist, train=False)[1], dist)
        if dist.main:
            write_atomic(out / "metrics.json", json.dumps({k: v for k, v in metrics.items() if k != "summary"},
                                                          indent=2))
    if dist.world > 1:
        torch.distributed.barrier()
    return {"final": str(final), "metrics": metrics}
