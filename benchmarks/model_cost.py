"""Cost of one U-Net training step and one sampling call, spiking vs ANN twin.

Process CPU seconds with one thread (robust when other processes share the cores; wall time on
an idle machine is close to it) for a training step (forward, backward, Adam) and for a sampling
call (inference mode, BatchNorm folded when this version of sddpm has ``fold_batchnorm``), and
the bytes autograd saves for the backward pass (measured with saved-tensor hooks, a
deterministic stand-in for peak activation memory). Only uses APIs that exist since the first
commit, so it can be run on older checkouts to show what each optimisation gained:

    .venv/bin/python benchmarks/model_cost.py --preset digits --batch 64
    .venv/bin/python benchmarks/model_cost.py --preset cifar10 --batch 8 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import torch

from sddpm.models import build_model, preset

RESULTS = Path(__file__).with_name("results.jsonl")


def saved_mib(model, x, t) -> float:
    storages = {}

    def pack(tensor):
        if tensor.numel():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t)
    return sum(storages.values()) / 2**20


def cpu_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    c0 = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - c0) / repeats


def measure(name: str, kind: str, batch: int, repeats: int, channels: int | None) -> dict:
    cfg = preset(name).replace(kind=kind)
    if channels:
        cfg = cfg.replace(channels=channels)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(batch, cfg.image_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, cfg.diffusion_steps, (batch,))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)

    def step():
        loss = (model(x, t) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_s = cpu_seconds(step, repeats)
    mib = saved_mib(model, x, t)
    model.eval()
    try:
        from sddpm.models import fold_batchnorm

        sampler_model = fold_batchnorm(model)
    except ImportError:
        sampler_model = model
    with torch.inference_mode():
        call_s = cpu_seconds(lambda: sampler_model(x, t), repeats)
    return {"train_cpu_s": train_s, "call_cpu_s": call_s, "saved_mib": mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--channels", type=int, default=None, help="override the preset's width")
    ap.add_argument("--label", default=None, help="e.g. the optimisation this version adds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    rows = {
        k: measure(args.preset, k, args.batch, args.repeats, args.channels)
        for k in ("spiking", "ann")
    }
    s, a = rows["spiking"], rows["ann"]
    row = {
        "benchmark": "model_cost",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "label": args.label,
        "preset": args.preset,
        "channels": args.channels,
        "batch": args.batch,
        **{f"spiking_{k}": round(v, 4) for k, v in s.items()},
        **{f"ann_{k}": round(v, 4) for k, v in a.items()},
        "train_ratio": round(s["train_cpu_s"] / a["train_cpu_s"], 2),
        "call_ratio": round(s["call_cpu_s"] / a["call_cpu_s"], 2),
        "memory_ratio": round(s["saved_mib"] / a["saved_mib"], 2),
    }
    print(json.dumps(row))
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
