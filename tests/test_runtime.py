"""retain_freed_memory: a training step's large CPU tensors stop page-faulting in every step."""

import subprocess
import sys

import pytest

SIZES_MIB = (48, 33, 40, 48, 36)  # above glibc's largest mmap threshold (32 MiB)

PROBE = f"""
import resource, sys, torch
from sddpm.runtime import retain_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def step():  # the activations of one step: allocated, all alive, then freed
    kept = [torch.ones(mib * 2**20 // 4) for mib in {SIZES_MIB}]
    del kept

took = retain_freed_memory() if sys.argv[1] == "retain" else None
if took is not None:
    assert retain_freed_memory()  # idempotent
for _ in range(3):
    step()
before = faults()
for _ in range(10):
    step()
print(took, (faults() - before) / 10)
"""


def _faults_per_step(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_large_blocks_are_reused_instead_of_faulted_in():
    pages = sum(SIZES_MIB) * 2**20 // 4096
    _, default = _faults_per_step("default")
    took, retained = _faults_per_step("retain")
    assert took == "True"
    assert default > 0.9 * pages  # every page of every fresh mmap is faulted in and zeroed
    assert retained < 0.1 * pages  # the freed blocks are reused as they are
