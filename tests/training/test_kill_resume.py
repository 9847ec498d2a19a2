"""A run killed with SIGKILL and resumed reaches its final step, losing at most the steps
since its last checkpoint."""

import os
import signal
import subprocess
import sys
import time

from sddpm.training import (
    latest_checkpoint,
    load_training_state,
    read_metrics,
    resumable_checkpoints,
)

CLI = [
    sys.executable,
    "-c",
    "import sys; from sddpm.cli import main; sys.argv[0] = 'sddpm'; main()",
]


def test_sigkill_then_resume(tmp_path, tiny):
    run = tmp_path / "run"
    total, every = 40, 5
    config = tmp_path / "tiny.json"
    config.write_text(tiny(f"total_steps={total}", f"checkpoint_every={every}").to_json())
    args = ["train", "--config", str(config), "--out", str(run), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*CLI, *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            found = resumable_checkpoints(run)
            if found and load_training_state(found[-1])["step"] >= 2 * every:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        else:
            raise AssertionError("no checkpoint within 60 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_training_state(latest_checkpoint(run))["step"]
    assert every * 2 <= killed_at < total, "the run finished before it was killed"
    logged = max(r["step"] for r in read_metrics(run / "metrics.csv"))
    assert logged - killed_at < every + 1  # at most the steps since the last checkpoint are lost

    done = subprocess.run(
        [*CLI, "train", "--resume", str(run), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"from step_{killed_at:08d} (step {killed_at})" in done.stderr
    final = latest_checkpoint(run)
    assert final.name == f"step_{total:08d}" and load_training_state(final)["step"] == total
    steps = [r["step"] for r in read_metrics(run / "metrics.csv")]
    assert steps == list(range(1, total + 1))  # the redone steps replace the lost rows
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
