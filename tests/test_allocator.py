"""The worker's malloc setting: memory a step frees is reused by the next without faulting pages in."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Allocates and touches three 4 MiB buffers, then frees them, 20 times (as a step does with its
# attention contexts), and prints the page faults of the last 19 rounds.
ROUNDS = """
import ctypes, resource, sys
from daemon.worker.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 4 * 2**20
def round_trip():
    buffers = [libc.malloc(size) for _ in range(3)]
    for p in buffers:
        ctypes.memset(p, 1, size)
    for p in buffers:
        libc.free(p)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


def test_freed_step_memory_is_reused_without_page_faults():
    untuned, tuned = faults("default"), faults("tuned")
    pages = 3 * 4 * 2**20 // 4096
    assert untuned >= 19 * pages // 2  # glibc's default gives the memory back and faults it in each round
    assert tuned < pages // 4  # kept in the heap: the rounds after the first fault (almost) nothing
