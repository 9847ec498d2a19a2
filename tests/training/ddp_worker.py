"""Run by test_ddp.py under torchrun: train, then save this rank's losses and weights.

python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py CONFIG RUN OUT
"""

import json
import os
import sys
from pathlib import Path

import torch

from sddpm.config import RunConfig
from sddpm.training import train


def main() -> None:
    config = RunConfig.from_json(Path(sys.argv[1]).read_text())
    run_dir, out = Path(sys.argv[2]), Path(sys.argv[3])
    result = train(config, run_dir, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {
            "losses": result.losses,
            "state": result.model.state_dict(),
            "ema": result.ema.state_dict(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        },
        out / f"rank{rank}.pt",
    )
    print(json.dumps({"rank": rank, "step": result.step}))


if __name__ == "__main__":
    main()
