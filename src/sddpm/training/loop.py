"""The training loop: Adam + warm-up + clipping + EMA, gradient accumulation, DDP, resume.

One optimiser update ("step") consumes a global batch of ``train.batch_size`` images, split
over ``W`` processes and ``A = train.grad_accum`` micro-batches of ``m = B / (W A)`` images.

**Randomness is a function of (seed, step), not of the process layout.** Every rank draws the
diffusion steps ``t`` and noise of the *whole* global batch from a generator seeded by
``(seed, step)`` and uses the rows of its own images: rank ``r``'s micro-batch ``k`` holds the
images at global positions ``(k + j A) W + r`` (``j < m``).

**So is the data order.** The images are one endless global stream, the concatenation of the
epoch permutations drawn from ``(seed, epoch)`` (:class:`~sddpm.data.ShardedInfiniteSampler`),
consumed ``B`` entries per step: global position ``g`` of a step's batch is stream entry
``P + g``, ``P`` the stream position at that step (``step * B`` for a run started with this
scheme), and rank ``r``'s batch row ``i`` is global position ``i W + r``
(:func:`rank_batch_positions`; micro-batch ``k`` is ``x[k::A]``). Each image's flip follows the
epoch of its stream entry. A run on ``W`` processes therefore computes the same per-image
losses as one process with ``A W`` micro-batches (the same images in each micro-batch, so the
same BatchNorm statistics too); resuming needs no RNG state, is bit-identical on the CPU, and
works on any number of processes (the checkpoint holds the global stream position; see
:meth:`Trainer._restore_checkpoint` for checkpoints that hold the older per-rank one).

**Class-conditional models** (``num_classes = N > 0``) train on the dataset's labels (its
class count checked against ``N`` before the first step), each replaced by the null class ``N``
with probability ``train.cond_drop`` (classifier-free guidance's label dropout). The dropout
decisions follow the same rule: on the host, every rank draws one uniform per image of the
whole global batch from a CPU generator seeded by ``(seed, step)``
(:func:`~sddpm.diffusion.label_dropout_uniforms`) and drops its own images' labels with the
entries at their global positions (:func:`rank_batch_positions`). So a run on ``W`` processes
drops the labels one process with ``A W`` micro-batches drops, and the training state holds no
dropout RNG state (older checkpoints' per-rank dropout streams are ignored on resume).

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
from torch import nn
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import BatchIterator, ShardedInfiniteSampler, build_dataset, check_num_classes
from ..diffusion import (
    cycle_labels,
    draw_t_and_noise,
    drop_labels,
    initial_noise,
    label_dropout_uniforms,
    sample,
    training_loss,
)
from ..distributed import (
    DistContext,
    all_gather_objects,
    any_rank,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from ..images import save_grid
from ..io import state_dict_mismatch
from ..models import build_model, set_memory_format
from ..models.checkpoint import load_state_into, read_config
from ..models.config import UNetConfig
from ..rundir import (
    METRICS_NAME,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    TRAINING_STATE_FORMAT,
    Checkpoint,
    find_model_dir,
    latest_resumable,
    load_weights,
    prune_checkpoints,
    remove_partial_checkpoints,
    save_checkpoint,
    step_name,
    write_run_config,
)
from ..runtime import retain_freed_memory
from ..snn import set_neuron_kernel
from .checkpoint import rng_state, set_rng_state
from .ema import EMA
from .errors import CheckpointWriteError, NonFiniteLossError, TrainingStopped
from .metrics import MetricsLogger
from .optim import build_optimizer, trainable_parameters
from .signals import StopRequest

__all__ = [
    "CheckpointWriteError",
    "NonFiniteLossError",
    "TrainResult",
    "Trainer",
    "TrainingStopped",
    "micro_batch_positions",
    "rank_batch_positions",
    "step_seed",
    "train",
]

_NOISE_STREAM = 0x5DD9


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


def rank_batch_positions(micro: int, accum: int, world_size: int, rank: int) -> torch.Tensor:
    """Global-batch positions of rank ``rank``'s ``accum * micro`` images, in the order its
    batch ``x`` (and labels ``y``) holds them: micro-batch ``k`` is ``x[k::accum]``, so row
    ``j accum + k`` is at :func:`micro_batch_positions` ``(k, ...)[j]``. (That is
    ``i world_size + rank`` for row ``i``: the rank's rows are the global batch's
    ``rank::world_size``.)"""
    positions = torch.empty(accum * micro, dtype=torch.int64)
    for k in range(accum):
        positions[k::accum] = micro_batch_positions(k, micro, accum, world_size, rank)
    return positions


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    writes files). ``resume=True`` continues from the newest good checkpoint in ``run_dir``
    (or starts afresh when there is none yet); a fresh start with ``train.init_from`` set
    begins from that model's weights (:meth:`Trainer.restore`).

    Stops with :class:`NonFiniteLossError` when the loss or the gradient norm is not finite
    (found at the next logging or checkpoint step, before any checkpoint after it is written),
    with :class:`TrainingStopped` after SIGTERM or SIGINT (a checkpoint of the last whole step
    is written first; a second signal exits at once), and with :class:`CheckpointWriteError`
    on every rank when rank 0 cannot write.

    Returns a :class:`TrainResult` on every rank.
    """
    config.validate()
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    ctx = setup_distributed(config.train.device)
    try:
        trainer = Trainer(config, Path(run_dir), ctx, command=command, progress=progress)
        trainer.setup()
        trainer.restore(resume)
        return trainer.run()
    finally:
        cleanup_distributed(ctx)


