"""How recognisable are the digits a run generates?

Samples N images from a run's (or model directory's) EMA weights and scores them with the
digits classifier of ``sddpm.evaluation.digits_features`` (an MLP trained on scikit-learn's
digits training split): the fraction of samples classified with probability > 0.9 and how many
of the 10 classes occur among them. Prints a table and appends one JSON line per model to
``benchmarks/results.jsonl``.

    .venv/bin/python benchmarks/digits_quality.py runs/digits-spiking runs/digits-ann \
        --num 512 --sampler ddim --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from sddpm.evaluation.digits_features import digits_sample_report, load_digits_feature_net
from sddpm.generation import generate, load_for_sampling
from sddpm.models import find_model_dir, read_config
from sddpm.training import save_grid

RESULTS = Path(__file__).with_name("results.jsonl")


def score(path: str, num: int, sampler: str, steps: int, seed: int, weights: str, batch: int):
    model_dir = find_model_dir(path)
    cfg = read_config(model_dir)
    setup = load_for_sampling(model_dir, weights=weights)
    model = setup.model
    c, s = model.config.image_channels, model.config.image_size
    t0 = time.perf_counter()
    x = generate(
        model,
        num,
        (c, s, s),
        sampler=sampler,
        steps=steps,
        seed=seed,
        batch_size=batch,
        schedule=setup.schedule,
        prediction=setup.prediction,
        progress=False,
    )
    sample_s = time.perf_counter() - t0
    save_grid(x[:100], Path(model_dir) / f"quality_{sampler}{steps}.png", nrow=10)
    report = digits_sample_report(((x + 1) / 2).clamp(0, 1), load_digits_feature_net())
    run = cfg.get("run", {})
    return {
        "benchmark": "digits_quality",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_dir": str(model_dir),
        "kind": model.config.kind,
        "channels": model.config.channels,
        "step": run.get("step"),
        "train_elapsed_s": None,
        "weights": weights,
        "sampler": sampler,
        "sampler_steps": steps,
        "seed": seed,
        "sample_s": round(sample_s, 2),
        **report,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run directories or model directories")
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--weights", default="ema", choices=["ema", "model"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for p in args.paths:
        r = score(p, args.num, args.sampler, args.steps, args.seed, args.weights, args.batch)
        ts = Path(p) / "checkpoints"
        if ts.is_dir():  # training wall time of the run, from its training state
            from sddpm.training import latest_checkpoint, load_training_state

            ck = latest_checkpoint(p)
            if ck is not None:
                r["train_elapsed_s"] = round(float(load_training_state(ck)["elapsed_s"]), 1)
        rows.append(r)
        if not args.no_save:
            with open(RESULTS, "a") as f:
                f.write(json.dumps(r) + "\n")
    head = ["model_dir", "kind", "step", "train_s", "sampler", "conf>0.9", "classes", "mean p"]
    print(" | ".join(head))
    for r in rows:
        print(
            " | ".join(
                str(v)
                for v in (
                    r["model_dir"],
                    r["kind"],
                    r["step"],
                    r["train_elapsed_s"],
                    f"{r['sampler']}-{r['sampler_steps']}",
                    f"{r['confident_fraction']:.3f}",
                    f"{round(r['class_coverage'] * 10)}/10",
                    f"{r['mean_max_prob']:.3f}",
                )
            )
        )


if __name__ == "__main__":
    main()
