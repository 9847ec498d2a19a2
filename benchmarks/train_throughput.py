"""Training throughput: one optimiser update (forward + backward + clip + Adam + EMA) per preset.

Times the update ``sddpm train`` makes (``Trainer.train_step``: the diffusion loss, gradient
clipping, Adam, EMA) on random images, for the spiking U-Net and its ANN twin.
After ``--warmup`` untimed updates, ``--repeats`` blocks of ``--steps`` updates are timed; the
table reports the median block's seconds per update, images per second, and the process CPU
seconds per update (robust to other processes sharing the cores). Each row is appended to
``benchmarks/results.jsonl``.

    .venv/bin/python benchmarks/train_throughput.py                       # digits + cifar10
    .venv/bin/python benchmarks/train_throughput.py --presets cifar10 --device cuda --batch 128
    .venv/bin/python benchmarks/train_throughput.py --presets cifar10 --device cuda --batch 128 \
        --neuron-kernel compiled         # the neuron loops as generated (Triton) kernels

The last column projects the time of ``--project-steps`` updates (the paper's 500k).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sddpm.config import run_preset
from sddpm.models import count_parameters
from sddpm.training.loop import Trainer

RESULTS = Path(__file__).with_name("results.jsonl")
CPU_BATCH = {"digits": 64, "cifar10": 8, "mnist": 8, "fashion-mnist": 8, "celeba64": 4}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(preset: str, kind: str, batch: int, device: torch.device, args) -> dict:
    settings = {
        "batch_size": batch,
        "device": str(device),
        "neuron_kernel": args.neuron_kernel,
        "memory_format": args.memory_format,
        "compile": bool(args.compile),
        "bf16": not args.fp32,
        "retain_cpu_memory": True,  # as sddpm train does on CPUs
    }
    config = run_preset(preset, kind).override(settings)
    unet = config.unet_config()
    # the update sddpm train makes: Trainer.train_step, with its model, optimiser and EMA
    trainer = Trainer.without_data(config, device)
    model = trainer.model
    shape = (batch, unet.image_channels, unet.image_size, unet.image_size)
    torch.manual_seed(0)
    x0 = torch.rand(shape, device=device) * 2 - 1
    bf16 = device.type == "cuda" and config.train.bf16

    def update() -> None:
        trainer.train_step(x0)

    for _ in range(args.warmup):
        update()
    _sync(device)
    walls, cpus = [], []
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            update()
        _sync(device)
        walls.append((time.perf_counter() - w0) / args.steps)
        cpus.append((time.process_time() - c0) / args.steps)
    wall = statistics.median(walls)
    return {
        "benchmark": "train_throughput",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": preset,
        "kind": kind,
        "parameters": count_parameters(model),
        "batch": batch,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "bf16": bf16,
        "compile": bool(args.compile),
        "neuron_kernel": args.neuron_kernel,
        "memory_format": args.memory_format,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "s_per_step": wall,
        "s_per_step_all": walls,
        "cpu_s_per_step": statistics.median(cpus),
        "images_per_s": batch / wall,
        "projected_days": wall * args.project_steps / 86400,
        "project_steps": args.project_steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", default="digits,cifar10")
    ap.add_argument("--kinds", default="spiking,ann")
    ap.add_argument("--batch", type=int, default=None, help="default: per preset (CPU sizes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (1 for 32x32+ on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="default 10 (1 for 32x32+ on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--neuron-kernel", default="auto", help="auto, eager, compiled or triton")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    ap.add_argument(
        "--memory-format", default="contiguous", help="contiguous (NCHW) or channels_last (NHWC)"
    )
    ap.add_argument("--project-steps", type=int, default=500_000, help="the paper's 500k")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for preset in args.presets.split(","):
        big = device.type == "cpu" and preset != "digits"
        for kind in args.kinds.split(","):
            a = argparse.Namespace(**vars(args))
            a.warmup = args.warmup if args.warmup is not None else (1 if big else 3)
            a.steps = args.steps if args.steps is not None else (1 if big else 10)
            batch = args.batch or (CPU_BATCH.get(preset, 8) if device.type == "cpu" else 128)
            row = bench(preset, kind, batch, device, a)
            rows.append(row)
            print(
                f"{preset:>8} {kind:>7} batch {batch:>4}: {row['s_per_step'] * 1e3:9.1f} ms/step "
                f"{row['images_per_s']:9.1f} img/s (cpu {row['cpu_s_per_step'] * 1e3:.1f} ms/step)",
                flush=True,
            )
            if not args.no_save:
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print()
    print(
        "| preset | model | batch | device | threads | ms / step | images / s | CPU ms / step "
        f"| {args.project_steps:,} steps, days |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['preset']} | {r['kind']} | {r['batch']} | {r['device']} | {r['threads']} | "
            f"{r['s_per_step'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
            f"{r['cpu_s_per_step'] * 1e3:.1f} | {r['projected_days']:.3g} |"
        )


if __name__ == "__main__":
    main()
