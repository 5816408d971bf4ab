"""Benchmarks of the batch layer that print what they measure side by side (never asserted in tests).

- `synthetic_manifest` / `bench_validate`: a big generated manifest with every kind of bad value, validated.
- `bench_cluster`: the real flow on a local Ray advertising A logical GPUs, with stand-in actors.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator


def synthetic_manifest(rows: int, seed: int = 0, bad_fraction: float = 0.05, other_scheduler: str | None = None):
    """A manifest of `rows` prompt pairs in which about `bad_fraction` of the rows carry one bad value each, of
    every kind validation knows (missing / empty / too long text, wrong types, out-of-range numbers, non-whole
    integers, a schedule with no active model, unknown schedulers, keep > candidates, duplicate ids, bad
    targets), plus pass-through columns (one clashing with an output column). Good rows use DDIMScheduler and
    EulerDiscreteScheduler, and some bad rows name `NoSuchScheduler`: all checked without torch. With
    `other_scheduler` (a diffusers class such as DPMSolverMultistepScheduler), a third of the good rows use it:
    its timesteps come from diffusers, in a child process."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    idx = np.arange(rows)
    df = pd.DataFrame({
        "pair_id": [f"pair-{i:07d}" for i in idx],
        "image_prompt": [f"a painting of castle number {i % 977}" for i in idx],
        "audio_prompt": [f"bells ringing, take {i % 613}" for i in idx],
        "guidance_image": rng.choice([7.5, 10.0, 12.0], rows),
        "t_image": rng.choice([0.8, 0.9, 1.0], rows),
        "t_audio": np.ones(rows),
        "steps": rng.choice([10.0, 20.0, 25.0], rows),
        "seed": idx.astype(np.int64),
        "num_candidates": pd.Series(rng.choice([4, 8], rows), dtype=object),
        "keep": rng.choice([1, 2], rows).astype(np.int64),
        "scheduler": pd.Series(rng.choice(["DDIMScheduler", "EulerDiscreteScheduler"] + [other_scheduler] * bool(
            other_scheduler), rows), dtype=object),
        "target_clip": rng.choice([np.nan, 0.25, 0.3], rows),
        "note": [f"n{i}" for i in idx],
        "rank": idx % 5,  # clashes with an output column: carried as manifest_rank
    })
    kinds: list[tuple[str, Any]] = [
        ("image_prompt", ""), ("image_prompt", None), ("audio_prompt", "x" * 1200), ("audio_prompt", float("nan")),
        ("guidance_image", -1.0), ("guidance_image", float("inf")), ("t_image", 1.5), ("steps", 2.5),
        ("steps", 0.0), ("steps", 5000.0), ("steps", float("nan")), ("seed", -3), ("num_candidates", "many"),
        ("num_candidates", True), ("num_candidates", "8"), ("num_candidates", 0), ("keep", 99),
        ("scheduler", "NoSuchScheduler"), ("scheduler", "bogus"), ("scheduler", 3), ("target_clip", float("inf")),
        ("pair_id", ""), ("pair_id", "p" * 300), ("pair_id", "pair-0000000"), ("pair_id", None),
        ("t_image", 0.5), ("t_audio", 0.5),  # both together below: a schedule with no active model
    ]
    bad_rows = rng.choice(rows, size=int(rows * bad_fraction), replace=False) if rows else []
    for n, r in enumerate(bad_rows):
        column, value = kinds[n % len(kinds)]
        if column in ("t_image", "t_audio") and value == 0.5:
            df.loc[r, ["t_image", "t_audio"]] = 0.5
            continue
        if column in ("seed", "keep") and not isinstance(value, int):
            df[column] = df[column].astype(object)
        df.at[r, column] = value
    return df


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_validate(rows: int = 100_000, compare: int = 0, print_fn: Callable[[str], None] = print,
                   other_scheduler: str | None = None) -> dict:
    """Validate a synthetic manifest of `rows` rows, printing seconds, this process's peak memory and whether
    torch was imported; with `compare`, also validate its first `compare` rows one row at a time and say whether
    the answers agree."""
    from pws_batch.batch.manifest import validate_manifest, validate_manifest_by_row
    from pws_batch.core.models import SD15_SCHEDULER_CONFIG

    t0 = time.perf_counter()
    df = synthetic_manifest(rows, other_scheduler=other_scheduler)
    made_s = time.perf_counter() - t0
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    validated = validate_manifest(df, scheduler_config=SD15_SCHEDULER_CONFIG)
    seconds = time.perf_counter() - t0
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # diffusers' child, if it ran
    out = {"rows": rows, "good": len(validated.requests), "rejected": len(validated.rejections),
           "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "peak_rss_before_mb": rss0, "pid": os.getpid(),
           "child_peak_rss_mb": child_mb}
    print_fn(f"validate: {rows} rows ({out['good']} good, {out['rejected']} rejected) in {seconds:.2f} s; "
             f"peak memory of this process {out['peak_rss_mb']:.0f} MB ({rss0:.0f} MB before validating; "
             f"manifest made in {made_s:.1f} s; torch imported: {'yes' if 'torch' in sys.modules else 'no'})"
             + (f"; the child process that built schedulers through diffusers: peak {child_mb:.0f} MB, gone"
                if child_mb else ""))
    if compare:
        part = df.iloc[:compare].reset_index(drop=True)
        t0 = time.perf_counter()
        by_row = validate_manifest_by_row(part, scheduler_config=SD15_SCHEDULER_CONFIG)
        row_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vec = validate_manifest(part, scheduler_config=SD15_SCHEDULER_CONFIG)
        vec_s = time.perf_counter() - t0
        same = same_answers(by_row, vec)
        print_fn(f"first {compare} rows: row by row {row_s:.2f} s, vectorised {vec_s:.2f} s "
                 f"({row_s / vec_s:.1f}x); same answers: {same}")
        out.update(compare=compare, same=same, by_row_s=row_s, vectorised_s=vec_s)
    return out