class Trainer:
    """One training run: :meth:`setup` (data, model, optimiser, EMA), :meth:`restore` (resume
    or initialise), then :meth:`run`, which repeats :meth:`train_step` (one optimiser update,
    no host sync) and, at their steps, :meth:`save` (a checkpoint) and :meth:`sample` (a grid).

    **Host syncs.** A step keeps its loss, gradient norm, finiteness record and EMA on the
    device and the schedule tables live there too; they are read back only at logging and
    checkpoint steps (:meth:`_sync`), in one transfer. Under DDP the stop request of a signal
    travels in the same all-reduce, so every rank stops at the same step.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        ctx: DistContext,
        *,
        command: list[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.config, self.run_dir, self.ctx = config, Path(run_dir), ctx
        self.command, self.progress = command, progress
        self.tcfg, self.device = config.train, ctx.device
        world, accum = ctx.world_size, self.tcfg.grad_accum
        if self.tcfg.batch_size % (world * accum):
            raise ValueError(
                f"train.batch_size {self.tcfg.batch_size} must be divisible by world_size "
                f"({world}) x grad_accum ({accum}) = {world * accum}"
            )
        self.micro = self.tcfg.batch_size // (world * accum)
        self.unet_cfg = config.unet_config()
        self.schedule = config.diffusion.build()
        if self.schedule.T != self.unet_cfg.diffusion_steps:
            raise ValueError(
                f"the schedule has {self.schedule.T} steps but the model embeds "
                f"{self.unet_cfg.diffusion_steps}"
            )
        c = self.unet_cfg
        self.shape = (c.image_channels, c.image_size, c.image_size)
        self.num_classes = int(c.num_classes)
        self.class_names: list[str] | None = None  # the data's classes (conditional runs)
        self.step = self.start_step = 0
        self.elapsed_before = 0.0
        self.last_ckpt: Path | None = None
        self.resumed = False
        self.losses: list[float] = []
        self.samples: list[Path] = []
        self.logger: MetricsLogger | None = None
        self.stop = StopRequest(announce=ctx.is_main)
        self.stop.describe = lambda: f"finishing step {self.step + 1}, then writing a checkpoint"
        self._pending: list[torch.Tensor] = []  # per-step losses not yet read back
        self._window: list[float] = []  # losses since the last log row
        self._sample_model: nn.Module | None = None

    @classmethod
    def without_data(cls, config: RunConfig, device: str | torch.device) -> Trainer:
        """A one-process trainer with its model, optimiser and EMA set up but no data set or
        run directory: the caller feeds :meth:`train_step` its own images (the benchmarks time
        the very update ``sddpm train`` makes). :attr:`last_loss` reads its latest loss."""
        trainer = cls(config, Path(os.devnull), DistContext(device=torch.device(device)))
        trainer._device_settings()
        trainer._setup_model()
        trainer._wrap()
        return trainer

    @property
    def last_loss(self) -> torch.Tensor | None:
        """The mean loss of the latest update not yet read back, on the device (no sync)."""
        return self._pending[-1] if self._pending else None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Data, model, optimiser and EMA: the same initial weights on every rank."""
        self._device_settings()
        self._setup_data()
        self._setup_model()

    def _device_settings(self) -> None:
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv once
        elif self.tcfg.retain_cpu_memory:
            retain_freed_memory()  # no page faults for the large activations of every step

    def _make_dataset(self, download: bool):
        c = self.config
        return build_dataset(
            c.data.dataset,
            root=c.data.root,
            image_size=self.unet_cfg.image_size,
            hflip=c.data.hflip,
            download=download,
            seed=self.tcfg.seed,
            channels=self.unet_cfg.image_channels if c.data.dataset == "folder" else None,
        )

    def _setup_data(self) -> None:
        ctx = self.ctx
        # rank 0 downloads first, the others then read the files
        dataset = self._make_dataset(self.config.data.download) if ctx.is_main else None
        barrier(ctx)
        if dataset is None:
            dataset = self._make_dataset(False)
        if self.num_classes > 0:
            # Reads and checks the labels now (range, count): before any step, and the step
            # need not read them back (see the class docstring).
            check_num_classes(dataset, self.num_classes)
            dataset.with_labels()
            self.class_names = list(dataset.class_names)
        item = dataset[0][0] if self.num_classes > 0 else dataset[0]
        if tuple(item.shape) != self.shape:
            raise ValueError(
                f"dataset {self.config.data.dataset} gives images of shape "
                f"{tuple(item.shape)} but the model takes {self.shape}"
            )
        sampler = ShardedInfiniteSampler(
            len(dataset), seed=self.tcfg.seed, rank=ctx.rank, world_size=ctx.world_size
        )
        self.batches = BatchIterator(
            dataset,
            batch_size=self.tcfg.grad_accum * self.micro,
            sampler=sampler,
            num_workers=self.config.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _setup_model(self) -> None:
        ctx, tcfg, device = self.ctx, self.tcfg, self.device
        torch.manual_seed(tcfg.seed)
        model = build_model(self.unet_cfg)
        # checked now for the device it will run on: no Triton or C++ compiler fails before step 1
        set_neuron_kernel(model, tcfg.neuron_kernel, device=device)
        set_memory_format(model, tcfg.memory_format)  # before the optimiser holds the weights
        # t is drawn below as randint(0, schedule.T) and schedule.T == diffusion_steps was
        # checked on the host: the model need not read t back to check it again.
        model.check_t_values = False
        # Labels come from the dataset, checked when read (_setup_data), or are the null class.
        model.check_y_values = False
        # Where this rank's labels sit in the global batch: the entries of the step's dropout
        # uniforms it uses (on the host, like the labels).
        self.label_positions = (
            rank_batch_positions(self.micro, tcfg.grad_accum, ctx.world_size, ctx.rank)
            if self.num_classes > 0
            else None
        )
        if tcfg.sync_bn and ctx.world_size > 1:
            if device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif ctx.is_main:
                warnings.warn(
                    "train.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                    "BatchNorm statistics stay per rank",
                    stacklevel=2,
                )
        self.model = model.to(device)
        self.optimizer, self.scheduler = build_optimizer(model, self.config.optim, tcfg.total_steps)
        self.ema = EMA(model, self.config.optim.ema_decay)
        self.params = trainable_parameters(model)
        # No clipping still measures the norm (for the log and the finiteness check).
        grad_clip = self.config.optim.grad_clip
        self.clip = float(grad_clip) if grad_clip else math.inf
        self.schedule_on_device = self.schedule.to(device)
        self.generator = torch.Generator(device=device)
        accum, world = tcfg.grad_accum, ctx.world_size
        self.positions = [
            micro_batch_positions(k, self.micro, accum, world, ctx.rank).to(device)
            for k in range(accum)
        ]
        self._bad_step = torch.zeros((), dtype=torch.int64, device=device)
        self._bad_values = torch.zeros(2, dtype=torch.float64, device=device)
        self._last_norm = torch.zeros((), device=device)

    def _wrap(self) -> None:
        """``self.net``: the model as the step calls it (DDP, then ``torch.compile``).

        Compiling the DDP wrapper, not the inner module, is what PyTorch documents for DDP:
        DDP's own forward runs eagerly (so ``no_sync`` and its gradient hooks work) and
        Dynamo's DDP optimiser splits the compiled graph at the gradient buckets, so the
        all-reduce still overlaps the backward pass. Checked on the CPU: 2 Gloo ranks,
        ``grad_accum=2`` (the ``no_sync`` path), ``torch.compile(backend="aot_eager")``,
        3 steps: equal losses and parameters on both ranks (70 s, too slow for the suite)."""
        net: nn.Module = self.model
        self.ddp = None
        if self.ctx.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            net = self.ddp
        if self.tcfg.compile:
            net = torch.compile(net)
        self.net = net

    # ------------------------------------------------------------------ restore
    def restore(self, resume: bool) -> None:
        """Continue from the run's newest good checkpoint (``resume``), else start afresh:
        from ``train.init_from``'s weights when set, from the seeded initialisation otherwise.
        Then wrap the model for the step and open the run directory."""
        ckpt = latest_resumable(self.run_dir) if resume else None
        if resume and ckpt is None and self.ctx.is_main:
            print(f"{self.run_dir} has no checkpoint yet: starting from step 0", file=sys.stderr)
        if ckpt is not None:
            self._restore_checkpoint(ckpt)
        else:
            if self.tcfg.init_from:
                self.init_from(self.tcfg.init_from)
            # Nothing in the loop draws from these (see the module docstring); seeded per rank
            # for any user code that does.
            rank = self.ctx.rank
            torch.manual_seed(self.tcfg.seed + rank)
            np.random.seed((self.tcfg.seed + rank) % 2**32)
            random.seed(self.tcfg.seed + rank)
        self.resumed = resume
        self._wrap()
        self._open_run_dir()

    def _restore_checkpoint(self, ckpt: Checkpoint) -> None:
        state = ckpt.training_state
        if state.get("format") != TRAINING_STATE_FORMAT:
            raise ValueError(f"{ckpt.path} holds no sddpm training state")
        load_state_into(self.model, ckpt.model_state, str(ckpt.path))
        if ckpt.ema_state is not None:
            self.ema.load_state_dict(ckpt.ema_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _apply_optim_settings(self.optimizer, self.scheduler, self.config)
        # The data position is global (sampler state version 2): any world size resumes it.
        # Checkpoints written before hold a per-rank (epoch, offset, world_size) position; it
        # is converted to the global one (sddpm.data.sampler.position_of_v1_state), exactly
        # when their world size divided the dataset length (always so for one process);
        # otherwise the order is the old one to the end of the current epoch, then the
        # unpadded global stream.
        self.batches.load_state_dict(state["data"])
        self.step = self.start_step = ckpt.step
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        rngs = state.get("rng") or []
        if len(rngs) == self.ctx.world_size:
            set_rng_state(rngs[self.ctx.rank], self.device)
        # Checkpoints written before the dropout decisions became a function of (seed, step)
        # carry a "label_dropout" list of per-rank generator states. It is ignored: after such a
        # resume the decisions follow the (seed, step) scheme (different labels are dropped
        # from the resumed step on than the old stream would have dropped, at the same rate).
        self.last_ckpt = ckpt.path

    def init_from(self, source: str | os.PathLike) -> list[str]:
        """Load a trained model's weights into this fresh run's model (and EMA).

        ``source`` is a model directory or a run directory (its newest good checkpoint). Its
        EMA weights are used when it has them (the averaged model is the one a fine-tune
        starts from, as SDM does), its raw weights otherwise. Entries this run's config adds
        (absent from a model built with the source's own config, e.g. a new block's scales)
        keep their initialisation; any other difference (a missing, unexpected or mis-shaped
        entry) is a ``ValueError`` listing them. Returns the names that kept their init."""
        directory = find_model_dir(source)
        which = "ema" if (directory / "ema.safetensors").is_file() else "model"
        given = load_weights(directory, which)
        source_keys = set(
            build_model(UNetConfig.from_dict(read_config(directory)["model"])).state_dict()
        )
        expected = self.model.state_dict()
        added = [k for k in expected if k not in given and k not in source_keys]
        fill = {k: expected[k] for k in added}
        problem = state_dict_mismatch({k: v.shape for k, v in expected.items()}, {**given, **fill})
        if problem:
            raise ValueError(
                f"train.init_from {directory}: its {which} weights do not fit this run's model "
                f"({problem}); only entries this run's config adds may be missing"
            )
        self.model.load_state_dict({**given, **fill})
        self.ema = EMA(self.model, self.config.optim.ema_decay)
        if self.ctx.is_main:
            kept = f"; {len(added)} new entries keep their init: {added[:5]}" if added else ""
            print(f"initialised from {directory} ({which} weights){kept}", file=sys.stderr)
        return added

    def _open_run_dir(self) -> None:
        if not self.ctx.is_main:
            return
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        write_run_config(run_dir, self.config, self.command, classes=self.class_names)
        self.logger = MetricsLogger(
            run_dir / METRICS_NAME,
            tensorboard_dir=run_dir / TENSORBOARD_DIR,
            resume_step=self.start_step if self.resumed else None,
        )
        if self.last_ckpt is not None:
            tqdm.write(
                f"resuming {run_dir} from {self.last_ckpt.name} (step {self.start_step})",
                file=sys.stderr,
            )
        if self.start_step >= self.tcfg.total_steps:
            tqdm.write(
                f"{run_dir} is already at step {self.start_step} of {self.tcfg.total_steps}; "
                "nothing to do (extend it: raise train.total_steps; CLI: --set total_steps=N)",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ one update
    def train_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        """One optimiser update on this rank's images ``x`` ``[A m, C, H, W]`` in [-1, 1] (a
        conditional model: ``(x, labels [A m] int64)``, the dataset's labels on the host, whose
        dropout is decided there from the step's uniforms at the images' global positions);
        nothing is read back to the host (see the class docstring)."""
        tcfg, device, accum, ddp = self.tcfg, self.device, self.tcfg.grad_accum, self.ddp
        self.model.train()
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if (y is None) != (self.label_positions is None):
            raise ValueError(
                "a class-conditional model trains on (images, labels) batches, an "
                "unconditional one on images only"
            )
        if y is not None:
            # On the host, where the labels are: no device sync. Row i of y is the image at
            # global position label_positions[i] (see rank_batch_positions).
            u = label_dropout_uniforms(tcfg.seed, self.step, tcfg.batch_size)
            y = drop_labels(y, tcfg.cond_drop, self.num_classes, uniforms=u[self.label_positions])
            y = y.to(device, non_blocking=True)
        x = x.to(device, non_blocking=True)
        self.generator.manual_seed(step_seed(tcfg.seed, self.step))
        t_all, noise_all = draw_t_and_noise(
            torch.empty((tcfg.batch_size, *self.shape), device=device),
            self.schedule_on_device,
            self.generator,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for k in range(accum):
            pos = self.positions[k]
            sync = ddp.no_sync() if ddp is not None and k < accum - 1 else contextlib.nullcontext()
            with sync:
                with _autocast(device, tcfg.bf16):
                    loss = training_loss(
                        self.net,
                        x[k::accum],
                        self.schedule_on_device,
                        t=t_all[pos],
                        noise=noise_all[pos],
                        prediction=self.config.diffusion.prediction,
                        check_t=False,  # drawn above from randint(0, T)
                        y=None if y is None else y[k::accum],
                    ).mean()
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        # The first non-finite update's number, loss and norm, recorded on the device.
        first = ~(torch.isfinite(loss_mean) & torch.isfinite(grad_norm)) & (self._bad_step == 0)
        self._bad_step = torch.where(first, self.step + 1, self._bad_step)
        record = torch.stack([loss_mean.double(), grad_norm.detach().double()])
        self._bad_values = torch.where(first, record, self._bad_values)
        self._last_norm = grad_norm.detach()
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self._pending.append(loss_mean)
        self.step += 1

    def _sync(self, log: bool) -> bool:
        """Read back the losses since the last sync (mean over ranks), check they were finite,
        write a log row if ``log``; returns whether any rank was asked to stop."""
        ctx = self.ctx
        n = len(self._pending)
        flags = torch.stack(
            [
                (self._bad_step > 0).float(),
                torch.tensor(float(self.stop.requested), device=self.device),
            ]
        )
        reduced = torch.cat([torch.stack(self._pending).float(), flags]) if n else flags
        if ctx.distributed:
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
            reduced[:n] /= ctx.world_size
        local = torch.cat(
            [self._last_norm.double().view(1), self._bad_values, self._bad_step.double().view(1)]
        )
        values = torch.cat([reduced.double(), local]).tolist()  # the one read-back
        losses, (bad, stop, norm, bad_loss, bad_norm, bad_step) = values[:n], values[n:]
        self._pending.clear()
        self.losses.extend(losses)
        self._window.extend(losses)
        if bad > 0:
            step = int(bad_step) if bad_step > 0 else self.step
            raise NonFiniteLossError(step, bad_loss, bad_norm, self.last_ckpt)
        if log:
            self._log(norm)
        return stop > 0

    def _log(self, grad_norm: float) -> None:
        now = time.perf_counter()
        rate = (self.step - self._window_start) / max(now - self._t_window, 1e-9)
        row = {
            "step": self.step,
            "loss": float(np.mean(self._window)),
            "lr": self._last_lr,
            "grad_norm": grad_norm,
            "steps_per_s": rate,
            "images_per_s": rate * self.tcfg.batch_size,
            "elapsed_s": self.elapsed_before + now - self._t_start,
        }
        if self.logger is not None:
            self.logger.log(row)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
        self._t_window, self._window, self._window_start = now, [], self.step

    # ------------------------------------------------------------------ rank 0's writes
    def _on_main(self, what: str, write) -> Any:
        """``write()`` on rank 0; every rank then learns whether it failed, so that all stop
        with the error instead of the others waiting for rank 0 in the next collective."""
        result, error = None, None
        if self.ctx.is_main:
            try:
                result = write()
            except Exception as err:  # e.g. OSError: no space left on device
                error = err
        if any_rank(self.ctx, error is not None):
            # Every rank knows now and leaves together: a rank that tears its process group
            # down while another is still in a collective can abort the other's process.
            barrier(self.ctx)
            if error is not None:
                raise CheckpointWriteError(
                    f"could not write the {what} of step {self.step} in {self.run_dir}: {error}. "
                    f"The last good checkpoint is {self.last_ckpt}; free space and continue "
                    f"with train(..., resume=True) (CLI: `sddpm train --resume {self.run_dir}`)"
                ) from error
            raise CheckpointWriteError(
                f"rank 0 could not write the {what} of step {self.step}: this rank stops too "
                "(rank 0's log has the reason)"
            )
        return result

    def save(self) -> Path | None:
        """Write the checkpoint of the current step (rank 0; the path, ``None`` elsewhere)."""
        rng = all_gather_objects(self.ctx, rng_state(self.device))
        elapsed = self.elapsed_before + time.perf_counter() - self._t_start
        training_state = {
            "format": TRAINING_STATE_FORMAT,
            "version": 1,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "rng": rng,
            "world_size": self.ctx.world_size,
            "elapsed_s": elapsed,
        }
        config = self.config

        def write() -> Path:
            path = save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                training_state,
                ema_state=self.ema.state_dict(),
                schedule=self.schedule,
                prediction=config.diffusion.prediction,
                extra={
                    "run": {
                        "step": self.step,
                        "images_seen": self.step * config.train.batch_size,
                        "world_size": self.ctx.world_size,
                        "config": config.to_dict(),
                    }
                },
            )
            prune_checkpoints(self.run_dir, self.tcfg.keep_last)
            return path

        path = self._on_main("checkpoint", write)
        self.last_ckpt = path if self.ctx.is_main else self.last_ckpt
        return path

    def sample(self) -> Path | None:
        """Write a sample grid of the EMA model (rank 0; the path, ``None`` elsewhere)."""
        return self._on_main("sample grid", self._draw_samples)

    def _draw_samples(self) -> Path:
        tcfg, device = self.tcfg, self.device
        if self._sample_model is None:
            self._sample_model = build_model(self.unet_cfg).to(device)
            set_neuron_kernel(self._sample_model, tcfg.neuron_kernel)
            set_memory_format(self._sample_model, tcfg.memory_format)
        self._sample_model.load_state_dict(self.ema.state_dict())
        self._sample_model.eval()
        x_T = initial_noise(tcfg.num_samples, self.shape, seed=tcfg.seed, device=device)
        # A conditional model: image i of class i mod N, one class per row of the grid.
        labels = (
            cycle_labels(tcfg.num_samples, range(self.num_classes)) if self.num_classes else None
        )
        images = sample(
            self._sample_model,
            x_T,
            sampler=tcfg.sampler,
            steps=min(tcfg.sample_steps, self.schedule.T),
            schedule=self.schedule,
            seed=tcfg.seed,
            prediction=self.config.diffusion.prediction,
            labels=labels,
        )
        path = save_grid(
            images, self.run_dir / SAMPLES_DIR / f"{step_name(self.step)}.png", labels=labels
        )
        self.samples.append(path)
        return path

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to ``train.total_steps``; returns a :class:`TrainResult` on every rank."""
        tcfg, ctx = self.tcfg, self.ctx
        self.bar = tqdm(
            total=tcfg.total_steps,
            initial=self.start_step,
            disable=not (self.progress and ctx.is_main),
            unit="step",
            dynamic_ncols=True,
            smoothing=0.05,
            desc=f"train {self.config.model.kind}",
        )
        self._t_start = self._t_window = time.perf_counter()
        self._window_start = self.start_step
        try:
            with self.stop:
                while self.step < tcfg.total_steps:
                    self.train_step(next(self.batches))
                    self.bar.update(1)
                    if self._after_step():
                        break
        finally:
            self.bar.close()
            if self.logger is not None:
                self.logger.close()
            self.batches.close()
        if self.stop.requested and self.step < tcfg.total_steps:  # (not when it just finished)
            barrier(ctx)  # the ranks agreed on this step: they leave together (see _on_main)
            raise TrainingStopped(self.stop.name, self.step, self.last_ckpt, self.run_dir)
        if ctx.is_main and self.progress and self.step > self.start_step:
            tqdm.write(
                f"trained {self.step - self.start_step} steps to step {self.step} in "
                f"{time.perf_counter() - self._t_start:.1f} s; checkpoint {self.last_ckpt}",
                file=sys.stderr,
            )
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            start_step=self.start_step,
            losses=self.losses,
            checkpoint=self.last_ckpt if ctx.is_main else None,
            model=self.model,
            ema=self.ema,
            config=self.config,
            elapsed_s=self.elapsed_before + time.perf_counter() - self._t_start,
            samples=self.samples,
        )

    def _after_step(self) -> bool:
        """Log, stop, checkpoint and sample as their steps come; returns whether to stop.

        A single process checks for a signal after every step; under DDP the ranks agree on
        it at logging (and checkpoint) steps, in the all-reduce of the losses."""
        tcfg, step = self.tcfg, self.step
        final = step == tcfg.total_steps
        log = step % tcfg.log_every == 0 or final
        save = final or bool(tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
        asked = self.stop.requested and not self.ctx.distributed
        stop = self._sync(log) if (log or save or asked) else False
        if stop:
            self.stop.request()  # another rank's signal stops this one too
        if save or stop:
            self.save()
        if tcfg.num_samples and (final or (tcfg.sample_every and step % tcfg.sample_every == 0)):
            self.sample()
        return stop
