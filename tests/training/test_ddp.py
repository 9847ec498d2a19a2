"""DDP on the CPU (Gloo, 2 processes under torchrun) against one process.

Two ranks with 4 images each and one process with the same global batch of 8 in 2
micro-batches of 4 make the same computation: rank r's images are the ones one process puts in
micro-batch r (see sddpm.training.loop), each micro-batch's BatchNorm statistics are over the
same 4 images, and every image gets the same diffusion step and noise. The gradients then
differ only in how the two halves are combined: DDP divides each rank's gradient by 2 and sums
them, one process backpropagates loss / 2 per micro-batch and sums; halving is exact in binary
floating point and a sum of two terms does not depend on their order, so the results are
bit-identical (no tolerance needed, no spike can flip). With one micro-batch of 8 instead, the
BatchNorm statistics differ and so does the loss (checked too, so the comparison has teeth).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from sddpm.training import latest_checkpoint, load_training_state, resumable_checkpoints, train

from .conftest import small_folder

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(tmp_path, config, *mode: str, run: str = "run", out: str = "out"):
    """Run ddp_worker.py on 2 Gloo ranks; returns its output folder ``tmp_path / out``."""
    (tmp_path / "config.json").write_text(config.to_json())
    out = tmp_path / out
    out.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(tmp_path / "config.json"),
            str(tmp_path / run),
            str(out),
            *mode,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,  # a rank left waiting in a collective would hang here
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _errors(out) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


def test_two_gloo_ranks_match_one_process(tmp_path, tiny):
    kind = "spiking"
    steps = 4
    ddp_config = tiny(f"model.kind={kind}", f"total_steps={steps}", "checkpoint_every=0")
    out = _torchrun(tmp_path, ddp_config, run="ddp_run")
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    assert r0["world_size"] == 2 and len(r0["losses"]) == steps
    # DDP keeps the ranks' parameters identical (the all-reduced gradient is the same on both)
    for name, value in r0["state"].items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(value, r1["state"][name]), name
    assert r0["losses"] == r1["losses"]  # the logged loss is all-reduced
    # only rank 0 wrote the run directory; it holds the final checkpoint
    assert latest_checkpoint(tmp_path / "ddp_run").name == f"step_{steps:08d}"

    single = train(ddp_config.override(["grad_accum=2"]), tmp_path / "single", progress=False)
    assert single.losses == r0["losses"]
    single_state = single.model.state_dict()
    for name, value in r0["state"].items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm buffers follow each rank's own micro-batch
        assert torch.equal(value, single_state[name]), name
    whole = train(
        ddp_config.override(["grad_accum=1", "total_steps=1"]), tmp_path / "w", progress=False
    )
    assert whole.losses[0] != r0["losses"][0]  # BatchNorm over 8 images, not 2 x 4


def _trainable(state: dict) -> dict:
    """The entries that do not depend on how the micro-batches were spread over processes
    (BatchNorm's running statistics follow each rank's own micro-batches)."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def _assert_same(a: dict, b: dict) -> None:
    a, b = _trainable(a), _trainable(b)
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def _layout_configs(tmp_path, tiny):
    """13 flipped images (epochs end inside batches, not a multiple of 2), batch 8, 6 steps:
    the 1-process config (2 micro-batches) and the 2-rank one (1 micro-batch each), which read
    the same images into the same micro-batches; and the uninterrupted 1-process run."""
    one = tiny(*small_folder(tmp_path / "images"), "total_steps=6", "grad_accum=2")
    straight = train(one, tmp_path / "straight", progress=False)
    return one, one.override(["grad_accum=1"]), straight


def test_a_one_process_run_resumes_on_two_gloo_ranks(tmp_path, tiny):
    """Trained 3 steps on 1 process x 2 micro-batches, resumed on 2 ranks: the same losses and
    weights as the uninterrupted 1-process run (the data position is global; the resumed
    steps cross two epoch ends, one inside step 4's batch)."""
    one, two, straight = _layout_configs(tmp_path, tiny)
    first = train(one.override(["total_steps=3"]), tmp_path / "run", progress=False)
    assert first.losses == straight.losses[:3]
    out = _torchrun(tmp_path, two, "resume", run="run", out="resumed")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for result in ranks:
        assert result["world_size"] == 2 and result["losses"] == straight.losses[3:]
        _assert_same(result["state"], straight.model.state_dict())
        _assert_same(result["ema"], straight.ema.state_dict())
    state = load_training_state(latest_checkpoint(tmp_path / "run"))
    assert state["world_size"] == 2 and state["data"]["position"] == 6 * 8


