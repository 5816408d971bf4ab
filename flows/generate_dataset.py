"""The Prefect flow `generate_dataset`: manifest -> Ray actors -> curated dataset.

Orchestration only (no model code, no torch): load and validate, plan deterministic shards, one Prefect task
per shard (with retries) running on Ray actors created once per run, then finalize. The flow run is named
after the manifest and publishes a progress artifact (updated as shards finish), a table of the 50 best kept
candidates with their scores, and a markdown summary: bounded however many pairs the manifest holds.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import re
import time
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from pws_batch.batch import engine, gallery, run
from pws_batch.batch.config import RunConfig
from pws_batch.batch.manifest import manifest_name
from pws_batch.batch.pair import PairRequest

SHARD_RETRIES = 2
SHARDS_IN_FLIGHT_PER_WORKER = 2
# The Prefect gallery artifact: the best 4, in at most 1.4 MB of markdown (Prefect refuses events over 1.5 MB).
GALLERY_TOP, GALLERY_MAX_CHARS = 4, 1_400_000
STOP_WAIT_S = 15  # at most this long, after Ctrl-C, for the shard tasks in flight to see their actors stopped
# Listeners in this process (the CLI's progress bar): called with (pairs_done, pairs_total), as each pair is
# ranked and as each shard commits.
PROGRESS_LISTENERS: list[Callable[[int, int], None]] = []
# Per run (by run key): what a shard task calls when one of its pairs is ranked.
_ON_RANKED: dict[str, Callable[[PairRequest], None]] = {}


def _flow_run_name() -> str:
    """The manifest's name and the time: kept as `pws-batch submit` gave it at creation (Prefect asks again as the
    run starts, which renamed it to the start's time)."""
    name = manifest_name(str(flow_run.parameters.get("manifest", "manifest")))
    given = flow_run.name or ""
    if re.fullmatch(re.escape(name) + r"-\d{8}-\d{6}", given):
        return given
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _unless_run_stopped(task, task_run, state) -> bool:
    """Prefect's retry condition of a shard: retry a failure, not a run that is ending (engine.RunStopped)."""
    return not isinstance(state.data, engine.RunStopped)


@task(name="generate-shard", task_run_name="shard-{shard.name}", retries=SHARD_RETRIES, retry_delay_seconds=2,
      retry_condition_fn=_unless_run_stopped, cache_policy=NO_CACHE, persist_result=False)
def generate_shard(run_key: str, out: str, model_ids: dict, shard: run.Shard, audio_format: str = "wav",
                   fingerprint: str | None = None, schema=None) -> dict:
    """Generate, rank, write and commit one shard on the run's Ray actors (retried if it fails), its data part
    in the run's `schema` (a pyarrow.Schema; read from run.json when not given)."""
    logger = get_run_logger()
    pool = engine.get_pool(run_key)
    on_ranked = _ON_RANKED.get(run_key)
    try:
        stats = run.process_shard(out, model_ids, shard, lambda reqs: engine.run_pairs(pool, reqs, on_ranked),
                                  audio_format=audio_format, fingerprint=fingerprint, schema=schema)
    except Exception as exc:
        if not engine.has_pool(run_key):  # the flow stopped its engine under this shard (Ctrl-C): no retry
            raise engine.RunStopped(f"shard {shard.name} stopped with its run ({type(exc).__name__}: {exc}); "
                                    f"committed shards are kept, a re-run resumes") from exc
        raise
    waited = stats.get("actor_wait_s") or 0.0  # queued behind the shard before it on the same worker
    logger.info(f"shard {shard.name}: {stats['pairs_done']}/{stats['pairs']} pairs, {stats['kept']} kept of "
                f"{stats['candidates']} candidates in {stats['seconds']:.1f} s on worker {stats['worker']}"
                + (f" ({waited:.1f} s of it waiting for the worker)" if waited >= 0.5 else ""))
    for failure in stats["failed"]:
        logger.warning(f"shard {shard.name}: pair {failure['pair_id']} (row {failure['row']}) failed: {failure['error']}")
    return stats


def _start_engine(config: RunConfig, logger) -> tuple[bool, engine.ActorPool]:
    """Ray and the run's actors (loading their models): those the CLI started while Prefect's API started
    (engine.warm_up), else started now. Returns whether this run started Ray (and so must stop it) and the pool."""
    warm = engine.take_warm(config)
    if warm is not None:
        started_ray, pool = warm
    else:
        started_ray = engine.connect_ray(config.engine.ray_address, log=logger.warning)
        pool = None
    logger.info(engine.describe_cluster(started_ray, config.engine.ray_address))
    if pool is None:
        pool = engine.start_actors(config, logger.info, wait=False, **engine.ACTOR_CLASSES)
    return started_ray, pool


