"""Spiking U-Net vs its ANN twin: time, memory and convolution efficiency per step and call.

For one preset and batch, both models are built from the same config and measured alike:

- **train**: one training step (forward, backward, Adam) on random images;
- **call**: one sampling call (eval mode, inference mode, BatchNorm folded when this version of
  sddpm has ``fold_batchnorm``);
- **time**: on the CPU, process CPU seconds with one thread (other processes on a shared machine
  disturb wall time far more than CPU time); on a GPU, wall seconds between synchronisations.
  The two models are timed alternately, ``--repeats`` times each after a warm-up, and the best
  (least disturbed) run is reported, the median beside it in the JSON;
- **allocator**: on the CPU, freed memory is kept for reuse (``sddpm.runtime``), as
  ``sddpm train`` does on CPUs, when this version of sddpm has it;
- **memory**: peak RSS of a fresh process that builds the model and optimiser and runs one
  training step (``VmHWM``; the step's own share is the peak minus the RSS before the step), or
  ``torch.cuda.max_memory_allocated`` on a GPU; and the MiB autograd keeps for the backward
  pass (saved-tensor hooks: deterministic, independent of the allocator);
- **conv efficiency**: the convolution FLOPs of the step or call (``torch.utils.flop_counter``:
  forward and backward convolutions, 2 FLOPs per multiply-add) divided by its time, as a
  fraction of this machine's dense convolution throughput measured in the same run (3x3 conv,
  128 -> 128 channels, 32x32, batch 32, forward and backward, best of 3).

Prints one table and appends one JSON line to ``benchmarks/results.jsonl``. Only uses
``build_model`` and ``preset`` (and ``fold_batchnorm`` if present), so it runs on old checkouts
(``PYTHONPATH=<old checkout>/src``) to show what each optimisation gained:

    .venv/bin/python benchmarks/model_cost.py --preset digits --batch 64
    .venv/bin/python benchmarks/model_cost.py --preset cifar10 --batch 8 --repeats 3
    .venv/bin/python benchmarks/model_cost.py --preset cifar10 --batch 128 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sddpm.models import build_model, preset

RESULTS = Path(__file__).with_name("results.jsonl")
CONV_OPS = ("convolution", "convolution_backward", "_convolution")


class Setup:
    """One model with its optimiser, inputs, and sampling copy."""

    def __init__(self, args, kind: str) -> None:
        cfg = preset(args.preset).replace(kind=kind)
        if args.channels:
            cfg = cfg.replace(channels=args.channels)
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = build_model(cfg).to(self.device).train()
        self.memory_format = args.memory_format
        if args.memory_format != "contiguous":  # needs a version with set_memory_format
            from sddpm.models import set_memory_format

            set_memory_format(self.model, args.memory_format)
        shape = (args.batch, cfg.image_channels, cfg.image_size, cfg.image_size)
        self.x = torch.randn(shape, device=self.device)
        self.t = torch.randint(0, cfg.diffusion_steps, (args.batch,), device=self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, 1e-4)
        self.bf16 = args.bf16
        self.sampler_model = None

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self) -> None:
        with self.autocast():
            loss = (self.model(self.x, self.t).float() - self.x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def sampling_call(self) -> None:
        if self.sampler_model is None:
            self.model.eval()
            try:
                from sddpm.models import fold_batchnorm

                self.sampler_model = fold_batchnorm(self.model)  # a copy: keeps the layout
            except ImportError:  # versions before BatchNorm folding
                self.sampler_model = self.model
        with torch.inference_mode(), self.autocast():
            self.sampler_model(self.x, self.t)

    def saved_mib(self) -> float:
        storages = {}

        def pack(tensor):
            if tensor.numel():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with self.autocast():
                self.model(self.x, self.t)
        return sum(storages.values()) / 2**20

    def conv_flops(self, fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        counts = counter.get_flop_counts()["Global"]
        return sum(n for op, n in counts.items() if str(op).split(".")[1] in CONV_OPS)


def timer(device: torch.device):
    """Seconds as this benchmark counts them: CPU seconds on the CPU, synced wall on a GPU."""
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.process_time


def dense_conv_gflops(device: torch.device, bf16: bool) -> float:
    """This machine's dense conv throughput: 3x3, 128 -> 128, 32x32, batch 32, fwd+bwd, in
    float32 or under the same bf16 autocast as the models."""
    x = torch.randn(32, 128, 32, 32, device=device)
    w = torch.randn(128, 128, 3, 3, device=device, requires_grad=True)
    x.requires_grad_()
    flops = 3 * 2 * 32 * 128 * 128 * 9 * 32 * 32  # forward, input grad, weight grad
    now, best = timer(device), float("inf")
    for _ in range(4):
        t0 = now()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = F.conv2d(x, w, padding=1)
        y.float().sum().backward()
        best = min(best, now() - t0)
    return flops / best / 1e9


def memory_probe(args, kind: str) -> dict:
    """Peak memory of one training step in this (fresh) process."""
    s = Setup(args, kind)
    if s.device.type == "cuda":
        s.train_step()
        torch.cuda.synchronize(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
        before = torch.cuda.memory_allocated(s.device)
        s.train_step()
        peak = torch.cuda.max_memory_allocated(s.device)
        return {"peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}

    def status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    before = status("VmRSS")
    s.train_step()
    peak = status("VmHWM")
    return {"peak_mib": peak, "step_mib": peak - before}


def peak_memory(args, kind: str) -> dict | None:
    if args.device == "cpu" and not Path("/proc/self/status").exists():
        return None  # peak RSS is read from Linux's /proc
    cmd = [sys.executable, __file__, "--memory-probe", kind] + args.argv
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--channels", type=int, default=None, help="override the preset's width")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (both models)")
    ap.add_argument(
        "--memory-format",
        default="contiguous",
        help="contiguous (NCHW) or channels_last (NHWC; versions with set_memory_format)",
    )
    ap.add_argument("--label", default=None, help="e.g. the optimisation this version adds")
    ap.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.argv = sys.argv[1:]  # the memory probe reruns this script with the same settings
    device = torch.device(args.device)
    retained = False
    if device.type == "cpu":
        torch.set_num_threads(1)
        try:  # as CPU training does (sddpm.runtime); absent in old versions
            from sddpm.runtime import retain_freed_memory

            retained = retain_freed_memory()
        except ImportError:
            pass
    if args.memory_probe:
        print(json.dumps(memory_probe(args, args.memory_probe)))
        return

    kinds = ("spiking", "ann")
    setups = {k: Setup(args, k) for k in kinds}
    now = timer(device)
    times: dict[tuple[str, str], list[float]] = {}
    for what in ("train", "call"):
        for k in kinds:  # warm-up
            getattr(setups[k], "train_step" if what == "train" else "sampling_call")()
        for _ in range(args.repeats):
            for k in kinds:
                fn = getattr(setups[k], "train_step" if what == "train" else "sampling_call")
                t0 = now()
                fn()
                times.setdefault((k, what), []).append(now() - t0)
    reference = dense_conv_gflops(device, args.bf16)
    rows = {}
    for k in kinds:
        s = setups[k]
        train_s, call_s = min(times[(k, "train")]), min(times[(k, "call")])
        train_flops, call_flops = s.conv_flops(s.train_step), s.conv_flops(s.sampling_call)
        memory = peak_memory(args, k)
        rows[k] = {
            "train_s": train_s,
            "train_s_median": statistics.median(times[(k, "train")]),
            "train_images_per_s": args.batch / train_s,
            "call_s": call_s,
            "call_s_median": statistics.median(times[(k, "call")]),
            "calls_per_s": 1 / call_s,
            "train_conv_gflop": train_flops / 1e9,
            "call_conv_gflop": call_flops / 1e9,
            "train_conv_efficiency": train_flops / train_s / 1e9 / reference,
            "call_conv_efficiency": call_flops / call_s / 1e9 / reference,
            "saved_mib": s.saved_mib(),
            **(memory or {}),
        }
    sp, an = rows["spiking"], rows["ann"]
    ratios = {
        "train": sp["train_s"] / an["train_s"],
        "call": sp["call_s"] / an["call_s"],
        "conv_flops_train": sp["train_conv_gflop"] / an["train_conv_gflop"],
        "saved": sp["saved_mib"] / an["saved_mib"],
    }
    if "peak_mib" in sp and "peak_mib" in an:
        ratios["peak_memory"] = sp["peak_mib"] / an["peak_mib"]
        ratios["step_memory"] = sp["step_mib"] / an["step_mib"]
    import sddpm

    commit = subprocess.run(  # of the sddpm measured (PYTHONPATH may point at another checkout)
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(sddpm.__file__).parent,
    ).stdout.strip()
    record = {
        "benchmark": "model_cost",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "label": args.label,
        "preset": args.preset,
        "channels": args.channels,
        "batch": args.batch,
        "device": args.device,
        "machine": machine(device),
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "memory_format": args.memory_format,
        "retain_freed_memory": retained,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "dense_conv_gflops": reference,
        **{f"{k}_{key}": round(v, 5) for k, r in rows.items() for key, v in r.items()},
        **{f"{key}_ratio": round(v, 3) for key, v in ratios.items()},
    }
    unit = "CPU s" if device.type == "cpu" else "s"
    mem = "peak RSS MiB (step)" if device.type == "cpu" else "peak allocated MiB (step)"
    layout = "" if args.memory_format == "contiguous" else f", {args.memory_format}"
    print(
        f"\n{args.preset}, batch {args.batch}, {record['machine']}, {args.device}, "
        f"{record['threads']} thread(s){', bf16' if args.bf16 else ''}{layout}; dense conv "
        f"{reference:.1f} GFLOP/s; best of {args.repeats}\n"
    )
    print(
        f"| model | train {unit} | train img/s | call {unit} | calls/s | conv GFLOP train / "
        f"call | conv efficiency train / call | {mem} | saved for backward MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, r in rows.items():
        memory_cell = f"{r['peak_mib']:.0f} ({r['step_mib']:.0f})" if "peak_mib" in r else "-"
        print(
            f"| {k} | {r['train_s']:.4g} | {r['train_images_per_s']:.4g} | {r['call_s']:.4g} | "
            f"{r['calls_per_s']:.4g} | {r['train_conv_gflop']:.4g} / {r['call_conv_gflop']:.4g} "
            f"| {r['train_conv_efficiency']:.0%} / {r['call_conv_efficiency']:.0%} | "
            f"{memory_cell} | {r['saved_mib']:.1f} |"
        )
    print(
        "| spiking / ANN | "
        f"{ratios['train']:.2f}x | | {ratios['call']:.2f}x | | "
        f"{ratios['conv_flops_train']:.2f}x | | "
        + (
            f"{ratios['peak_memory']:.2f}x ({ratios['step_memory']:.2f}x)"
            if "peak_memory" in ratios
            else "-"
        )
        + f" | {ratios['saved']:.2f}x |"
    )
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
