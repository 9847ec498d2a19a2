"""No host sync in a training step (issue 10): every read-back of a tensor to Python happens
at a logging step, never inside :meth:`Trainer.train_step`."""

import collections

import pytest
import torch

from sddpm.distributed import DistContext
from sddpm.training import Trainer

# The Tensor methods that copy a value to the host (a device sync on an accelerator).
READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("conditional", [(), ("num_classes=10",)], ids=["uncond", "labels"])
def test_a_training_step_reads_nothing_back_and_logging_steps_read_once(
    tmp_path, tiny, monkeypatch, conditional
):
    log_every, total = 3, 7
    config = tiny(
        f"total_steps={total}", f"log_every={log_every}", "checkpoint_every=0", *conditional
    )
    trainer = Trainer(config, tmp_path / "run", DistContext(), progress=False)
    trainer.setup()
    trainer.restore(resume=False)
    reads: collections.Counter = collections.Counter()  # (phase, step) -> reads
    phase = {"now": "outside"}

    def host_counter_steps():
        # Adam keeps its step counters on the host (also on CUDA, unless capturable=True), so
        # reading them is no device sync; every other tensor counts.
        return {id(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}

    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if id(self) not in host_counter_steps():
                reads[(phase["now"], trainer.step)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def in_phase(name, method):
        def wrapped(self, *args):
            phase["now"] = name
            try:
                return method(self, *args)
            finally:
                phase["now"] = "outside"

        return wrapped

    monkeypatch.setattr(Trainer, "train_step", in_phase("step", Trainer.train_step))
    monkeypatch.setattr(Trainer, "_sync", in_phase("sync", Trainer._sync))
    result = trainer.run()
    monkeypatch.undo()

    assert result.step == total and len(result.losses) == total
    assert not [k for k in reads if k[0] == "step"], reads  # no read inside any step
    # reads happen only in the sync of a logging step (3, 6) or the final one (7), one each
    assert dict(reads) == {("sync", 3): 1, ("sync", 6): 1, ("sync", 7): 1}
    assert all(isinstance(v, float) for v in result.losses)
