"""The training loop: Adam + warm-up + clipping + EMA, gradient accumulation, DDP, resume.

One optimiser update ("step") consumes a global batch of ``train.batch_size`` images, split
over ``W`` processes and ``A = train.grad_accum`` micro-batches of ``m = B / (W A)`` images.

**Randomness is a function of (seed, step), not of the process layout.** Every rank draws the
diffusion steps ``t`` and noise of the *whole* global batch from a generator seeded by
``(seed, step)`` and uses the rows of its own images: rank ``r``'s micro-batch ``k`` holds the
images at global positions ``(k + j A) W + r`` (``j < m``). Together with the data sampler
(rank ``r`` takes every ``W``-th image of each epoch's permutation), a run on ``W`` processes
computes the same per-image losses as one process with ``A W`` micro-batches; resuming needs
no RNG state and is bit-identical on the CPU.

BatchNorm statistics are per micro-batch (per rank under DDP, as published) unless
``train.sync_bn`` is set on CUDA, where SyncBatchNorm pools them over the ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import BatchIterator, ShardedInfiniteSampler, build_dataset
from ..diffusion import draw_t_and_noise, initial_noise, sample, training_loss
from ..images import save_grid
from ..models import build_model
from ..models.checkpoint import WEIGHT_FILES, load_state_into
from ..runtime import retain_freed_memory
from ..snn import set_neuron_kernel
from .checkpoint import (
    METRICS_NAME,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    TRAINING_STATE_FORMAT,
    checkpoint_step,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_name,
    write_run_config,
)
from .distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from .ema import EMA
from .metrics import MetricsLogger
from .optim import build_optimizer, trainable_parameters

__all__ = ["NonFiniteLossError", "TrainResult", "micro_batch_positions", "step_seed", "train"]

_NOISE_STREAM = 0x5DD9


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped before updating."""

    def __init__(self, step: int, loss: float, grad_norm: float, checkpoint: Path | None) -> None:
        self.step, self.loss, self.grad_norm, self.checkpoint = step, loss, grad_norm, checkpoint
        where = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint is not None
            else "no checkpoint was written before it"
        )
        super().__init__(
            f"non-finite training loss at step {step} (loss {loss}, gradient norm {grad_norm}); "
            f"stopped without applying that update: {where}. Lower the learning rate (e.g. "
            "--set lr=...) or check the data, then resume with `sddpm train --resume RUN_DIR`."
        )


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    run_dir: Path
    step: int  # optimiser updates done
    start_step: int  # the step this invocation started from (0, or the resumed checkpoint's)
    losses: list[float]  # mean loss of each update this invocation made (all ranks)
    checkpoint: Path | None  # the last checkpoint written or resumed from
    model: nn.Module  # the trained (unwrapped) model, in train mode
    ema: EMA
    config: RunConfig
    elapsed_s: float = 0.0
    samples: list[Path] = field(default_factory=list)


def step_seed(seed: int, step: int) -> int:
    """The seed of update ``step``'s diffusion times and noise (a 63-bit integer)."""
    state = np.random.SeedSequence([int(seed), int(step), _NOISE_STREAM]).generate_state(
        1, np.uint64
    )
    return int(state[0]) >> 1


def micro_batch_positions(
    k: int, micro: int, accum: int, world_size: int, rank: int
) -> torch.Tensor:
    """Global-batch positions ``(k + j accum) world_size + rank`` (``j < micro``) of rank
    ``rank``'s micro-batch ``k``: the rows of the step's ``t`` and noise it uses."""
    return (k + torch.arange(micro) * accum) * world_size + rank


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _schedule_for(config: RunConfig):
    return config.diffusion.build()


def _checkpoint_extra(config: RunConfig, schedule, step: int, world_size: int) -> dict[str, Any]:
    return {
        # what sampling needs: read back by sddpm.generation.load_for_sampling
        "diffusion": {"schedule": schedule.to_dict(), "prediction": config.diffusion.prediction},
        "run": {
            "step": int(step),
            "images_seen": int(step) * config.train.batch_size,
            "world_size": world_size,
            "config": config.to_dict(),
        },
    }


