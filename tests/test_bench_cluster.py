"""`pws-batch bench cluster` in a small configuration: the real flow, engine, writer and Prefect tasks (against a
real Prefect server on loopback) on a local Ray advertising logical GPUs, with stand-in actors. Asserts that it
completes and prints its efficiency as a number, never how fast it is."""

from __future__ import annotations

import re

import pytest

from servers import cli_with_server, temp_folders


@pytest.mark.slow
def test_bench_cluster_small_configuration_runs_and_prints_its_efficiency(tmp_path):
    before = temp_folders("pws-bench-cluster-")
    returncode, output = cli_with_server(tmp_path, "bench", "cluster", "--actors", "2", "--pairs", "8",
                                         "--pair-seconds", "0.1", "--candidates", "4", "--micro-batch", "2",
                                         timeout=600)
    assert returncode == 0, output[-4000:]
    assert temp_folders("pws-bench-cluster-") <= before  # its manifest and dataset are removed
    lines = output.strip().splitlines()
    assert re.fullmatch(r"orchestration efficiency \d+\.\d\d", lines[-1]), lines[-5:]
    assert any(re.search(r"driver: [\d.]+ CPU-s .* peak memory \d+ MB; 8/8 pairs done", line) for line in lines)
    assert "2 actors (logical GPUs), 8 pairs x 0.1 s" in output
