"""`pws-batch bench pipeline` in a small configuration, two rounds: the bare library (four times a round: with the CPU
actors' malloc settings, with glibc's defaults, beside an idle local Ray, and in a Ray worker on a local Ray of its
own) and the whole pipeline against a real Prefect server on loopback. Asserts that it completes and prints each
round's table, the split of the pipeline's cost, the medians over the rounds (computed from the tables' own figures)
and that the malloc settings cut the page faults -- never how fast anything is."""

from __future__ import annotations

import re
import statistics

import pytest

from servers import cli_with_server, temp_folders


@pytest.mark.slow
def test_bench_pipeline_small_configuration_runs_and_prints_its_efficiency(tmp_path):
    # Micro-batches of 8: the VAE decoder's buffers are then big enough that glibc's defaults mmap them afresh for
    # every micro-batch (with 2 candidates they stay under its mmap threshold and the page-fault ratio is ~3, noise).
    before = temp_folders("pws-bench-pipeline-")
    returncode, output = cli_with_server(tmp_path, "bench", "pipeline", "--pairs", "2", "--candidates", "8",
                                         "--steps", "3", "--micro-batch", "8", "--compare-malloc", "--ray-baseline",
                                         "--rounds", "2", timeout=900)
    assert returncode == 0, output[-4000:]
    assert temp_folders("pws-bench-pipeline-") <= before  # its manifest and dataset are removed
    lines = output.strip().splitlines()
    assert re.fullmatch(r"pipeline efficiency \d+\.\d\d of bare, start-up \d+\.\d s, finalize \d+\.\d s", lines[-1]), \
        lines[-8:]
    assert any(re.match(r"bare, default malloc\s+[\d.]+\s+[\d.]+", line) for line in lines), lines[-8:]
    assert any(re.match(r"steady state \(pair 2 to pair 2\): bare [\d.]+ s, pipeline [\d.]+ s: efficiency \d+\.\d\d",
                        line) for line in lines), lines[-8:]
    assert len([line for line in lines if re.fullmatch(r"pairs 2 to 2, seconds each: bare [\d.]+; pipeline [\d.]+",
                                                        line)]) == 2, lines  # one per round
    assert any(re.match(r"bare, in a Ray worker\s+[\d.]+\s+[\d.]+", line) for line in lines), lines[-8:]
    assert any(re.match(r"bare, beside an idle Ray\s+[\d.]+\s+[\d.]+", line) for line in lines), lines[-8:]
    # ... in a Ray worker process, not this one's child, started as the CPU actors are (this machine has no GPU)
    worker = next(line for line in lines if line.startswith("(the bare library in a Ray worker: pid "))
    assert "MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647;" in worker, worker
    splits = [line for line in lines if re.fullmatch(
        r"Ray's processes beside it: the bare library's work [\d.]+ s, \d+\.\d\d of its speed alone \(steady state "
        r"\d+\.\d\d\); in a Ray worker: [\d.]+ s, \d+\.\d\d of that \(steady state \d+\.\d\d\); the pipeline's own "
        r"orchestration: \d+\.\d\d of the bare library in a Ray worker \(steady state \d+\.\d\d\)", line)]
    assert len(splits) == 2, lines[-12:]  # one per round

    # Two rounds, each with its table; the last line gives the medians of the rounds' own figures.
    assert [line for line in lines if re.fullmatch(r"round \d of 2", line)] == ["round 1 of 2", "round 2 of 2"]
    bare = [float(line.split()[2]) for line in lines if re.match(r"bare\s+[\d.]+\s+[\d.]+", line)]
    pipeline = [float(line.split()[2]) for line in lines if re.match(r"pipeline\s+[\d.]+\s+[\d.]+", line)]
    assert len(bare) == len(pipeline) == 2, lines
    printed = float(re.match(r"pipeline efficiency (\d+\.\d\d)", lines[-1])[1])
    # work_s is printed to 0.1 s: each round's ratio lies between these bounds, and so does their median
    low = statistics.median((b - 0.05) / (p + 0.05) for b, p in zip(bare, pipeline))
    high = statistics.median((b + 0.05) / (p - 0.05) for b, p in zip(bare, pipeline))
    assert low - 0.005 <= printed <= high + 0.005, (printed, bare, pipeline)
    spread = re.fullmatch(r"over 2 rounds, median \(lowest-highest\): efficiency (\d+\.\d\d) \((\d+\.\d\d)-(\d+\.\d\d)\); "
                          r"steady state [\d.]+ \([\d.]+-[\d.]+\); beside an idle Ray [\d.]+ \([\d.]+-[\d.]+\); in a Ray "
                          r"worker [\d.]+ \([\d.]+-[\d.]+\); the pipeline's own orchestration [\d.]+ \([\d.]+-[\d.]+\)",
                          lines[-2])
    assert spread and float(spread[1]) == printed and float(spread[2]) <= printed <= float(spread[3]), lines[-2]
    malloc = next(line for line in lines if line.startswith("malloc: "))
    faults = re.search(r"page faults (\d+) vs (\d+)", malloc)
    assert faults and int(faults[1]) * 3 < int(faults[2]), malloc  # the settings keep freed pages for reuse
