"""A run killed with SIGKILL (here: in the middle of writing a checkpoint, the worst moment)
and resumed ends with the same weights and EMA as a run that was never interrupted, losing at
most the steps since its last whole checkpoint.

The child process kills itself at a chosen point, so the test waits on nothing but the
process's exit (no polling)."""

import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from sddpm.training import latest_checkpoint, load_training_state, read_metrics, train

CLI = [
    sys.executable,
    "-c",
    "import sys; from sddpm.cli import main; sys.argv[0] = 'sddpm'; main()",
]

# Run the CLI with the checkpoint writer patched to SIGKILL this process once the checkpoint of
# step KILL_AT is written into its temporary directory, just before its manifest and rename.
KILLED_CLI = [
    sys.executable,
    "-c",
    "import os, signal, sys\n"
    "import sddpm.rundir as rundir\n"
    "from sddpm.cli import main\n"
    "real = rundir._write_manifest\n"
    "def write(directory):\n"
    "    if directory.name.startswith(f'.step_{int(os.environ[\"KILL_AT\"]):08d}.'):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    real(directory)\n"
    "rundir._write_manifest = write\n"
    "sys.argv[0] = 'sddpm'\n"
    "main()\n",
]


def test_sigkill_while_checkpointing_then_resume_matches_an_uninterrupted_run(tmp_path, tiny):
    run = tmp_path / "run"
    total, every, kill_at = 20, 5, 15
    config = tiny(f"total_steps={total}", f"checkpoint_every={every}", "keep_last=0")
    (tmp_path / "tiny.json").write_text(config.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--config", str(tmp_path / "tiny.json"), "--out", str(run), "--no-progress"]
    killed = subprocess.run(
        [*KILLED_CLI, *args],
        env={**env, "KILL_AT": str(kill_at)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last_good = kill_at - every
    assert load_training_state(latest_checkpoint(run))["step"] == last_good
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # partial
    assert max(r["step"] for r in read_metrics(run / "metrics.csv")) == kill_at

    done = subprocess.run(
        [*CLI, "train", "--resume", str(run), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"from step_{last_good:08d} (step {last_good})" in done.stderr
    final = latest_checkpoint(run)
    assert final.name == f"step_{total:08d}" and load_training_state(final)["step"] == total
    steps = [r["step"] for r in read_metrics(run / "metrics.csv")]
    assert steps == list(range(1, total + 1))  # the redone steps replace the lost rows
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]

    straight = train(config, tmp_path / "straight", progress=False)
    for name, result in (("model", straight.model), ("ema", straight.ema)):
        saved = load_file(str(final / f"{name}.safetensors"))
        expected = result.state_dict()
        assert saved.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(saved[k], v), (name, k)
