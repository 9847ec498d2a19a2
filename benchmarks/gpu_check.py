"""The GPU acceptance check: the first command to run on a machine with a GPU.

    python benchmarks/gpu_check.py                       # one CUDA GPU, under 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick  # the same path, tiny settings (CI)

It checks, on the chosen device, everything a GPU can break that a CPU cannot:

- bf16 training steps of the spiking and ANN ``cifar10`` presets at batch 128 (random images:
  no data set is needed): the loss is finite; images/s, peak memory, the projected hours of the
  paper's 500k steps, the spiking/ANN step-time ratio, and the convolutions' share of dense bf16
  conv throughput measured in the same run;
- checkpoint and resume through ``sddpm.training.train`` on a small image folder it writes;
- every neuron kernel (eager, compiled, triton) agreeing with eager, spikes and gradients,
  in float32 and bf16;
- sampling with DPM-Solver++ (20 steps) under bf16 autocast and ``torch.compile``;
- the FID Inception network's features on the device against the CPU's (TF32 off), with the real
  weights where they are on disk, else with the rule-made weights of the reference vectors;
- one training step under DistributedDataParallel in a one-process group (NCCL on CUDA, gloo on
  the CPU), launched through ``torch.distributed.run`` as users launch training;
- a compiled training step's gradients against eager mode's, for both models (small, float32,
  TF32 off: every parameter's gradient norm within 0.5x..2x of eager's; a lost gradient fails);
- only when asked (``--only compiled-training``, minutes of compilation): the training steps of
  both models under ``torch.compile``, as ``sddpm train --compile`` runs them, with the targets.

It prints one table, writes JSON (``--json``), and ends with one line: ``PASS`` or ``FAIL``.
The JSON is rewritten (atomically) after every row, with ``"verdict": "INCOMPLETE"`` until the
last check ends, so a run cut short by a time limit still leaves what it measured. ``--only``
runs some of the checks (``--only training,ddp``), to rerun what failed within a short lease.
Performance targets (for one H200: spiking >= 1,500 images/s, <= 4x the ANN's step time, convs
at >= 40 % of dense bf16 conv throughput) are reported beside the checks and do not decide
PASS/FAIL, which is about correctness. ``--device cpu --quick`` runs Triton's kernels under
its interpreter (the script sets ``TRITON_INTERPRET=1`` itself, before Triton is imported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INCEPTION_VECTORS = REPO / "tests" / "data" / "fid-inception.safetensors"
TARGETS = {"images_per_s": 1500.0, "spiking_over_ann": 4.0, "conv_share": 0.40}
# The cifar10 architecture shrunk for the quick checks: every kind of block, few layers.
QUICK_MODEL = {"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, ... or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny settings (the CI run)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 128)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 10)")
    ap.add_argument(
        "--json", type=Path, default=None, help="write the results here (after every row)"
    )
    ap.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the final table here as Markdown (for benchmarks/README.md)",
    )
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated checks to run (default all): {', '.join(SECTIONS)}",
    )
    ap.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend for the sampling and DDP checks (default inductor; "
        "aot_eager with --device cpu --quick, which traces the same graphs without generating "
        "C++, minutes on a small CPU)",
    )
    ap.add_argument("--ddp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Checks:
    """Rows of the final table: name, status (PASS, FAIL, SKIP or INFO), value, detail.

    With a ``report`` path, the JSON record (``header`` and the rows so far, verdict
    ``INCOMPLETE``) is rewritten atomically after every row, and by :meth:`finish` with the
    verdict."""

    def __init__(self, report: Path | None = None, header: dict | None = None) -> None:
        self.rows: list[dict] = []
        self.report = report
        self.header = dict(header or {})
        self.started = time.perf_counter()
        self.write("INCOMPLETE")

    def add(self, name: str, status: str, value: str = "", detail: str = "", **data) -> None:
        row = {"check": name, "status": status, "value": value, "detail": detail}
        self.rows.append({**row, **data})
        print(f"  {status:4}  {name}: {value} {detail}".rstrip(), flush=True)
        self.write("INCOMPLETE")

    def markdown(self) -> str:
        """The table as Markdown, under a line naming the machine, the versions and the verdict
        (``|`` in a cell is escaped)."""
        h = self.header
        cols = ("check", "status", "value", "detail")
        lines = [
            f"`gpu_check.py` on {h.get('device_name', '?')} ({h.get('device', '?')}): torch "
            f"{h.get('torch', '?')}, triton {h.get('triton', '?')}, Python {h.get('python', '?')}"
            + (", --quick" if h.get("quick") else "")
            + f"; {self.verdict} in {time.perf_counter() - self.started:.0f} s.",
            "",
            "| " + " | ".join(cols) + " |",
            "| " + " | ".join("---" for _ in cols) + " |",
        ]
        for r in self.rows:
            cells = (str(r[c]).replace("|", "\\|") for c in cols)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def write(self, verdict: str) -> None:
        if self.report is None:
            return
        from sddpm.io import write_json

        seconds = time.perf_counter() - self.started
        record = {"verdict": verdict, "seconds": seconds, **self.header, "checks": self.rows}
        write_json(self.report, json_safe(record))

    def finish(self) -> str:
        """The verdict, written into the report."""
        self.write(self.verdict)
        return self.verdict

    @contextlib.contextmanager
    def run(self, name: str):
        """A check whose exception is a FAIL row (with the error's last line), not a crash."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as err:  # every failure is a row of the report
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            self.add(name, "FAIL", "", last, seconds=time.perf_counter() - t0)
            if os.environ.get("SDDPM_GPU_CHECK_TRACEBACK"):
                traceback.print_exc()

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not any(r["status"] == "FAIL" for r in self.rows)

    def table(self) -> str:
        cols = ("check", "status", "value", "detail")
        widths = [max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        for r in self.rows:
            lines.append("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))
        return "\n".join(lines)


def json_safe(obj):
    """``obj`` with every NaN or infinity written as its name (``"nan"``, ``"inf"``,
    ``"-inf"``): JSON has no such numbers, and a diverged loss must not stop the report."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


# ---------------------------------------------------------------------------------------------
# training throughput


class TrainingStep:
    """One optimiser update exactly as ``sddpm train`` makes it (``Trainer.train_step``: bf16
    autocast on CUDA, the diffusion loss, backward, clipping, Adam, EMA, no host sync), on
    random images in [-1, 1]."""

    def __init__(
        self, preset_name: str, kind: str, batch: int, device, shrink=None, memory_format=None
    ) -> None:
        import torch

        from sddpm.config import run_preset
        from sddpm.training.loop import Trainer

        settings = {"batch_size": batch, "device": str(device), **(shrink or {})}
        if memory_format:
            settings["memory_format"] = memory_format
        config = run_preset(preset_name, kind).override(settings)
        self.config = config
        self.trainer = Trainer.without_data(config, device)
        unet = config.unet_config()
        shape = (batch, unet.image_channels, unet.image_size, unet.image_size)
        torch.manual_seed(0)
        self.x0 = torch.rand(shape, device=device) * 2 - 1
        self.bf16 = device.type == "cuda" and config.train.bf16
        self.device = device
        self.batch = batch

    @property
    def model(self):
        return self.trainer.model

    @property
    def net(self):
        """What the loss calls: the model, or a DDP / compiled wrapper of it."""
        return self.trainer.net

    @net.setter
    def net(self, net) -> None:
        self.trainer.net = net

    def __call__(self):
        self.trainer.train_step(self.x0)
        return self.trainer.last_loss

    def conv_flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self()
        counts = counter.get_flop_counts()["Global"]
        conv_ops = ("convolution", "convolution_backward", "_convolution")
        return sum(n for op, n in counts.items() if str(op).split(".")[1] in conv_ops)


def dense_conv_flops_per_s(device, quick: bool) -> float:
    """Dense 3x3 conv, 128 -> 128 channels, 32x32, forward + both backward convs, under bf16
    autocast, in NCHW and in NHWC (the faster counts): the reference the U-Net's convs are
    measured against."""
    import torch
    import torch.nn.functional as F

    n, c, hw = (4, 32, 16) if quick else (128, 128, 32)
    flops = 3 * 2 * n * c * c * 9 * hw * hw
    best = math.inf
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(n, c, hw, hw, device=device).contiguous(memory_format=layout)
        w = torch.randn(c, c, 3, 3, device=device).contiguous(memory_format=layout)
        x.requires_grad_(), w.requires_grad_()
        for _ in range(3 if quick else 10):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = F.conv2d(x, w, padding=1)
            y.float().sum().backward()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return flops / best


def training_batch(args) -> int:
    """The batch of the timed training steps: ``--batch``, else 128 (2 with ``--quick``)."""
    return args.batch or (2 if args.quick else 128)


GRADIENT_NORM_RATIO = (0.5, 2.0)
"""The range each parameter's compiled-gradient norm must keep, as a fraction of its eager
norm, in a compiled float32 first update (:func:`parity_gradients`). A lost gradient gives 0;
float32 rounding, and the rare spike it flips, moves a norm by far less than 2x, where an
elementwise tolerance would have to guess how far a flipped spike moves single gradients."""


def gradients(model) -> dict:
    """Every parameter's gradient (float32 copies), by name."""
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}  # fmt: skip


def gradient_agreement(grads: dict, reference: dict) -> dict:
    """How ``grads`` agree with ``reference`` (the eager gradients): ``max_abs_diff``, the
    largest ``|grads - reference|`` over the largest ``|reference|``, and ``norm_ratio``, the
    smallest and largest ``||grads|| / ||reference||`` over the parameters whose reference norm
    is above 1e-6 of the largest (a conv bias before a BatchNorm has a true gradient of 0, and
    its computed one is rounding). A parameter missing from ``grads`` counts as norm 0."""
    import torch

    norms = {n: float(g.norm()) for n, g in reference.items()}
    top = max(norms.values(), default=0.0)
    scale = max((float(g.abs().max()) for g in reference.values()), default=0.0)
    if top == 0.0:
        raise ValueError("the reference gradients are all zero: nothing to compare")
    ratios, worst = [], 0.0
    for name, ref in reference.items():
        got = grads.get(name, torch.zeros_like(ref))
        worst = max(worst, float((got - ref).abs().max()) / scale)
        if norms[name] > 1e-6 * top:
            ratios.append(float(got.norm()) / norms[name])
    return {"max_abs_diff": worst, "norm_ratio": (min(ratios), max(ratios))}


def gradients_agree(agreement: dict) -> bool:
    low, high = agreement["norm_ratio"]
    return GRADIENT_NORM_RATIO[0] <= low and high <= GRADIENT_NORM_RATIO[1]


def parity_gradients(kind: str, device, backend: str | None, ddp: bool = False) -> dict:
    """The first update's gradients of the small cifar10-architecture model (QUICK_MODEL,
    batch 2), eager (``backend=None``) or compiled, in float32 with TF32 off (wrapped in
    DistributedDataParallel first if ``ddp``, in a process group that exists). Float32: under
    bf16 a spiking network's gradient is chaotic in the rounding (eager bf16 against eager
    float32: cosine 0.15 on a small model), so only float32 can tell a lost gradient from
    flipped spikes."""
    import torch

    from sddpm.evaluation.features import no_tf32

    step = TrainingStep("cifar10", kind, 2, device, {**QUICK_MODEL, "bf16": False})
    net = step.model
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, ids)
    if backend is not None:
        net = torch.compile(net, backend=backend)
    step.net = net
    with no_tf32():
        step()
    return gradients(step.model)


def check_compiled_gradients(checks: Checks, device, backend: str) -> None:
    """A compiled training step's gradients against eager mode's (float32, same weights and
    batch): under torch 2.11 every one was lost, with no error."""
    for kind in ("spiking", "ann"):
        name = f"compiled gradients {kind} ({backend}, fp32)"
        with checks.run(name):
            agreement = gradient_agreement(
                parity_gradients(kind, device, backend), parity_gradients(kind, device, None)
            )
            low, high = agreement["norm_ratio"]
            checks.add(
                name,
                "PASS" if gradients_agree(agreement) else "FAIL",
                f"norms {low:.4f}..{high:.4f} of eager's",
                f"each parameter within {GRADIENT_NORM_RATIO[0]:g}x..{GRADIENT_NORM_RATIO[1]:g}x; "
                f"max |diff| {agreement['max_abs_diff']:.1e} of the largest gradient",
                gradient_agreement=agreement,
            )


def time_training(
    checks: Checks, args, device, kind: str, memory_format: str, backend: str | None = None
) -> dict | None:
    """One row: images/s of ``kind``'s training step in ``memory_format`` (the model under
    ``torch.compile(backend=backend)`` if given, as ``sddpm train --compile`` runs it, the
    compilation in the warm-up); the row when its losses were finite."""
    preset_name, shrink = "cifar10", (QUICK_MODEL if args.quick else None)
    batch = training_batch(args)
    steps = args.steps or (1 if args.quick else 10)
    warmup = 1 if args.quick else 3
    name = f"train {kind}" + ("" if memory_format == "contiguous" else f" {memory_format}")
    name += f" compile ({backend})" if backend else ""
    with checks.run(name):
        reset_peak(device)
        step = TrainingStep(preset_name, kind, batch, device, shrink, memory_format)
        t_compile = time.perf_counter()
        if backend:
            import torch
            from torch._dynamo.utils import counters

            graphs_before = counters["stats"]["unique_graphs"]
            breaks_before = sum(counters["graph_break"].values())
            step.net = torch.compile(step.model, backend=backend)
        losses = [step()]
        sync(device)
        first_step_s = time.perf_counter() - t_compile
        graphs = breaks = None
        if backend:  # one graph, no break, is what the tests find on the CPU
            graphs = counters["stats"]["unique_graphs"] - graphs_before
            breaks = sum(counters["graph_break"].values()) - breaks_before
        losses += [step() for _ in range(warmup - 1)]
        sync(device)
        t0 = time.perf_counter()
        losses += [step() for _ in range(steps)]
        sync(device)
        seconds = (time.perf_counter() - t0) / steps
        loss = float(losses[-1])  # the only read back: after the timed steps
        # counted on the eager model (FlopCounterMode sees no ops inside a compiled graph)
        net, step.net = step.net, step.model
        flops = step.conv_flops()
        step.net = net
        mem = peak_gib(device)
        ok = all(math.isfinite(float(v)) for v in losses)
        hours = seconds * 500_000 / 3600
        checks.add(
            name,
            "PASS" if ok else "FAIL",
            f"{batch / seconds:.1f} img/s",
            f"batch {batch} {'bf16' if step.bf16 else 'fp32'}, loss {loss:.4f}, "
            f"{seconds * 1e3:.1f} ms/step, "
            + (f"peak {mem:.2f} GiB, " if mem is not None else "")
            + f"500k steps {hours:.1f} h"
            + (
                f", first step {first_step_s:.0f} s, {graphs} graph(s), {breaks} break(s)"
                if backend
                else ""
            ),
            images_per_s=batch / seconds,
            first_step_s=first_step_s,
            compile_backend=backend,
            compiled_graphs=graphs,
            graph_breaks=breaks,
            s_per_step=seconds,
            peak_gib=mem,
            loss=loss,
            projected_hours_500k=hours,
            conv_flops_per_step=flops,
            conv_flops_per_s=flops / seconds,
            preset=preset_name,
            model_overrides=shrink,
            memory_format=memory_format,
            bf16=step.bf16,
        )
        return checks.rows[-1] if ok else None
    return None


def check_training(checks: Checks, args, device) -> None:
    """Training steps of both models in both memory formats; the targets (on the default
    layout), and which layout is faster on this device."""
    results: dict[str, float] = {}  # s/step of the rows that passed
    for kind in ("spiking", "ann"):
        for memory_format in ("contiguous", "channels_last"):
            row = time_training(checks, args, device, kind, memory_format)
            if row is not None:
                key = kind if memory_format == "contiguous" else f"{kind} nhwc"
                results[key] = row["s_per_step"]
                if key == "spiking":
                    conv_flops_per_s = row["conv_flops_per_s"]
    if all(k in results for k in ("spiking", "spiking nhwc", "ann", "ann nhwc")):
        gain = {k: results[k] / results[f"{k} nhwc"] for k in ("spiking", "ann")}
        checks.add(
            "channels-last speed-up",
            "INFO",
            f"spiking {gain['spiking']:.2f}x, ANN {gain['ann']:.2f}x",
            "NCHW step time / NHWC step time (> 1: set train.memory_format=channels_last)",
            speedup_spiking=gain["spiking"],
            speedup_ann=gain["ann"],
        )
    if "spiking" in results and "ann" in results:
        report_targets(checks, args, device, results["spiking"], results["ann"], conv_flops_per_s)


def check_compiled_training(checks: Checks, args, device, backend: str) -> None:
    """The training steps of both models under ``torch.compile`` (NCHW), as ``sddpm train
    --compile`` runs them, with the targets for that configuration. Not in the default run:
    compiling the full cifar10 model forward and backward takes minutes
    (``--only compiled-training``)."""
    rows = {kind: time_training(checks, args, device, kind, "contiguous", backend)
            for kind in ("spiking", "ann")}  # fmt: skip
    if rows["spiking"] and rows["ann"]:
        spiking, ann = rows["spiking"]["s_per_step"], rows["ann"]["s_per_step"]
        conv_flops_per_s = rows["spiking"]["conv_flops_per_s"]
        report_targets(checks, args, device, spiking, ann, conv_flops_per_s, " (compiled)")


def report_targets(
    checks: Checks, args, device, spiking_s: float, ann_s: float, conv_flops_per_s: float,
    suffix: str = "",
) -> None:  # fmt: skip
    """The issue's three GPU targets from the spiking and ANN step times (s) and the spiking
    step's conv FLOP/s: PASS or MISS on a GPU (not deciding the verdict), INFO elsewhere."""
    batch = training_batch(args)
    dense = dense_conv_flops_per_s(device, args.quick)
    ratio = spiking_s / ann_s
    share = conv_flops_per_s / dense
    on_gpu = device.type == "cuda" and not args.quick
    spiking_ips = batch / spiking_s

    def target(met: bool) -> str:
        return ("PASS" if met else "MISS") if on_gpu else "INFO"

    checks.add(
        "target: spiking images/s" + suffix,
        target(spiking_ips >= TARGETS["images_per_s"]),
        f"{spiking_ips:.0f}",
        f">= {TARGETS['images_per_s']:.0f} on one H200",
    )
    checks.add(
        "target: spiking / ANN step" + suffix,
        target(ratio <= TARGETS["spiking_over_ann"]),
        f"{ratio:.2f}x",
        f"<= {TARGETS['spiking_over_ann']:.0f}x",
    )
    checks.add(
        "target: conv share of dense bf16" + suffix,
        target(share >= TARGETS["conv_share"]),
        f"{share:.0%}",
        f">= {TARGETS['conv_share']:.0%} (dense {dense / 1e12:.3g} TFLOP/s)",
        dense_conv_flops_per_s=dense,
    )


# ---------------------------------------------------------------------------------------------
# checkpoint and resume, DDP


def write_image_folder(root: Path, count: int, size: int) -> Path:
    """``count`` random RGB PNGs: a data set that needs no download."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
    return root


def small_run_config(data_root: Path, device, total_steps: int):
    """A few-step run of the cifar10 architecture, shrunk (QUICK_MODEL), on an image folder."""
    from sddpm.config import run_preset

    config = run_preset("cifar10").override(
        {
            **QUICK_MODEL,
            "dataset": "folder",
            "data.root": str(data_root),
            "batch_size": 4,
            "total_steps": total_steps,
            "checkpoint_every": 1,
            "keep_last": 0,
            "sample_every": 0,
            "num_samples": 0,
            "log_every": 1,
            "warmup_steps": 1,
            "device": str(device),
        }
    )
    return config


def check_resume(checks: Checks, workdir: Path, device) -> None:
    import torch
    from safetensors.torch import load_file

    from sddpm.training import train

    with checks.run("checkpoint + resume"):
        data = write_image_folder(workdir / "images", 16, 32)
        straight, parted = workdir / "run-straight", workdir / "run-resumed"
        train(small_run_config(data, device, 3), straight, progress=False)
        train(small_run_config(data, device, 2), parted, progress=False)
        result = train(small_run_config(data, device, 3), parted, resume=True, progress=False)
        a = load_file(str(straight / "checkpoints" / "step_00000003" / "ema.safetensors"))
        b = load_file(str(parted / "checkpoints" / "step_00000003" / "ema.safetensors"))
        diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        # cuDNN's autotuner may pick other algorithms in the second process: allow rounding.
        tol = 0.0 if device.type == "cpu" else 1e-3
        ok = diff <= tol and set(a) == set(b)
        checks.add(
            "checkpoint + resume",
            "PASS" if ok else "FAIL",
            f"max |EMA diff| {diff:.2e}",
            f"3 steps straight vs 2 + resume 1 (tolerance {tol:g}); final step {result.step}",
            max_abs_diff=diff,
        )
        del torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_error(proc: subprocess.CompletedProcess) -> str:
    """The worker's own exception line (``torchrun`` ends its output with a summary of its
    own), else the last line of output."""
    lines = [
        re.sub(r"^\[rank\d+\]:\s*", "", line)
        for line in (proc.stderr + "\n" + proc.stdout).splitlines()
    ]
    errors = [
        line
        for line in lines
        if re.match(r"^[\w.]*(Error|Exception)\b.*:", line) and "ChildFailedError" not in line
    ]
    if errors:
        return errors[-1][:300]
    return next((line for line in reversed(lines) if line.strip()), "no output")


def check_ddp(checks: Checks, workdir: Path, device, backend: str) -> None:
    name = f"DDP one-process step + compile ({backend})"
    with checks.run(name):
        spec = workdir / "ddp.json"
        spec.write_text(
            json.dumps({"device": str(device), "out": str(workdir), "backend": backend})
        )
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(Path(__file__).resolve()), "--ddp-worker", str(spec),
        ]  # fmt: skip
        src = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in src if p))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        report = workdir / "ddp-result.json"
        if proc.returncode != 0 or not report.is_file():
            checks.add(name, "FAIL", f"exit {proc.returncode}", worker_error(proc))
            return
        r = json.loads(report.read_text())
        agreement = r["gradient_agreement"]
        ok = r["world_size"] == 1 and all(math.isfinite(v) for v in r["losses"])
        ok = ok and gradients_agree(agreement)
        checks.add(
            name,
            "PASS" if ok else "FAIL",
            f"backend {r['backend']}",
            f"world {r['world_size']}, losses {', '.join(f'{v:.4f}' for v in r['losses'])}, "
            "gradient norms {:.3f}..{:.3f} of eager's".format(*agreement["norm_ratio"]),
            gradient_agreement=agreement,
        )


def ddp_worker(spec_path: Path) -> None:
    """Run under ``torch.distributed.run``: training steps of a small cifar10-architecture model
    wrapped in DistributedDataParallel and then ``torch.compile``, as ``sddpm train
    --compile`` does under torchrun, in a process group of the device's backend; and a float32
    update's gradients so wrapped against the same model's, trained eagerly without DDP."""
    import torch
    import torch.distributed as dist

    spec = json.loads(spec_path.read_text())
    device = torch.device(spec["device"])
    kwargs = {"backend": "nccl" if device.type == "cuda" else "gloo", "init_method": "env://"}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    try:
        step = TrainingStep("cifar10", "spiking", 2, device, QUICK_MODEL)
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(step.model, ids)
        step.net = torch.compile(ddp, backend=spec["backend"])
        losses = [float(step()) for _ in range(2)]
        agreement = gradient_agreement(  # float32: see parity_gradients
            parity_gradients("spiking", device, spec["backend"], ddp=True),
            parity_gradients("spiking", device, None),
        )
        record = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    finally:
        dist.destroy_process_group()
    record["losses"] = losses
    record["gradient_agreement"] = agreement
    (Path(spec["out"]) / "ddp-result.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# neuron kernels, sampling, Inception


def check_kernels(checks: Checks, device) -> None:
    import torch

    from sddpm.snn import NeuronKernelError, Surrogate, fused

    kernels = [k for k in fused.KERNELS if k not in ("eager", "auto")]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 37, 29, generator=g) * 0.8 + 0.45).to(device)
    upstream = torch.randn(x.shape, generator=g).to(device)
    for dtype in (torch.float32, torch.bfloat16):

        def run(kernel, dtype=dtype):
            xi = x.detach().to(dtype).clone().requires_grad_()
            spikes, _ = fused.multistep_neuron(
                xi, threshold=1.0, surrogate=Surrogate(), kernel=kernel
            )
            (spikes.float() * upstream).sum().backward()
            return spikes.float(), xi.grad.float()

        ref_s, ref_g = run("eager")
        for kernel in kernels:
            name = f"neuron kernel {kernel} ({str(dtype).split('.')[-1]})"
            with checks.run(name):
                try:
                    s, grad = run(kernel)
                except NeuronKernelError as err:
                    if device.type == "cuda":  # every kernel must run on a GPU
                        raise
                    checks.add(name, "SKIP", "cannot run on this CPU", str(err).split(";")[0])
                    continue
                flips = int((s != ref_s).sum())
                gdiff = float((grad - ref_g).abs().max())
                # float32: rounding; bf16: the float32 gradients may round to neighbouring bf16
                # values (one bf16 step is 2^-7 of the value's power of two)
                rel = 1e-5 if dtype == torch.float32 else 2**-7
                ok = flips == 0 and bool(((grad - ref_g).abs() <= rel * ref_g.abs() + 1e-6).all())
                checks.add(
                    name,
                    "PASS" if ok else "FAIL",
                    f"{flips} spike flips",
                    f"max |grad diff| {gdiff:.2e} (within {rel:g} of each gradient) vs eager",
                )


def check_sampling(checks: Checks, device, quick: bool, backend: str) -> None:
    import torch

    from sddpm.generation import generate
    from sddpm.models import build_model, fold_batchnorm, preset

    name = f"sample dpm-solver++ 20, bf16 + compile ({backend})"
    with checks.run(name):
        cfg = preset("cifar10").replace(channels=32)
        if quick:  # compilation time grows with the number of distinct layers
            cfg = cfg.replace(**QUICK_MODEL, image_size=16)
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
        common = dict(sampler="dpm-solver++", steps=20, batch_size=4, device=device, progress=False)
        ref = generate(model, 4, shape, **common)
        t0 = time.perf_counter()
        compiled = torch.compile(fold_batchnorm(model), backend=backend)
        out = generate(compiled, 4, shape, bf16=True, fold_bn=False, **common)
        seconds = time.perf_counter() - t0
        finite = bool(torch.isfinite(out).all())
        diff = float((out - ref).abs().mean())
        ok = finite and out.shape == ref.shape and diff < 0.1
        checks.add(
            name,
            "PASS" if ok else "FAIL",
            f"mean |bf16 - fp32| {diff:.3g}",
            f"4 images in {seconds:.1f} s (with compilation), finite {finite}",
            mean_abs_diff=diff,
        )


def inception_for_check():
    """The FID Inception with the real weights if they are on disk, else the rule-made weights
    of the reference vectors (``tests/data/fid-inception.safetensors``)."""
    from safetensors import safe_open

    from sddpm.evaluation.inception import (
        FIDInceptionV3,
        load_fid_inception,
        rule_made_weights,
    )

    try:
        return load_fid_inception(download=False), "real weights"
    except FileNotFoundError:
        pass
    with safe_open(str(INCEPTION_VECTORS), "pt") as f:
        keys_and_shapes = json.loads(f.metadata()["keys_and_shapes"])
    model = FIDInceptionV3()
    model.load_state_dict(rule_made_weights(keys_and_shapes))
    return model.eval().requires_grad_(False), "rule-made weights (real ones not on disk)"


def check_inception(checks: Checks, device) -> None:
    import torch

    from sddpm.evaluation.features import no_tf32

    with checks.run("Inception features vs CPU"):
        model, source = inception_for_check()
        images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(images).pool
            with no_tf32():
                out = model.to(device)(images.to(device)).pool.cpu()
        diff = float((out - ref).abs().max())
        scale = float(ref.abs().max())
        ok = diff <= 1e-4 * max(scale, 1.0)
        checks.add(
            "Inception features vs CPU",
            "PASS" if ok else "FAIL",
            f"max |diff| {diff:.2e}",
            f"features up to {scale:.3g}; {source}; TF32 off",
            max_abs_diff=diff,
        )


# ---------------------------------------------------------------------------------------------


def environment(device) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


SECTIONS = {
    "training": lambda checks, c: check_training(checks, c["args"], c["device"]),
    "resume": lambda checks, c: check_resume(checks, c["work"], c["device"]),
    "kernels": lambda checks, c: check_kernels(checks, c["device"]),
    "sampling": lambda checks, c: check_sampling(
        checks, c["device"], c["args"].quick, c["backend"]
    ),
    "inception": lambda checks, c: check_inception(checks, c["device"]),
    "ddp": lambda checks, c: check_ddp(checks, c["work"], c["device"], c["backend"]),
    "compiled-gradients": lambda checks, c: check_compiled_gradients(
        checks, c["device"], c["backend"]
    ),
    "compiled-training": lambda checks, c: check_compiled_training(
        checks, c["args"], c["device"], c["backend"]
    ),
}
"""The checks in the order they run (the names ``--only`` takes)."""
DEFAULT_SECTIONS = [s for s in SECTIONS if s != "compiled-training"]
"""What a run without ``--only`` checks: all but the minutes-long compiled training."""


def chosen_sections(only: str | None) -> list[str] | str:
    """The sections ``--only`` names, in run order; a message naming the unknown ones."""
    if only is None:
        return list(DEFAULT_SECTIONS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        return (
            f"error: --only {only!r}: no check named {', '.join(unknown) or '(none given)'}; "
            f"the checks are {', '.join(SECTIONS)}"
        )
    return [n for n in SECTIONS if n in names]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker is not None:
        ddp_worker(args.ddp_worker)
        return 0
    sections = chosen_sections(args.only)
    if isinstance(sections, str):
        print(sections, file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no CUDA GPU here; run on a GPU machine, or "
            "check the same path on the CPU with --device cpu --quick",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu" and not args.quick:
        print("note: a full run on the CPU takes long; --quick runs tiny settings", flush=True)
    info = environment(device)
    print(f"sddpm gpu_check on {info['device_name']} ({device}), torch {info['torch']}, "
          f"triton {info['triton']}", flush=True)  # fmt: skip
    backend = args.compile_backend or (
        "aot_eager" if device.type == "cpu" and args.quick else "inductor"
    )
    checks = Checks(args.json, {"quick": args.quick, "sections": sections, **info})
    with tempfile.TemporaryDirectory(prefix="sddpm-gpu-check-") as tmp:
        context = {"args": args, "device": device, "work": Path(tmp), "backend": backend}
        for section in sections:
            t0 = time.perf_counter()
            SECTIONS[section](checks, context)
            print(f"        ({section}: {time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - checks.started
    print()
    print(checks.table())
    verdict = checks.finish()
    if args.markdown is not None:
        from sddpm.io import atomic_path

        with atomic_path(args.markdown) as tmp_md:
            tmp_md.write_text(checks.markdown())
    print(f"{verdict} ({seconds:.0f} s)")
    return 0 if checks.passed else 1


if __name__ == "__main__":
    sys.exit(main())
