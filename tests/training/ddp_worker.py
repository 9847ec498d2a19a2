"""Run by test_ddp.py under torchrun: train, then save this rank's losses, weights and the
labels each of its micro-batches trained on (after dropout; conditional models).

python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py CONFIG RUN OUT [MODE]

MODE ``resume`` continues the run in RUN from its newest checkpoint.
MODE (fault injection): ``disk-full`` makes rank 0's checkpoint writer fail with ENOSPC;
``sigterm-rank1`` sends SIGTERM to rank 1 alone during update 2. Either way each rank writes
``rankR.json`` with the error it stopped with and the step it stopped at.
"""

import errno
import json
import os
import signal
import sys
from pathlib import Path

import torch

from sddpm.config import RunConfig
from sddpm.training import Trainer, train
from sddpm.training import loop as loop_module


def inject(mode: str, rank: int) -> None:
    if mode == "disk-full" and rank == 0:

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        loop_module.save_checkpoint = full
    elif mode == "sigterm-rank1" and rank == 1:
        real = Trainer.train_step

        def step(self, x):
            if self.step + 1 == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, x)

        Trainer.train_step = step


def record_labels() -> list[torch.Tensor]:
    """The labels ``y`` of every training-loss call (one per micro-batch), in order."""
    seen: list[torch.Tensor] = []
    real = loop_module.training_loss

    def loss(*args, **kwargs):
        if kwargs.get("y") is not None:
            seen.append(kwargs["y"].clone())
        return real(*args, **kwargs)

    loop_module.training_loss = loss
    return seen


def main() -> None:
    config = RunConfig.from_json(Path(sys.argv[1]).read_text())
    run_dir, out = Path(sys.argv[2]), Path(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else None
    rank = int(os.environ.get("RANK", "0"))
    if mode not in (None, "resume"):
        inject(mode, rank)
        stopped_at = {}
        real_after = Trainer._after_step

        def after(self):
            stopped_at["step"] = self.step
            return real_after(self)

        Trainer._after_step = after
        try:
            train(config, run_dir, progress=False)
            error = None
        except Exception as err:  # what each rank stopped with
            error = f"{type(err).__name__}: {err}"
        (out / f"rank{rank}.json").write_text(json.dumps({"error": error, **stopped_at}))
        # What the test checks is written. Skip interpreter finalization: after a rank stopped
        # with an error, gloo's worker threads can still hold work objects whose destruction
        # then aborts the process ("terminate called without an active exception"; seen once
        # in a few dozen runs, on a loaded CPU), a torch teardown race, not the stop itself.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    labels = record_labels()
    result = train(config, run_dir, resume=mode == "resume", progress=False)
    torch.save(
        {
            "losses": result.losses,
            "labels": labels,
            "state": result.model.state_dict(),
            "ema": result.ema.state_dict(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        },
        out / f"rank{rank}.pt",
    )
    print(json.dumps({"rank": rank, "step": result.step}))


if __name__ == "__main__":
    main()