def _apply_optim_settings(optimizer, scheduler, config: RunConfig) -> None:
    """Make a resumed optimiser follow ``config`` (which ``--set`` may have changed): lr,
    betas, eps, weight decay and warm-up. Unchanged settings give the saved values exactly."""
    o = config.optim
    for group in optimizer.param_groups:
        group.update(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, initial_lr=o.lr)
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    for fn in scheduler.lr_lambdas:
        fn.warmup_steps, fn.decay = int(o.warmup_steps), o.decay
        fn.total_steps = int(config.train.total_steps)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["lr"] = o.lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def train(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    command: list[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a model as ``config`` says, writing the run into ``run_dir``.

    Works alone or under ``torchrun`` (DDP over the ``env://`` process group; rank 0 alone
    writes files). ``resume=True`` continues from the newest checkpoint in ``run_dir`` (or
    starts afresh when there is none yet). Stops with :class:`NonFiniteLossError` when the loss
    or the gradient norm is not finite, before applying that update.

    Returns a :class:`TrainResult` on every rank.
    """
    config.validate()
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    ctx = setup_distributed(config.train.device)
    try:
        return _train(config, Path(run_dir), ctx, resume, command, progress)
    finally:
        cleanup_distributed(ctx)


def _train(
    config: RunConfig,
    run_dir: Path,
    ctx: DistContext,
    resume: bool,
    command: list[str] | None,
    progress: bool,
) -> TrainResult:
    tcfg, device = config.train, ctx.device
    world, accum = ctx.world_size, tcfg.grad_accum
    if tcfg.batch_size % (world * accum):
        raise ValueError(
            f"train.batch_size {tcfg.batch_size} must be divisible by world_size ({world}) x "
            f"grad_accum ({accum}) = {world * accum}"
        )
    micro = tcfg.batch_size // (world * accum)
    unet_cfg = config.unet_config()
    schedule = _schedule_for(config)
    shape = (unet_cfg.image_channels, unet_cfg.image_size, unet_cfg.image_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif tcfg.retain_cpu_memory:
        retain_freed_memory()  # no page faults for the large activations of every step

    # -- data (rank 0 downloads first, the others then read the files)
    def make_dataset(download: bool):
        return build_dataset(
            config.data.dataset,
            root=config.data.root,
            image_size=unet_cfg.image_size,
            hflip=config.data.hflip,
            download=download,
            seed=tcfg.seed,
            channels=unet_cfg.image_channels if config.data.dataset == "folder" else None,
        )

    if ctx.is_main:
        dataset = make_dataset(config.data.download)
    barrier(ctx)
    if not ctx.is_main:
        dataset = make_dataset(False)
    item = dataset[0]
    if tuple(item.shape) != shape:
        raise ValueError(
            f"dataset {config.data.dataset} gives images of shape {tuple(item.shape)} but the "
            f"model takes {shape}"
        )
    sampler = ShardedInfiniteSampler(len(dataset), seed=tcfg.seed, rank=ctx.rank, world_size=world)
    batches = BatchIterator(
        dataset,
        batch_size=accum * micro,
        sampler=sampler,
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
    )

    # -- model, optimiser, EMA: the same initial weights on every rank
    torch.manual_seed(tcfg.seed)
    model = build_model(unet_cfg)
    set_neuron_kernel(model, tcfg.neuron_kernel)
    if tcfg.sync_bn and world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main:
            warnings.warn(
                "train.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                "BatchNorm statistics stay per rank",
                stacklevel=2,
            )
    model.to(device)
    optimizer, scheduler = build_optimizer(model, config.optim, tcfg.total_steps)
    ema = EMA(model, config.optim.ema_decay)

    start_step, elapsed_before, ckpt = 0, 0.0, None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None and ctx.is_main:
            print(f"{run_dir} has no checkpoint yet: starting from step 0", file=sys.stderr)
    if ckpt is not None:
        state = load_training_state(ckpt)
        if state.get("format") != TRAINING_STATE_FORMAT:
            raise ValueError(f"{ckpt} holds no sddpm training state")
        load_state_into(model, load_file(str(ckpt / WEIGHT_FILES["model"])), str(ckpt))
        ema_file = ckpt / WEIGHT_FILES["ema"]
        if ema_file.is_file():
            ema.load_state_dict(load_file(str(ema_file), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_optim_settings(optimizer, scheduler, config)
        batches.load_state_dict(state["data"])
        start_step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        rngs = state.get("rng") or []
        if len(rngs) == world:
            set_rng_state(rngs[ctx.rank], device)
        if checkpoint_step(ckpt) != start_step:
            raise ValueError(f"{ckpt} holds the state of step {start_step}, not its name's")
    else:
        # Nothing in the loop draws from these (see the module docstring); seeded per rank for
        # any user code that does.
        torch.manual_seed(tcfg.seed + ctx.rank)
        np.random.seed((tcfg.seed + ctx.rank) % 2**32)
        random.seed(tcfg.seed + ctx.rank)

    net: nn.Module = model
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        net = ddp
    if tcfg.compile:
        net = torch.compile(net)

    # -- run directory (rank 0 only)
    logger = None
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        write_run_config(run_dir, config, command)
        logger = MetricsLogger(
            run_dir / METRICS_NAME,
            tensorboard_dir=run_dir / TENSORBOARD_DIR,
            resume_step=start_step if resume else None,
        )
        if ckpt is not None:
            tqdm.write(f"resuming {run_dir} from {ckpt.name} (step {start_step})", file=sys.stderr)
        if start_step >= tcfg.total_steps:
            tqdm.write(
                f"{run_dir} is already at step {start_step} of {tcfg.total_steps}; nothing to do "
                "(extend it with --set total_steps=N)",
                file=sys.stderr,
            )

    params = trainable_parameters(model)
    # No clipping still measures the norm (for the log and the finiteness check).
    clip = float(config.optim.grad_clip) if config.optim.grad_clip else math.inf
    generator = torch.Generator(device=device)
    global_shape = (tcfg.batch_size, *shape)
    positions = [micro_batch_positions(k, micro, accum, world, ctx.rank) for k in range(accum)]
    positions = [p.to(device) for p in positions]
    sample_model: nn.Module | None = None
    samples: list[Path] = []
    losses: list[float] = []
    last_ckpt = ckpt

    def checkpoint(step: int, elapsed: float) -> Path | None:
        rng = all_gather_objects(ctx, rng_state(device))
        path = None
        if ctx.is_main:
            training_state = {
                "format": TRAINING_STATE_FORMAT,
                "version": 1,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data": batches.state_dict(),
                "rng": rng,
                "world_size": world,
                "elapsed_s": elapsed,
            }
            path = save_checkpoint(
                run_dir,
                step,
                model,
                training_state,
                ema_state=ema.state_dict(),
                extra=_checkpoint_extra(config, schedule, step, world),
            )
            prune_checkpoints(run_dir, tcfg.keep_last)
        return path

    def draw_samples(step: int) -> Path:
        nonlocal sample_model
        if sample_model is None:
            sample_model = build_model(unet_cfg).to(device)
            set_neuron_kernel(sample_model, tcfg.neuron_kernel)
        sample_model.load_state_dict(ema.state_dict())
        sample_model.eval()
        x_T = initial_noise(tcfg.num_samples, shape, seed=tcfg.seed, device=device)
        images = sample(
            sample_model,
            x_T,
            sampler=tcfg.sampler,
            steps=min(tcfg.sample_steps, schedule.T),
            schedule=schedule,
            seed=tcfg.seed,
            prediction=config.diffusion.prediction,
        )
        path = save_grid(images, run_dir / SAMPLES_DIR / f"{step_name(step)}.png")
        return path

    bar = tqdm(
        total=tcfg.total_steps,
        initial=start_step,
        disable=not (progress and ctx.is_main),
        unit="step",
        dynamic_ncols=True,
        smoothing=0.05,
        desc=f"train {config.model.kind}",
    )
    t_start = time.perf_counter()
    t_window, window_losses, window_start = t_start, [], start_step
    step = start_step
    try:
        while step < tcfg.total_steps:
            model.train()
            x = next(batches).to(device, non_blocking=True)
            generator.manual_seed(step_seed(tcfg.seed, step))
            t_all, noise_all = draw_t_and_noise(
                torch.empty(global_shape, device=device), schedule, generator
            )
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for k in range(accum):
                pos = positions[k]
                sync = (
                    ddp.no_sync() if ddp is not None and k < accum - 1 else contextlib.nullcontext()
                )
                with sync:
                    with _autocast(device, tcfg.bf16):
                        loss = training_loss(
                            net,
                            x[k::accum],
                            schedule,
                            t=t_all[pos],
                            noise=noise_all[pos],
                            prediction=config.diffusion.prediction,
                        ).mean()
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
            loss_mean = all_reduce_mean(ctx, loss_sum / accum)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            loss_value, norm_value = float(loss_mean), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                raise NonFiniteLossError(step + 1, loss_value, norm_value, last_ckpt)
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            ema.update(model)
            step += 1
            losses.append(loss_value)
            window_losses.append(loss_value)
            bar.update(1)

            now = time.perf_counter()
            if step % tcfg.log_every == 0 or step == tcfg.total_steps:
                rate = (step - window_start) / max(now - t_window, 1e-9)
                row = {
                    "step": step,
                    "loss": float(np.mean(window_losses)),
                    "lr": lr_used,
                    "grad_norm": norm_value,
                    "steps_per_s": rate,
                    "images_per_s": rate * tcfg.batch_size,
                    "elapsed_s": elapsed_before + now - t_start,
                }
                if logger is not None:
                    logger.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                t_window, window_losses, window_start = now, [], step
            elif step == start_step + 1:
                bar.set_postfix(loss=f"{loss_value:.4f}")

            final = step == tcfg.total_steps
            if final or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0):
                last_ckpt = checkpoint(step, elapsed_before + time.perf_counter() - t_start)
            if tcfg.num_samples and (
                final or (tcfg.sample_every and step % tcfg.sample_every == 0)
            ):
                if ctx.is_main:
                    samples.append(draw_samples(step))
    finally:
        bar.close()
        if logger is not None:
            logger.close()
        batches.close()
    elapsed = elapsed_before + time.perf_counter() - t_start
    if ctx.is_main and progress and step > start_step:
        tqdm.write(
            f"trained {step - start_step} steps to step {step} in "
            f"{time.perf_counter() - t_start:.1f} s; checkpoint {last_ckpt}",
            file=sys.stderr,
        )
    return TrainResult(
        run_dir=run_dir,
        step=step,
        start_step=start_step,
        losses=losses,
        checkpoint=last_ckpt if ctx.is_main else None,
        model=model,
        ema=ema,
        config=config,
        elapsed_s=elapsed,
        samples=samples,
    )