def same_answers(a, b) -> bool:
    """Two validations agree: the same requests (row, id, parameters, keep, targets, extras) and rejections."""
    return ([(r.row, r.pair_id, r.params, r.keep, r.target_clip, r.target_clap, r.extra) for r in a.requests]
            == [(r.row, r.pair_id, r.params, r.keep, r.target_clip, r.target_clap, r.extra) for r in b.requests]
            and [vars(r) for r in a.rejections] == [vars(r) for r in b.rejections]
            and a.warnings == b.warnings and a.num_rows == b.num_rows)


# ---------------------------------------------------------------------------------------------- bench cluster
def bench_cluster(flow: Callable[..., dict], actors: int = 4, pairs: int = 64, pair_seconds: float = 0.5,
                  candidates: int = 8, micro_batch: int = 8, shard_size: int | None = None,
                  workdir: str | None = None, print_fn: Callable[[str], None] = print) -> dict:
    """The real flow (`flow`: flows.generate_dataset.generate_dataset), engine, writer and Prefect tasks on a local
    Ray that advertises `actors` GPUs (logical resources), with stand-in actors that take `pair_seconds` per pair
    (pws_batch.batch.standins). Prints the driver's CPU and memory and `orchestration efficiency E.EE` =
    pairs x pair_seconds / (actors x steady-state wall), the steady state being the flow's dispatch of the shards
    (after the actors are up, before finalize). Its files are removed afterwards unless `workdir` is given."""
    with _work_folder(workdir, "pws-bench-cluster-") as folder:
        return _bench_cluster(flow, folder, actors, pairs, pair_seconds, candidates, micro_batch, shard_size,
                              print_fn)


@contextmanager
def _work_folder(workdir: str | None, prefix: str) -> Iterator[str]:
    """`workdir`, else a temporary folder removed afterwards: a benchmark's manifest and dataset are of no use
    after it."""
    folder = workdir or tempfile.mkdtemp(prefix=prefix)
    try:
        yield folder
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


