"""Does ``sddpm train --compile`` learn as eager training does, on this machine's torch?

Trains the same model from the same initial weights on the same fixed batch of random images
twice, eagerly and under ``torch.compile``, through ``Trainer.train_step`` (what ``sddpm train``
runs), and prints both loss curves and their largest gap. The curves part slowly (compiled
code rounds otherwise, and a spiking network amplifies rounding through flipped spikes), but
both must fall: a compiled curve that stays at its first loss means its gradients were lost,
as they were under torch 2.11 before sddpm stopped returning aliases from its autograd
functions (benchmarks/README.md).

    python benchmarks/compiled_training_curve.py                       # digits, aot_eager
    python benchmarks/compiled_training_curve.py --backend inductor    # minutes of C++ on a CPU
    python benchmarks/compiled_training_curve.py --preset cifar10 --device cuda --batch 128 \\
        --backend inductor
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--kind", default="spiking", help="spiking (default) or ann")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3, help="(warm-up 1 step: the curve moves)")
    ap.add_argument("--backend", default="aot_eager", help="torch.compile backend")
    ap.add_argument("--json", default=None, help="also write both curves here")
    return ap.parse_args(argv)


def curve(args, backend: str | None) -> tuple[list[float], float]:
    """The losses of ``args.steps`` updates (compiled with ``backend`` unless ``None``) and
    their seconds."""
    import torch

    from sddpm.config import run_preset
    from sddpm.training.loop import Trainer

    settings = {"batch_size": args.batch, "device": args.device, "warmup_steps": 1, "lr": args.lr}
    config = run_preset(args.preset, args.kind).override(settings)
    trainer = Trainer.without_data(config, torch.device(args.device))
    if backend is not None:
        trainer.net = torch.compile(trainer.model, backend=backend)
    unet = config.unet_config()
    torch.manual_seed(0)
    shape = (args.batch, unet.image_channels, unet.image_size, unet.image_size)
    x0 = (torch.rand(shape) * 2 - 1).to(args.device)
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(x0)
        losses.append(trainer.last_loss)
    losses = [float(v) for v in losses]  # read back once, at the end
    return losses, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    eager, eager_s = curve(args, None)
    compiled, compiled_s = curve(args, args.backend)
    every = max(1, args.steps // 6)
    for name, losses, seconds in (
        ("eager", eager, eager_s),
        (f"compiled ({args.backend})", compiled, compiled_s),
    ):
        shown = " ".join(f"{v:.4f}" for v in losses[::every])
        print(f"{name:22} {seconds:6.0f} s  losses {shown} ... {losses[-1]:.4f}")
    gap = max(abs(a - b) for a, b in zip(eager, compiled, strict=True))
    fell = {n: c[-1] < 0.9 * c[0] for n, c in (("eager", eager), ("compiled", compiled))}
    print(f"largest gap {gap:.4f}; fell by 10 %: eager {fell['eager']}, "
          f"compiled {fell['compiled']}")  # fmt: skip
    if args.json:
        from sddpm.io import write_json

        write_json(args.json, {**vars(args), "eager": eager, "compiled": compiled, "gap": gap})
    return 0 if fell["compiled"] or not fell["eager"] else 1


if __name__ == "__main__":
    sys.exit(main())
