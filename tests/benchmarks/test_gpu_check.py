"""benchmarks/gpu_check.py, the GPU acceptance script, run on the CPU as CI can: the same checks
with tiny settings (Triton under its interpreter), so that the script cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _env() -> dict[str, str]:
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS")
    record = json.loads(out.read_text())
    assert record["verdict"] == "PASS" and record["quick"] is True
    assert record["sections"] == [
        "training", "resume", "kernels", "sampling", "inception", "ddp", "compiled-gradients"
    ]  # fmt: skip
    rows = {r["check"]: r for r in record["checks"]}
    from sddpm.snn import fused

    expected = {"train spiking", "train ann", "checkpoint + resume", "Inception features vs CPU"}
    expected |= {
        f"neuron kernel {k} ({d})"
        for k in fused.KERNELS
        if k not in ("eager", "auto")
        for d in ("float32", "bfloat16")
    }
    assert expected <= set(rows), sorted(rows)
    assert any(name.startswith("sample dpm-solver++ 20, bf16 + compile") for name in rows)
    assert any(name.startswith("DDP one-process step") for name in rows)
    # a kernel this CPU cannot run (no C++ compiler for "compiled") is skipped, not failed
    assert all(r["status"] in ("PASS", "INFO", "SKIP") for r in rows.values())
    assert not any(r["status"] == "SKIP" for n, r in rows.items() if "neuron kernel" not in n)
    for kind in ("spiking", "ann"):
        assert rows[f"train {kind}"]["images_per_s"] > 0
    assert rows["checkpoint + resume"]["max_abs_diff"] == 0.0  # bit-identical on the CPU
    (ddp,) = [r for name, r in rows.items() if name.startswith("DDP one-process step")]
    assert all(abs(r - 1) < 1e-4 for r in ddp["gradient_agreement"]["norm_ratio"])
    for kind in ("spiking", "ann"):  # float32 compiled gradients are eager mode's
        agreement = rows[f"compiled gradients {kind} (aot_eager, fp32)"]["gradient_agreement"]
        assert agreement["max_abs_diff"] < 1e-5
        assert all(abs(r - 1) < 1e-4 for r in agreement["norm_ratio"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--device cpu --quick" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_failing_check_is_a_fail_row_and_the_verdict():
    checks = _load_script().Checks()
    checks.add("fine", "PASS")
    with checks.run("broken"):
        raise RuntimeError("cuDNN refused mixed dtypes")
    assert not checks.passed
    row = checks.rows[-1]
    assert row["status"] == "FAIL" and "cuDNN refused mixed dtypes" in row["detail"]
    assert "broken" in checks.table()


def test_a_failed_worker_is_reported_by_its_own_error():
    """torchrun ends a failed worker's output with its own summary; the row names the
    worker's exception instead."""
    gpu_check = _load_script()
    stderr = "\n".join(
        [
            "[rank0]: Traceback (most recent call last):",
            '[rank0]:   File "gpu_check.py", line 436, in ddp_worker',
            "[rank0]: torch._inductor.exc.InductorError: TypeError: cannot determine truth value",
            "E1201 failed (exitcode: 1) local_rank: 0",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
            "============================================================",
        ]
    )
    proc = subprocess.CompletedProcess([], 1, "", stderr)
    assert gpu_check.worker_error(proc) == (
        "torch._inductor.exc.InductorError: TypeError: cannot determine truth value"
    )
    assert gpu_check.worker_error(subprocess.CompletedProcess([], 1, "last words\n", "")) == (
        "last words"
    )


def test_the_report_is_written_after_every_row(tmp_path):
    """A run cut short by a time limit leaves the rows it measured, marked INCOMPLETE."""
    report = tmp_path / "out" / "gpu_check.json"
    checks = _load_script().Checks(report, {"device": "cpu"})
    assert json.loads(report.read_text())["checks"] == []
    checks.add("train spiking", "PASS", "12.0 img/s", images_per_s=12.0)
    record = json.loads(report.read_text())
    assert record["verdict"] == "INCOMPLETE" and record["device"] == "cpu"
    assert [r["check"] for r in record["checks"]] == ["train spiking"]
    assert record["checks"][0]["images_per_s"] == 12.0
    checks.add("train ann", "FAIL", "nan img/s", loss=float("nan"), ratio=(float("inf"), 1.0))
    record = json.loads(report.read_text())  # a diverged loss is named, and the report goes on
    assert record["checks"][-1]["loss"] == "nan" and record["checks"][-1]["ratio"] == ["inf", 1.0]
    with checks.run("resume"):
        raise OSError("disk full")
    assert json.loads(report.read_text())["checks"][-1]["status"] == "FAIL"
    assert checks.finish() == "FAIL"
    assert json.loads(report.read_text())["verdict"] == "FAIL"
    assert [p.name for p in report.parent.iterdir()] == ["gpu_check.json"]  # no temporary left