def _bench_cluster(flow: Callable[..., dict], folder: str, actors: int, pairs: int, pair_seconds: float,
                   candidates: int, micro_batch: int, shard_size: int | None,
                   print_fn: Callable[[str], None]) -> dict:
    import pandas as pd

    from pws_batch.batch import engine

    engine.ray_environment(None)  # a local Ray on loopback: set before ray is imported, which reads it
    import ray
    from pws_batch.batch.config import RunConfig
    from pws_batch.batch.dataset import Output
    from pws_batch.batch.standins import StandInGenerator, StandInRanker

    manifest = os.path.join(folder, "bench-cluster.parquet")
    pd.DataFrame({"pair_id": [f"pair-{i:06d}" for i in range(pairs)],
                  "image_prompt": [f"a drawing of bell {i}" for i in range(pairs)],
                  "audio_prompt": [f"a bell ringing {i}" for i in range(pairs)]}).to_parquet(manifest, index=False)
    out = os.path.join(folder, "out")
    config = RunConfig().replace(defaults={"num_candidates": candidates, "keep": 1, "steps": 10},
                                 engine={"actors": actors, "micro_batch": micro_batch, "device": "auto"},
                                 plan={"shard_size": shard_size, "overwrite": True})
    started = not ray.is_initialized()
    if started:  # the GPUs are logical: Ray schedules the actors as on a GPU cluster; the stand-ins use none
        engine.start_local_ray(num_cpus=actors + 1, num_gpus=actors)
    try:
        t0, cpu0 = time.perf_counter(), _cpu_s()
        with engine.use_actors(StandInGenerator, StandInRanker, pair_seconds=pair_seconds):
            flow(manifest, out, config)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    finally:
        if started:
            ray.shutdown()
    run = Output(out).read_json("run.json")
    dispatch_s = run.get("dispatch_s") or float("nan")
    counts = run.get("counts", {})
    ideal = pairs * pair_seconds / actors
    efficiency = ideal / dispatch_s if dispatch_s and pair_seconds else float("nan")
    shards = counts.get("shards", 0)
    result = {"actors": actors, "pairs": pairs, "pair_seconds": pair_seconds, "shards": shards,
              "shard_size": run.get("shard_size"), "dispatch_s": dispatch_s, "ideal_s": ideal, "flow_s": wall,
              "driver_cpu_s": cpu, "driver_peak_rss_mb": peak_rss_mb(), "efficiency": efficiency,
              "pairs_done": counts.get("pairs_done"), "out": out}
    print_fn(f"pws-batch bench cluster: {actors} actors (logical GPUs), {pairs} pairs x {pair_seconds:g} s, "
             f"{candidates} candidates per pair, micro-batch {micro_batch}; {shards} shards of "
             f"{run.get('shard_size')} pairs")
    print_fn(f"{'':<28} {'seconds':>9}")
    print_fn(f"{'ideal (P x X / A)':<28} {ideal:>9.2f}")
    print_fn(f"{'steady state (dispatch)':<28} {dispatch_s:>9.2f}")
    print_fn(f"{'whole flow':<28} {wall:>9.2f}")
    print_fn(f"driver: {cpu:.1f} CPU-s over the flow ({cpu / wall:.2f} cores), peak memory "
             f"{result['driver_peak_rss_mb']:.0f} MB; {counts.get('pairs_done', 0)}/{pairs} pairs done; "
             f"feeds {pairs / dispatch_s:.1f} pairs/s")
    if pair_seconds:
        print_fn(f"orchestration efficiency {efficiency:.2f}")
    else:  # nothing to be efficient at: how fast the driver can feed the workers is the figure
        print_fn(f"orchestration efficiency n/a (0 s pairs: the driver fed {pairs / dispatch_s:.1f} pairs/s)")
    return result


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------- bench pipeline
def _bench_prompts(i: int) -> tuple[str, str]:
    """Pair i's image and audio prompts, the same for the bare library and the pipeline's manifest."""
    return f"a painting of bells {i}", f"bells ringing {i}"