def test_a_two_rank_run_resumes_on_one_process(tmp_path, tiny):
    """The reverse: 3 steps on 2 ranks, resumed on 1 process x 2 micro-batches."""
    one, two, straight = _layout_configs(tmp_path, tiny)
    out = _torchrun(tmp_path, two.override(["total_steps=3"]), run="run")
    assert torch.load(out / "rank0.pt", weights_only=True)["losses"] == straight.losses[:3]
    assert load_training_state(latest_checkpoint(tmp_path / "run"))["data"]["position"] == 24
    resumed = train(one, tmp_path / "run", resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.losses == straight.losses[3:]
    _assert_same(resumed.model.state_dict(), straight.model.state_dict())
    _assert_same(resumed.ema.state_dict(), straight.ema.state_dict())


def test_a_failed_checkpoint_write_on_rank0_stops_every_rank(tmp_path, tiny):
    config = tiny("total_steps=6", "checkpoint_every=2")
    r0, r1 = _errors(_torchrun(tmp_path, config, "disk-full"))
    assert r0["error"].startswith("CheckpointWriteError") and "No space left" in r0["error"]
    assert "of step 2" in r0["error"]
    assert (
        r1["error"].startswith("CheckpointWriteError") and "rank 0 could not write" in r1["error"]
    )
    assert r0["step"] == r1["step"] == 2  # neither went on to step 3


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_logging_step(tmp_path, tiny):
    config = tiny("total_steps=8", "checkpoint_every=0", "log_every=3")
    r0, r1 = _errors(_torchrun(tmp_path, config, "sigterm-rank1"))
    # rank 1 got SIGTERM in update 2; the ranks agree at the logging step 3 and stop there
    assert r0["step"] == r1["step"] == 3
    assert r0["error"].startswith("TrainingStopped") and r1["error"].startswith("TrainingStopped")
    assert "step_00000003" in r0["error"]
    assert [p.name for p in resumable_checkpoints(tmp_path / "run")] == ["step_00000003"]


def test_two_gloo_ranks_train_a_conditional_model_like_one_process(tmp_path, tiny, monkeypatch):
    """Label dropout is a function of (seed, step, global position): two ranks with one
    micro-batch each drop exactly the labels one process drops in 2 micro-batches (rank r's
    images are micro-batch r's), so the losses and weights are bit-identical too, with
    cond_drop=0.5. No dropout state is saved, and a 2-rank run resumed from its checkpoint
    goes on like the uninterrupted 1-process run."""
    from sddpm.training import load_training_state
    from sddpm.training import loop as loop_module

    config = tiny("num_classes=10", "cond_drop=0.5", "total_steps=3", "checkpoint_every=0")
    first = _torchrun(tmp_path, config, run="ddp_run")
    assert "label_dropout" not in load_training_state(latest_checkpoint(tmp_path / "ddp_run"))
    longer = config.override(["total_steps=6"])
    second = _torchrun(tmp_path, longer, "resume", run="ddp_run", out="resumed")

    seen, real_loss = [], loop_module.training_loss

    def loss(*args, **kwargs):
        seen.append(kwargs["y"].clone())
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop_module, "training_loss", loss)
    single = train(longer.override(["grad_accum=2"]), tmp_path / "single", progress=False)
    assert len(seen) == 6 * 2
    dropped = int(torch.cat(seen).eq(10).sum())
    assert 0 < dropped < 6 * 8  # some labels dropped, not all

    for out, steps in ((first, range(3)), (second, range(3, 6))):
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        for rank, result in enumerate(ranks):
            assert len(result["labels"]) == len(steps), rank  # one micro-batch per step
            for step, y in zip(steps, result["labels"], strict=True):
                assert torch.equal(y, seen[2 * step + rank]), (rank, step)
        assert ranks[0]["losses"] == single.losses[steps.start : steps.stop]
    for name, value in ranks[0]["state"].items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(value, single.model.state_dict()[name]), name
