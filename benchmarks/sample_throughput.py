"""Sampling throughput per sampler and step count, spiking U-Net and ANN twin.

For each preset and model kind, a randomly initialised model (speed does not depend on the
weights, only on the firing rates, which a trained model would change) is prepared as
``sddpm.generation.generate`` prepares it (BatchNorm folded, inference mode) and timed:

- U-Net calls/s at the given batch size (median of ``--repeats`` timed calls after warm-up),
  with the process CPU seconds per call, which stays meaningful when other processes share
  the cores;
- images/s for each sampler and step count, from a real run of that sampler where it takes at
  most ``--max-calls`` U-Net calls, else projected from the calls/s (marked "projected").

Prints one table and appends a JSON line per row to ``benchmarks/results.jsonl``.

    .venv/bin/python benchmarks/sample_throughput.py                    # digits + cifar10, CPU
    .venv/bin/python benchmarks/sample_throughput.py --presets cifar10 --device cuda --batch 128
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

from sddpm.diffusion import initial_noise, sample
from sddpm.models import build_model, fold_batchnorm, preset, set_memory_format
from sddpm.snn import set_neuron_kernel

RESULTS = Path(__file__).with_name("results.jsonl")
PLAN = [
    ("ddpm", 1000),
    ("ddim", 100),
    ("ddim", 50),
    ("ddim", 10),
    ("dpm-solver++", 20),
    ("dpm-solver++", 10),
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(model, x, t, repeats: int, device: str) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of one U-Net call."""
    walls, cpus = [], []
    with torch.inference_mode():
        model(x, t)  # warm-up
        for _ in range(repeats):
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            model(x, t)
            sync(device)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="digits,cifar10")
    ap.add_argument("--kinds", default="spiking,ann")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 digits, 8 others")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-calls", type=int, default=120, help="run samplers up to this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--neuron-kernel", default="auto", help="auto, eager, compiled or triton")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the U-Net")
    ap.add_argument(
        "--memory-format", default="contiguous", help="contiguous (NCHW) or channels_last (NHWC)"
    )
    args = ap.parse_args()

    torch.manual_seed(0)
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for name in args.presets.split(","):
        for kind in args.kinds.split(","):
            cfg = preset(name, kind)
            batch = args.batch or (64 if name == "digits" else 8)
            model = fold_batchnorm(build_model(cfg).eval()).to(args.device)
            set_neuron_kernel(model, args.neuron_kernel)
            set_memory_format(model, args.memory_format)
            shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
            x = initial_noise(batch, shape, 0, device=args.device)
            t = torch.full((batch,), 500, device=args.device)
            autocast = torch.autocast(
                torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16
            )
            with autocast:
                call_s, call_cpu = time_calls(model, x, t, args.repeats, args.device)
            for sampler, steps in PLAN:
                if steps <= args.max_calls:
                    sync(args.device)
                    w0 = time.perf_counter()
                    with autocast:
                        sample(model, x, sampler=sampler, steps=steps)
                    sync(args.device)
                    seconds, how = time.perf_counter() - w0, "measured"
                else:
                    seconds, how = call_s * steps, "projected"
                rows.append(
                    {
                        "benchmark": "sample_throughput",
                        "time": stamp,
                        "preset": name,
                        "kind": kind,
                        "device": args.device,
                        "batch": batch,
                        "sampler": sampler,
                        "steps": steps,
                        "calls_per_image": steps,
                        "call_s": round(call_s, 5),
                        "call_cpu_s": round(call_cpu, 5),
                        "calls_per_s": round(1 / call_s, 2),
                        "images_per_s": round(batch / seconds, 4),
                        "how": how,
                        "threads": torch.get_num_threads(),
                        "neuron_kernel": args.neuron_kernel,
                        "memory_format": args.memory_format,
                        "bf16": args.bf16,
                        "machine": platform.processor() or platform.machine(),
                    }
                )
    header = [
        "preset",
        "kind",
        "batch",
        "sampler",
        "steps",
        "call_s",
        "call_cpu_s",
        "images_per_s",
        "how",
    ]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[h]).rjust(w) for h, w in zip(header, widths, strict=True)))
    for name in args.presets.split(","):
        per = {r["kind"]: r["call_s"] for r in rows if r["preset"] == name}
        if "spiking" in per and "ann" in per:
            print(f"{name}: spiking/ANN time per U-Net call = {per['spiking'] / per['ann']:.2f}x")
    with RESULTS.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