def bare_library(models: str, pairs: int, candidates: int, steps: int, micro_batch: int,
                 actors_malloc: bool = True) -> dict:
    """What a script would do by hand, in this process: load the models, then generate and score each pair.
    With `actors_malloc`, on a CPU, first the glibc malloc settings CPU actors start with (allocator). Returns its
    seconds, page faults, peak memory and whether those settings were applied."""
    from pws_batch.core.allocator import keep_freed_memory
    from pws_batch.core.device import resolve_device
    from pws_batch.core.models import resolve_model_set
    from pws_batch.core.params import GenerationParams
    from pws_batch.core.pipeline import ImagesThatSoundPipeline
    from pws_batch.core.scorers import ClapScorer, ClipScorer

    device = resolve_device("auto")
    applied = actors_malloc and device.type == "cpu" and keep_freed_memory()  # as CPU actors start (not GPU ones)
    t0 = time.perf_counter()
    model_set = resolve_model_set(models)
    pipe = ImagesThatSoundPipeline.from_model_set(model_set, vocoder="hifigan")
    clip, clap = ClipScorer(model_set.clip, device=device), ClapScorer(model_set.clap, device=device)
    load_s = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    ends = []
    for i in range(pairs):
        params = GenerationParams(*_bench_prompts(i), num_candidates=candidates, steps=steps)
        result = pipe(params, micro_batch=micro_batch)
        clip([c.image for c in result.candidates], params.effective_image_prompt)
        clap([c.audio for c in result.candidates], params.audio_prompt)
        ends.append(time.perf_counter() - t0)
    return {"load_s": load_s, "work_s": ends[-1] if ends else 0.0, "pair_ends_s": ends, "peak_rss_mb": peak_rss_mb(),
            "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, "actors_malloc": applied}


@contextmanager
def _local_ray() -> Iterator[tuple[bool, dict[str, Any]]]:
    """A local Ray started for one baseline (never $RAY_ADDRESS's cluster), stopped after it: whether it has a GPU,
    and the options that place one worker on it as start_actors places one (every CPU and the CPU actors' malloc
    settings, or one GPU)."""
    from pws_batch.batch import engine

    engine.ray_environment(None)  # a local Ray on loopback: set before ray is imported, which reads it
    import ray

    engine.start_local_ray()
    try:
        resources = ray.cluster_resources()
        gpu = resources.get("GPU", 0) >= 1
        yield gpu, engine.worker_placement(gpu, int(resources.get("CPU", 1)))
    finally:
        ray.shutdown()


def bare_in_a_ray_worker(models: str, pairs: int, candidates: int, steps: int, micro_batch: int) -> dict:
    """bare_library as one Ray task, on a local Ray started for it: the same work in the kind of process the
    pipeline's worker is (a Ray worker placed as start_actors places one), with none of the pipeline's
    orchestration."""
    with _local_ray() as (gpu, placement):
        import ray  # after _local_ray has set what ray reads when imported

        task = ray.remote(_bare_library_in_a_worker).options(max_retries=0, **placement)
        return ray.get(task.remote(models, pairs, candidates, steps, micro_batch, not gpu))


def bare_beside_ray(models: str, pairs: int, candidates: int, steps: int, micro_batch: int) -> dict:
    """bare_library in a process of its own (a child of this one), as `bare` runs it, while a local Ray started for
    it idles beside it with the pipeline's processes: its GCS, raylet and agents, this process as its driver, and
    one idle actor holding the worker's resources (placed as the worker is). The cost of Ray's processes sharing
    the machine, without the work running in one of them."""
    with _local_ray() as (_, placement):
        import ray  # after _local_ray has set what ray reads when imported

        idle = ray.remote(_IdleActor).options(**placement).remote()
        ray.get(idle.ready.remote())  # its process is up (and Ray's start-up over) before the work starts
        return _in_a_child("bare_library", models, pairs, candidates, steps, micro_batch, True)


class _IdleActor:
    """Holds a worker's place in bare_beside_ray and does nothing."""

    def ready(self) -> bool:
        return True


def _bare_library_in_a_worker(*args: Any) -> dict:
    """bare_library(*args), with the process it ran in: its pid, niceness and the glibc malloc variables it started
    with."""
    from pws_batch.core.allocator import malloc_env_started_with

    return {**bare_library(*args), "pid": os.getpid(), "niceness": os.nice(0), "malloc_env": malloc_env_started_with()}


def _in_a_child(function: str, *args: Any) -> dict:
    """`function`(*args) of this module in a child process (without any glibc malloc variable this process may
    have), its result a JSON object."""
    import json
    import subprocess

    from pws_batch.core.allocator import CPU_MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if k not in CPU_MALLOC_ENV}
    code = (f"import json, sys; from pws_batch.batch.bench import {function}; "
            f"print('RESULT ' + json.dumps({function}(*json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the process of {function} failed (exit {done.returncode}): {done.stdout[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def bench_pipeline(flow: Callable[..., dict], pairs: int = 4, candidates: int = 8, steps: int = 20,
                   models: str = "tiny", micro_batch: int = 8, workdir: str | None = None,
                   compare_malloc: bool = False, ray_baseline: bool = False, rounds: int = 1,
                   listeners: list | None = None, print_fn: Callable[[str], None] = print) -> dict:
    """The bare library (bare_library, in a child process) and the whole pipeline (the flow with its Prefect
    API, Ray, actors, writer and finalize) on the same work, one after the other in one process tree, `rounds`
    times in turn (these machines are noisy: one round's ratio can be off by a tenth). Prints each round's table and
    `pipeline efficiency E.EE of bare, start-up U.U s, finalize F.F s` (over several rounds, the medians):
    efficiency = the bare library's work / the pipeline's shard work (its whole dispatch, the first pair included).
    With `listeners` (the flow's PROGRESS_LISTENERS, called in this process as each pair is ranked) it also prints
    the steady state: the time from the first pair's end to the last's, on both sides (the first pair of the
    pipeline shares the cores with the end of the start-up of Prefect's and Ray's processes).

    On a CPU both run with the glibc malloc settings the CPU actors get (pws_batch.core.allocator; on a GPU both
    keep glibc's defaults), so the ratio measures the orchestration alone; `compare_malloc` also runs the bare
    library with glibc's defaults and prints what the settings are worth. `ray_baseline` also runs it beside an idle
    local Ray (bare_beside_ray) and in a Ray worker process (bare_in_a_ray_worker), and splits the pipeline's cost
    into Ray's processes sharing the machine, the work running in one of them, and the pipeline's own
    orchestration."""
    with _work_folder(workdir, "pws-bench-pipeline-") as folder:
        return _bench_pipeline(flow, folder, pairs, candidates, steps, models, micro_batch, compare_malloc,
                               ray_baseline, rounds, listeners, print_fn)


