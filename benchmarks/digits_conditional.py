"""Does a class-conditional digits model draw the digit it is asked for, and how well?

For each guidance weight w: ``--per-class`` images of every class K, exactly what
``sddpm sample --run RUN --class K --num N --sampler S --steps n --guidance w`` makes (image i
of class K from seed (seed, i)), scored by the digits classifier of
``sddpm.evaluation.digits_features``: per-class accuracy (the classifier's top class is K) and
the proxy FID of the class-balanced set of all classes against the 1,797 digits. With
``--uncond RUN`` the same number of unconditional samples (same sampler, seed) give the
reference proxy FID (issue 12: at most 1.2x). Prints a table and writes JSON.

    PYTHONPATH=src .venv/bin/python benchmarks/digits_conditional.py --run runs/digits-cond \
        --uncond runs/digits --guidance 1,1.5,2,3 --per-class 40 --out cond.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sddpm.data import build_dataset
from sddpm.evaluation.digits_features import digits_proxy_fid, load_digits_feature_net
from sddpm.generation import generate, load_for_sampling


def _samples(setup, num: int, **options) -> torch.Tensor:
    c, s = setup.model.config.image_channels, setup.model.config.image_size
    x = generate(setup.model, num, (c, s, s), schedule=setup.schedule,
                 prediction=setup.prediction, progress=False, **options)  # fmt: skip
    return ((x + 1) / 2).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", required=True, help="a class-conditional run or model directory")
    ap.add_argument("--uncond", default=None, help="an unconditional run, for the proxy FID ratio")
    ap.add_argument("--guidance", default="1,1.5,2,3", help="comma list of w")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--sampler", default="dpm-solver++")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="JSON output")
    args = ap.parse_args()

    net = load_digits_feature_net()
    data = build_dataset("digits", hflip=False)
    real = (torch.stack([data[i] for i in range(len(data))]) + 1) / 2
    common = dict(sampler=args.sampler, steps=args.steps, seed=args.seed,
                  batch_size=args.batch_size)  # fmt: skip
    setup = load_for_sampling(args.run)
    n_classes = setup.model.config.num_classes
    if n_classes != 10:
        raise SystemExit(f"{args.run} is not a 10-class digits model (num_classes={n_classes})")
    rows = []
    uncond_fid = None
    if args.uncond:
        t0 = time.perf_counter()
        x = _samples(load_for_sampling(args.uncond), args.per_class * 10, **common)
        uncond_fid = digits_proxy_fid(x, real, net)
        print(f"unconditional {args.uncond}: proxy FID {uncond_fid:.3f} "
              f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    for w in [float(v) for v in args.guidance.split(",")]:
        t0 = time.perf_counter()
        per_class, images = [], []
        for k in range(10):
            x = _samples(setup, args.per_class, labels=[k], guidance=w, **common)
            per_class.append(float((net.probs(x).argmax(1) == k).float().mean()))
            images.append(x)
        fid = digits_proxy_fid(torch.cat(images), real, net)
        rows.append({
            "guidance": w, "accuracy": sum(per_class) / 10, "min_class_accuracy": min(per_class),
            "per_class_accuracy": per_class, "proxy_fid": fid,
            "fid_ratio_to_uncond": None if uncond_fid is None else fid / uncond_fid,
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
        r = rows[-1]
        ratio = "" if uncond_fid is None else f", {r['fid_ratio_to_uncond']:.2f}x uncond"
        print(f"w={w:g}: accuracy {r['accuracy']:.3f} (min {r['min_class_accuracy']:.3f}), "
              f"proxy FID {fid:.3f}{ratio}; per class "
              + " ".join(f"{a:.2f}" for a in per_class))  # fmt: skip
    result = {
        "run": args.run, "kind": setup.model.config.kind, "uncond": args.uncond,
        "uncond_proxy_fid": uncond_fid, **common, "per_class": args.per_class, "rows": rows,
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