def test_only_runs_the_named_checks(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out)]
    proc = subprocess.run(
        [*cmd, "--only", "compiled-training,training"],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads(out.read_text())
    assert record["verdict"] == "PASS"
    assert record["sections"] == ["training", "compiled-training"]  # in run order
    rows = {r["check"]: r for r in record["checks"]}
    assert not any("Inception" in name or "kernel" in name for name in rows)
    # The compiled step computes the eager one's loss. Not to the bit: traced BatchNorm rounds
    # otherwise, and a membrane within rounding of the threshold may flip a spike, which moves
    # a tiny model's loss by ~1e-5 to 1e-4 (3.5e-5 under torch 2.11, < 1e-5 under 2.13).
    for kind in ("spiking", "ann"):  # the compiled step trains as the eager one
        compiled = rows[f"train {kind} compile (aot_eager)"]
        assert compiled["compile_backend"] == "aot_eager" and compiled["images_per_s"] > 0
        assert (compiled["compiled_graphs"], compiled["graph_breaks"]) == (1, 0)
        assert abs(compiled["loss"] - rows[f"train {kind}"]["loss"]) < 1e-3
        assert compiled["conv_flops_per_step"] == rows[f"train {kind}"]["conv_flops_per_step"]
    assert "target: spiking / ANN step (compiled)" in rows


def test_only_with_an_unknown_check_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--only", "training,warp"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "warp" in lines[0] and "training, resume, kernels" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_markdown_table_has_a_row_per_check():
    header = {"device_name": "NVIDIA H200", "device": "cuda", "torch": "2.11.0", "triton": "3.6.0",
              "python": "3.12.1", "quick": False}  # fmt: skip
    checks = _load_script().Checks(None, header)
    checks.add("train spiking", "PASS", "1612.0 img/s", "batch 128 bf16")
    checks.add("target: spiking / ANN step", "MISS", "4.20x", "<= 4x | a pipe")
    lines = checks.markdown().splitlines()
    assert lines[0].startswith("`gpu_check.py` on NVIDIA H200 (cuda): torch 2.11.0, triton 3.6.0")
    assert "; PASS in" in lines[0]  # a MISSed target does not fail the check
    assert lines[2:] == [
        "| check | status | value | detail |",
        "| --- | --- | --- | --- |",
        "| train spiking | PASS | 1612.0 img/s | batch 128 bf16 |",
        "| target: spiking / ANN step | MISS | 4.20x | <= 4x \\| a pipe |",
    ]


def test_gradient_agreement_finds_a_lost_gradient():
    gpu_check = _load_script()
    ref = {"a": torch.tensor([3.0, -4.0]), "b": torch.tensor([0.5]), "bias": torch.tensor([1e-9])}
    same = gpu_check.gradient_agreement({k: v.clone() for k, v in ref.items()}, ref)
    assert same == {"max_abs_diff": 0.0, "norm_ratio": (1.0, 1.0)} and gpu_check.gradients_agree(
        same
    )
    noisy = {
        "a": torch.tensor([3.0, -4.2]),
        "b": torch.tensor([0.5]),
        "bias": torch.tensor([-3e-9]),
    }
    near = gpu_check.gradient_agreement(noisy, ref)  # the bias is below 1e-6 of the largest norm
    assert near["max_abs_diff"] == pytest.approx(0.05)
    assert near["norm_ratio"] == pytest.approx((1.0, (3**2 + 4.2**2) ** 0.5 / 5))
    assert gpu_check.gradients_agree(near)
    zeros = {k: torch.zeros_like(v) for k, v in ref.items()}  # what torch 2.11 once traced
    lost = gpu_check.gradient_agreement(zeros, ref)
    assert lost == {"max_abs_diff": 1.0, "norm_ratio": (0.0, 0.0)}
    assert not gpu_check.gradients_agree(lost)
    missing = gpu_check.gradient_agreement({"a": ref["a"]}, ref)  # b lost its gradient
    assert missing["norm_ratio"] == (0.0, 1.0) and not gpu_check.gradients_agree(missing)
    doubled = gpu_check.gradient_agreement({k: 2.5 * v for k, v in ref.items()}, ref)
    assert not gpu_check.gradients_agree(doubled)
    with pytest.raises(ValueError, match="all zero"):
        gpu_check.gradient_agreement(ref, zeros)