def _bench_pipeline(flow: Callable[..., dict], folder: str, pairs: int, candidates: int, steps: int, models: str,
                    micro_batch: int, compare_malloc: bool, ray_baseline: bool, rounds: int, listeners: list | None,
                    print_fn: Callable[[str], None]) -> dict:
    import pandas as pd

    manifest = os.path.join(folder, "bench-pipeline.parquet")
    pd.DataFrame([dict(zip(("pair_id", "image_prompt", "audio_prompt"), (f"bench-{i}", *_bench_prompts(i))))
                  for i in range(pairs)]).to_parquet(manifest, index=False)
    print_fn(f"pws-batch bench pipeline: models={models} pairs={pairs} candidates={candidates} steps={steps} "
             f"micro_batch={micro_batch}" + (f" rounds={rounds} (the bare library and the pipeline in turn)"
                                             if rounds > 1 else ""))
    done = []
    for r in range(rounds):
        if rounds > 1:
            print_fn(f"round {r + 1} of {rounds}")
        done.append(_pipeline_round(flow, manifest, os.path.join(folder, "out"), pairs, candidates, steps, models,
                                    micro_batch, compare_malloc, ray_baseline, listeners, print_fn))
    result = {key: _median([d[key] for d in done]) for key in done[0]
              if all(isinstance(d[key], (int, float)) for d in done)}  # not a ratio a round could not measure
    if rounds > 1:
        parts = [f"efficiency {_spread([d['efficiency'] for d in done])}"]
        if all(d["steady_efficiency"] is not None for d in done):
            parts.append(f"steady state {_spread([d['steady_efficiency'] for d in done])}")
        for key, name in (("beside_ray", "beside an idle Ray"), ("in_ray_worker", "in a Ray worker"),
                          ("orchestration", "the pipeline's own orchestration")):
            if all(d.get(key) is not None for d in done):
                parts.append(f"{name} {_spread([d[key] for d in done])}")
        print_fn(f"over {rounds} rounds, median (lowest-highest): " + "; ".join(parts))
    print_fn(f"pipeline efficiency {result['efficiency']:.2f} of bare, start-up {result['startup_s']:.1f} s, "
             f"finalize {result['finalize_s']:.1f} s")
    return {**result, "rounds": done}