def _artifact_key(name: str, suffix: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return f"{cleaned[:40] or 'run'}-{suffix}"


def _gallery_artifact(name: str, out: str, kept: tuple[list[dict], int], logger) -> None:
    """A bounded markdown artifact: the best GALLERY_TOP kept pairs with data-URI thumbnails and <audio> players
    (`kept`: finalize's best rows and the number kept: only the media of the rows shown are read)."""
    try:
        markdown = gallery.markdown_summary(out, top=GALLERY_TOP, max_chars=GALLERY_MAX_CHARS, kept=kept)
    except Exception as exc:  # noqa: BLE001 - a view of the results never fails the run that made them
        logger.warning(f"no gallery artifact: {type(exc).__name__}: {exc}")
        return
    create_markdown_artifact(key=_artifact_key(name, "gallery"), markdown=markdown,
                             description=f"the best kept pairs: look and listen (all: pws-batch gallery {out})")


@flow(name="generate-dataset", flow_run_name=_flow_run_name, persist_result=False, log_prints=False)
def generate_dataset(manifest: str, out: str, config: RunConfig | None = None) -> dict[str, Any]:
    """Turn a manifest of prompt pairs into a curated dataset of images that sound at `out`.

    `config` is the whole run config (pws_batch.batch.config.RunConfig: generation defaults, engine, plan, ranking);
    left out, every default applies (guides then come only from the manifest's own storage).
    """
    logger = get_run_logger()
    config = config or RunConfig()
    t_start = time.perf_counter()

    # 1. Validate (in a thread) while Ray starts and the actors load their models: neither waits on the other.
    #    Bad rows go to rejected.parquet; shards are planned (auto size: from the pairs and the actors); shards
    #    already committed are skipped.
    run_key = str(flow_run.id or id(config))
    started_ray, pool, actor_infos, errors = False, None, [], []
    running: dict[concurrent.futures.Future, Any] = {}  # the shard tasks in flight
    dispatch_s = ready_s = 0.0
    actor_count: concurrent.futures.Future = concurrent.futures.Future()
    preparer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare")
    try:
        holder = f"flow run {flow_run.name or ''} ({flow_run.id or 'no id'}) of {manifest}"
        preparing = preparer.submit(run.prepare, manifest, out, config, log=logger.info, holder=holder,
                                    actors=actor_count.result)
        try:
            if run.may_have_work(out, config):
                started_ray, pool = _start_engine(config, logger)
            actor_count.set_result(len(pool) if pool else config.engine.actors or 1)
        except BaseException as exc:
            actor_count.set_exception(exc)
            raise
        plan = preparing.result()
        for rejection in plan.validated.rejections[:run.TOP_K]:  # bounded: the rest are in rejected.parquet
            logger.warning(f"rejected {rejection}")
        if len(plan.validated.rejections) > run.TOP_K:
            logger.warning(f"... and {len(plan.validated.rejections) - run.TOP_K} more rejected rows: "
                           f"{out}/rejected.parquet")
        total_pairs = len(plan.validated.requests)
        pairs_done = sum(len(s.requests) for s in plan.shards if s.name in plan.done)
        progress_id = create_progress_artifact(
            progress=100.0 * pairs_done / max(total_pairs, 1), key=_artifact_key(plan.name, "progress"),
            description=f"pairs of {manifest} written to {out}")

        def report() -> None:
            update_progress_artifact(progress_id, 100.0 * pairs_done / max(total_pairs, 1))
            for listener in PROGRESS_LISTENERS:
                listener(pairs_done, total_pairs)

        report()
        ranked: set[str] = set()
        pairs_before = pairs_done

        def on_ranked(request: PairRequest) -> None:  # a pair ranked (a retried shard's pairs count once)
            ranked.add(request.pair_id)
            for listener in PROGRESS_LISTENERS:
                listener(pairs_before + len(ranked), total_pairs)

        # 2. One task per shard on Ray actors created once for the run. Two shards in flight per worker: one
        #    runs, the next has done its Prefect bookkeeping and takes the worker the moment it is free.
        if plan.todo and pool is None:  # the output looked complete but is not: start the engine now
            started_ray, pool = _start_engine(config, logger)
        pending = []
        if plan.todo:
            try:
                actor_infos = pool.wait_ready(logger.info)
                ready_s = time.perf_counter() - t_start
                engine.register_pool(run_key, pool)
                _ON_RANKED[run_key] = on_ranked
                pending = list(plan.todo)
            except engine.ModelsUnavailable as exc:  # one line, not a traceback per actor restart
                pool = None  # wait_ready stopped them
                errors.append(f"models not loaded: {exc}")
                logger.error(f"the actors could not load their models: {exc}")
            digest = run.fingerprint_digest(plan.fingerprint)  # the same for every shard of the run
            schema = quote(plan.schema)  # decided once by prepare: no shard reads run.json for it
            t_dispatch = time.perf_counter()
            while pending or running:
                while pending and len(running) < SHARDS_IN_FLIGHT_PER_WORKER * len(pool):
                    shard = pending.pop(0)
                    # quote: Prefect need not walk the shard's requests looking for futures (it would, per task)
                    future = generate_shard.submit(run_key, out, plan.model_ids, quote(shard),
                                                   config.plan.audio_format, digest, schema)
                    running[future.wrapped_future] = (future, shard)
                finished, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
                for wrapped in finished:
                    future, shard = running.pop(wrapped)
                    try:
                        future.result()
                        pairs_done += len(shard.requests)
                    except Exception as exc:  # noqa: BLE001 - the shard failed after its retries; others go on
                        errors.append(f"shard {shard.name}: {type(exc).__name__}: {exc}")
                        logger.error(f"shard {shard.name} failed after {SHARD_RETRIES} retries: {exc}")
                    report()
            dispatch_s = time.perf_counter() - t_dispatch
            if pool is not None:  # again at the end: the pairs each actor served, its (single) model load
                actor_infos = pool.infos()
    finally:
        preparer.shutdown(wait=True)
        engine.unregister_pool(run_key)
        _ON_RANKED.pop(run_key, None)
        engine.stop_actors(pool)
        if running:  # Ctrl-C: the shard tasks still in flight end (RunStopped) before Ray stops under them; a
            # thread inside a Ray call at ray.shutdown aborted the process ("The core worker has already been
            # shutdown"), skipping every clean-up after it
            concurrent.futures.wait(list(running), timeout=STOP_WAIT_S)
        if started_ray:
            import ray

            ray.shutdown()

    # 3. Finalize: run.json, dataset card, artifacts.
    t_finalize = time.perf_counter()
    elapsed = t_finalize - t_start
    summary = run.finalize(plan, actors=actor_infos, extra={"flow_run_id": str(flow_run.id) if flow_run.id else None,
                                                            "seconds": round(elapsed, 2),
                                                            "dispatch_s": round(dispatch_s, 3), "errors": errors})
    counts = summary["counts"]
    kept_rows = summary.pop("kept_rows")
    create_table_artifact(
        key=_artifact_key(plan.name, "kept"),
        description=f"the {len(kept_rows)} best kept candidates (CLIP + CLAP) of {counts['kept']} in {out}",
        table=[{"pair_id": r["pair_id"], "image_prompt": r["image_prompt"], "audio_prompt": r["audio_prompt"],
                "candidate": r["candidate_index"], "seed": r["seed"], "rank": r["rank"],
                "clip_score": round(r["clip_score"], 4), "clap_score": round(r["clap_score"], 4)} for r in kept_rows]
        or [{"pair_id": "(none kept)"}])
    _gallery_artifact(plan.name, out, (kept_rows, counts["kept"]), logger)
    generated = counts["candidates"] - sum(s.get("candidates", 0) for s in plan.done.values())
    create_markdown_artifact(key=_artifact_key(plan.name, "summary"), description="run summary", markdown="\n".join([
        f"# {plan.name}: {'complete' if summary['complete'] else 'INCOMPLETE'}", "",
        "| | |", "|---|---|",
        f"| dataset | `{out}` |",
        f"| manifest rows | {counts['rows']} |",
        f"| pairs kept | {counts['pairs_done']} |",
        f"| pairs failed | {counts['pairs_failed']} |",
        f"| rows rejected | {counts['rejected']} (`{out}/rejected.parquet`) |",
        f"| candidates | {counts['candidates']} ({counts['kept']} kept) |",
        f"| U-Net evaluations | {counts['unet_evals']} ({counts.get('unet_evals_per_kept_pair') or 'n/a'} per kept "
        f"pair; {counts.get('pairs_stopped_early', 0)} pairs stopped early at their targets) |",
        f"| shards | {counts['shards_committed']}/{counts['shards']} committed, {counts['shards_resumed']} resumed |",
        f"| time | {elapsed:.1f} s ({generated / elapsed if elapsed else 0:.2f} candidates/s this run) |",
        f"| actors | {len(actor_infos)} ({', '.join(sorted({a['device'] for a in actor_infos})) or 'none needed'}) |",
        "", *[f"- rejected {r}" for r in plan.validated.rejections[:50]],
        *[f"- failed pair {f['pair_id']}: {f['error']}" for f in summary["failed"][:50]],
        *([f"- ... {counts['rejected'] - 50} more rejected rows in `{out}/rejected.parquet`"]
          if counts["rejected"] > 50 else []),
        *([f"- ... {summary['failed_total'] - 50} more failed pairs in `{out}/_shards/*.json`"]
          if summary["failed_total"] > 50 else []),
        *[f"- {e}" for e in errors],
    ]))
    logger.info(f"dataset at {out}: {counts['pairs_done']} pairs kept, {counts['pairs_failed']} failed, "
                f"{counts['rejected']} rejected")
    summary["errors"] = errors
    summary["timings"] = {"flow_s": round(time.perf_counter() - t_start, 3), "ready_s": round(ready_s, 3),
                          "dispatch_s": round(dispatch_s, 3),
                          "finalize_s": round(time.perf_counter() - t_finalize, 3)}
    if errors:
        raise RuntimeError(f"{len(errors)} error(s); what was committed is kept, re-run to resume: "
                           + "; ".join(errors))
    return summary
