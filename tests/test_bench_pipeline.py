"""`pws-batch bench pipeline` in a small configuration: the bare library (three times: with the CPU actors' malloc
settings, with glibc's defaults, and in a Ray worker on a local Ray of its own) and the whole pipeline against a real
Prefect server on loopback. Asserts that it completes and prints its table, the split of the pipeline's cost and its
efficiency, and that the malloc settings cut the page faults -- never how fast anything is."""

from __future__ import annotations

import re

import pytest

from servers import cli_with_server


@pytest.mark.slow
def test_bench_pipeline_small_configuration_runs_and_prints_its_efficiency(tmp_path):
    # Micro-batches of 8: the VAE decoder's buffers are then big enough that glibc's defaults mmap them afresh for
    # every micro-batch (with 2 candidates they stay under its mmap threshold and the page-fault ratio is ~3, noise).
    returncode, output = cli_with_server(tmp_path, "bench", "pipeline", "--pairs", "2", "--candidates", "8",
                                         "--steps", "3", "--micro-batch", "8", "--compare-malloc", "--ray-baseline",
                                         timeout=600)
    assert returncode == 0, output[-4000:]
    lines = output.strip().splitlines()
    assert re.fullmatch(r"pipeline efficiency \d+\.\d\d of bare, start-up \d+\.\d s, finalize \d+\.\d s", lines[-1]), \
        lines[-8:]
    assert any(re.match(r"bare, default malloc\s+[\d.]+\s+[\d.]+", line) for line in lines), lines[-8:]
    assert any(re.match(r"steady state \(pair 2 to pair 2\): bare [\d.]+ s, pipeline [\d.]+ s: efficiency \d+\.\d\d",
                        line) for line in lines), lines[-8:]
    assert any(re.match(r"bare, in a Ray worker\s+[\d.]+\s+[\d.]+", line) for line in lines), lines[-8:]
    # ... in a Ray worker process, not this one's child, started as the CPU actors are (this machine has no GPU)
    worker = next(line for line in lines if line.startswith("(the bare library in a Ray worker: pid "))
    assert "MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647)" in worker, worker
    assert any(re.fullmatch(r"Ray's worker process: the bare library's work [\d.]+ s there, \d+\.\d\d of its speed in "
                            r"a process of its own \(steady state \d+\.\d\d\); the pipeline's own orchestration: "
                            r"\d+\.\d\d of the bare library in a Ray worker \(steady state \d+\.\d\d\)", line)
               for line in lines), lines[-8:]
    malloc = next(line for line in lines if line.startswith("malloc: "))
    faults = re.search(r"page faults (\d+) vs (\d+)", malloc)
    assert faults and int(faults[1]) * 3 < int(faults[2]), malloc  # the settings keep freed pages for reuse