def _median(values: list[float]) -> float:
    """The median, NaN when any value is (a round that measured nothing)."""
    return float("nan") if any(math.isnan(v) for v in values) else statistics.median(values)


def _spread(values: list[float]) -> str:
    """"M.MM (L.LL-H.HH)": the median, lowest and highest."""
    return f"{_median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _pipeline_round(flow: Callable[..., dict], manifest: str, out: str, pairs: int, candidates: int, steps: int,
                    models: str, micro_batch: int, compare_malloc: bool, ray_baseline: bool,
                    listeners: list | None, print_fn: Callable[[str], None]) -> dict:
    """One round of bench_pipeline: the bare library (and its baselines), then the pipeline; prints its table."""
    from pws_batch.batch.config import RunConfig
    from pws_batch.core.allocator import CPU_MALLOC_ENV

    # The bare library: what a script would do by hand, on the same prompts.
    work_args = (models, pairs, candidates, steps, micro_batch)
    bare = _in_a_child("bare_library", *work_args, True)
    default = _in_a_child("bare_library", *work_args, False) if compare_malloc else None
    beside = _in_a_child("bare_beside_ray", *work_args) if ray_baseline else None
    in_ray = _in_a_child("bare_in_a_ray_worker", *work_args) if ray_baseline else None
    bare_load, bare_work = bare["load_s"], bare["work_s"]

    # The whole pipeline on the same pairs.
    config = RunConfig().replace(defaults={"num_candidates": candidates, "steps": steps, "keep": 1},
                                 engine={"models": models, "micro_batch": micro_batch},
                                 plan={"overwrite": True, "shard_size": max(1, pairs)})
    ranked_at: dict[int, float] = {}  # pairs done -> when first seen

    def on_progress(done: int, total: int) -> None:
        ranked_at.setdefault(done, time.perf_counter())

    if listeners is not None:
        listeners.append(on_progress)
    t0 = time.perf_counter()
    try:
        summary = flow(manifest, out, config)
    finally:
        if listeners is not None:
            listeners.remove(on_progress)
    whole = time.perf_counter() - t0
    timings = summary.get("timings", {})
    work, finalize_s = timings.get("dispatch_s", float("nan")), timings.get("finalize_s", float("nan"))
    startup = whole - work - finalize_s
    efficiency = bare_work / work if work else float("nan")
    print_fn(f"{'':<26} {'start-up_s':>11} {'work_s':>9} {'finalize_s':>11} {'total_s':>9}")
    print_fn(f"{'bare':<26} {bare_load:>11.1f} {bare_work:>9.1f} {0.0:>11.1f} {bare_load + bare_work:>9.1f}")
    for name, other in (("bare, default malloc", default), ("bare, beside an idle Ray", beside),
                        ("bare, in a Ray worker", in_ray)):
        if other:
            print_fn(f"{name:<26} {other['load_s']:>11.1f} {other['work_s']:>9.1f} {0.0:>11.1f} "
                     f"{other['load_s'] + other['work_s']:>9.1f}")
    print_fn(f"{'pipeline':<26} {startup:>11.1f} {work:>9.1f} {finalize_s:>11.1f} {whole:>9.1f}")
    if "api_and_ray_s" in timings:  # where start-up goes
        api, ready, flow_s = timings["api_and_ray_s"], timings.get("ready_s", 0.0), timings.get("flow_s", whole)
        created = whole - api - flow_s  # from the API's answer to the flow function's start
        print_fn(f"start-up: Prefect API (Ray and the actors starting meanwhile) {api:.1f} s, flow run created "
                 f"{created:.1f} s, flow start to actors ready {ready:.1f} s, then "
                 f"{startup - api - created - ready:.1f} s to the first shard")
    settings = " ".join(f"{k}={v}" for k, v in CPU_MALLOC_ENV.items())
    if not bare["actors_malloc"]:
        print_fn("(on a GPU the bare library, like the workers, keeps glibc's default malloc settings)")
    elif default:
        print_fn(f"malloc: the bare library's work {default['work_s'] / bare_work:.2f}x faster with {settings} "
                 f"(the CPU actors' settings) than with glibc's defaults ({bare_work:.1f} s vs "
                 f"{default['work_s']:.1f} s; page faults {bare['page_faults']} vs {default['page_faults']}; peak "
                 f"memory {bare['peak_rss_mb']:.0f} MB vs {default['peak_rss_mb']:.0f} MB)")
    else:
        print_fn(f"(the bare library ran with {settings}, as the CPU actors do; --compare-malloc: also without)")
    steady = None
    # When each pair ended in the pipeline (the flow's listeners hear every count from 1 to `pairs`)
    ends = [ranked_at[n] for n in range(1, pairs + 1)] if set(range(1, pairs + 1)) <= set(ranked_at) else []
    pipeline_steady = _steady(ends)
    if pipeline_steady is not None:
        bare_steady = _steady(bare["pair_ends_s"])
        steady = bare_steady / pipeline_steady if pipeline_steady > 0 else float("nan")
        print_fn(f"steady state (pair 2 to pair {pairs}): bare {bare_steady:.1f} s, pipeline {pipeline_steady:.1f} s: "
                 f"efficiency {steady:.2f}; the rest: bare's first pair {bare['pair_ends_s'][0]:.1f} s, the "
                 f"pipeline's dispatch {work - pipeline_steady:.1f} s (its first pair and the shard's commit)")
        # where a steady state is not yet steady (a worker's heap still growing, say)
        print_fn(f"pairs 2 to {pairs}, seconds each: bare {_intervals(bare['pair_ends_s'])}; pipeline "
                 f"{_intervals(ends)}")
    split: dict[str, float | None] = {}
    if in_ray and beside:  # where the pipeline's cost goes: Ray's processes, the work in one, the orchestration
        started = " ".join(f"{k}={v}" for k, v in in_ray["malloc_env"].items()) or "glibc's default malloc settings"
        print_fn(f"(the bare library in a Ray worker: pid {in_ray['pid']} of a local Ray started for it, at nice "
                 f"{in_ray['niceness']}, with {started}; beside an idle Ray: in a process of its own, as `bare`, "
                 f"while a local Ray with one idle actor placed as the worker runs beside it)")
        # Each ratio is a work time over the next one's, steady states over steady states where there are some.
        chain = [("beside_ray", bare, beside["work_s"], _steady(beside["pair_ends_s"])),
                 ("in_ray_worker", beside, in_ray["work_s"], _steady(in_ray["pair_ends_s"])),
                 ("orchestration", in_ray, work, pipeline_steady)]
        for key, before, after_work, after_steady in chain:
            reference = _steady(before["pair_ends_s"])
            split[key] = reference / after_steady if reference and after_steady else None
            split[key + "_work"] = before["work_s"] / after_work
        print_fn(f"Ray's processes beside it: the bare library's work {beside['work_s']:.1f} s, "
                 f"{split['beside_ray_work']:.2f} of its speed alone{_in_steady(split['beside_ray'])}; in a Ray "
                 f"worker: {in_ray['work_s']:.1f} s, {split['in_ray_worker_work']:.2f} of that"
                 f"{_in_steady(split['in_ray_worker'])}; the pipeline's own orchestration: "
                 f"{split['orchestration_work']:.2f} of the bare library in a Ray worker"
                 f"{_in_steady(split['orchestration'])}")
    return {"bare_load_s": bare_load, "bare_work_s": bare_work, "startup_s": startup, "work_s": work,
            "finalize_s": finalize_s, "total_s": whole, "efficiency": efficiency, "steady_efficiency": steady,
            **({"default_malloc_work_s": default["work_s"]} if default else {}),
            **({"ray_worker_work_s": in_ray["work_s"], "beside_ray_work_s": beside["work_s"]} if in_ray else {}),
            **split}


def _steady(pair_ends_s: list[float]) -> float | None:
    """From the first pair's end to the last's (None with one pair)."""
    return pair_ends_s[-1] - pair_ends_s[0] if len(pair_ends_s) >= 2 else None


def _intervals(ends: list[float]) -> str:
    """The time from each pair's end to the next's, "4.8 4.9 ..." ."""
    return " ".join(f"{b - a:.1f}" for a, b in zip(ends, ends[1:]))


def _in_steady(ratio: float | None) -> str:
    """" (steady state R.RR)" when there is one."""
    return f" (steady state {ratio:.2f})" if ratio else ""
