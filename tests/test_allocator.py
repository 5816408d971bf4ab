"""The glibc malloc settings for CPU generation (pws_batch.core.allocator): with them a thread that allocates and
frees the same large block again and again (as every denoising step does) reuses its pages instead of faulting
them in anew each time -- whether they come from the environment at process start (the CPU actors) or from
mallopt in a running process (the `generate` command)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pws_batch.core.allocator import CPU_MALLOC_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHURN = """
import ctypes, resource, sys, threading
from pws_batch.core import allocator
if sys.argv[1] == "mallopt":
    assert allocator.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def churn():  # as torch's CPU allocator does (malloc and free; numpy would ask for huge pages)
    for _ in range(20):
        block = libc.malloc(64 << 20)
        ctypes.memset(block, 1, 64 << 20)  # every page written
        libc.free(block)
thread = threading.Thread(target=churn)  # on a thread of its own, as the models run
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread.start(); thread.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in CPU_MALLOC_ENV}
    if mode == "env":
        env.update(CPU_MALLOC_ENV)
    result = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_freed_and_allocated_again_fault_their_pages_in_once():
    default, from_env, from_mallopt = page_faults("default"), page_faults("env"), page_faults("mallopt")
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert default >= 10 * pages  # glibc's defaults: each 64 MB block is a fresh mmap, faulted in page by page
    assert from_env < 3 * pages and from_mallopt < 3 * pages, (default, from_env, from_mallopt)
