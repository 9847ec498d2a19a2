"""retain_freed_memory: large CPU tensors stop page-faulting in again after every free."""

import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from sddpm.runtime import retain_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def faults_of_one_cycle():
    torch.ones(48 * 2**20 // 4)  # 48 MiB, above glibc's largest mmap threshold (32 MiB)
    before = faults()
    torch.ones(48 * 2**20 // 4)
    return faults() - before

default = faults_of_one_cycle()
took = retain_freed_memory()
assert retain_freed_memory()  # idempotent
print(default, took, faults_of_one_cycle())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_large_blocks_are_reused_instead_of_faulted_in():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    default, took, retained = int(out[0]), out[1] == "True", int(out[2])
    pages = 48 * 2**20 // 4096
    assert took
    assert default > 0.9 * pages  # every page of the fresh mmap is faulted in and zeroed
    assert retained < 0.01 * pages  # the freed block is reused as it is
