"""The Prefect flow `generate_dataset`: manifest -> Ray actors -> curated dataset.

Orchestration only (no model code, no torch): load and validate, plan deterministic shards, one Prefect task
per shard (with retries) running on Ray actors created once per run, then finalize. The flow run is named
after the manifest and publishes a progress artifact (updated as shards finish), a table of the kept pairs
with their scores, and a markdown summary.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import time
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pws_batch.batch import engine, run
from pws_batch.batch.manifest import PairRequest

SHARD_RETRIES = 2
# Listeners in this process (the CLI's progress bar): called with (pairs_done, pairs_total).
PROGRESS_LISTENERS: list[Callable[[int, int], None]] = []


def _flow_run_name() -> str:
    manifest = str(flow_run.parameters.get("manifest", "manifest"))
    stem = manifest.rstrip("/").rsplit("/", 1)[-1].split(".")[0] or "manifest"
    return f"{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


@task(name="generate-shard", task_run_name="shard-{shard_name}", retries=SHARD_RETRIES, retry_delay_seconds=2,
      cache_policy=NO_CACHE, persist_result=False)
def generate_shard(run_key: str, config: dict, model_ids: dict, shard_name: str, requests: list[dict],
                   fingerprint: str | None = None) -> dict:
    """Generate, rank, write and commit one shard on the run's Ray actors (retried if it fails)."""
    logger = get_run_logger()
    pool = engine.get_pool(run_key)
    shard = run.Shard(shard_name, [PairRequest.from_dict(r) for r in requests])
    stats = run.process_shard(run.RunConfig(**config), model_ids, shard, lambda reqs: engine.run_pairs(pool, reqs),
                              fingerprint=fingerprint)
    logger.info(f"shard {shard_name}: {stats['pairs_done']}/{stats['pairs']} pairs, {stats['kept']} kept of "
                f"{stats['candidates']} candidates in {stats['seconds']:.1f} s on actor pair {stats['actor_pair']}")
    for failure in stats["failed"]:
        logger.warning(f"shard {shard_name}: pair {failure['pair_id']} (row {failure['row']}) failed: {failure['error']}")
    return stats


def _artifact_key(name: str, suffix: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return f"{cleaned[:40] or 'run'}-{suffix}"


@flow(name="generate-dataset", flow_run_name=_flow_run_name, persist_result=False, log_prints=False)
def generate_dataset(manifest: str, out: str, models: str = "sd15-auffusion", candidates: int = 8, keep: int = 1,
                     steps: int = 100, seed: int = 0, shard_size: int = 4, actors: int | None = None,
                     ray_address: str | None = None, overwrite: bool = False, ranking: str = "reference",
                     top_fraction: float = 0.2, micro_batch: int = 8, device: str = "auto", dtype: str = "auto",
                     vocoder: str = "hifigan", crop_columns: int = 32,
                     allow_guides: list[str] | None = None) -> dict[str, Any]:
    """Turn a manifest of prompt pairs into a curated dataset of images that sound at `out`."""
    logger = get_run_logger()
    config = run.RunConfig(manifest=manifest, out=out, models=models, num_candidates=candidates, keep=keep,
                           steps=steps, seed=seed, shard_size=shard_size, actors=actors, ray_address=ray_address,
                           overwrite=overwrite, ranking=ranking, top_fraction=top_fraction, micro_batch=micro_batch,
                           device=device, dtype=dtype, vocoder=vocoder, crop_columns=crop_columns,
                           allow_guides=list(allow_guides or []))  # issue 11: guides from trusted places
    t_start = time.perf_counter()

    # 1. Load and validate; bad rows go to rejected.parquet; plan shards; skip those already committed.
    plan = run.prepare(config, log=logger.info,
                       holder=f"flow run {flow_run.name or ''} ({flow_run.id or 'no id'}) of {manifest}")
    for rejection in plan.validated.rejections:
        logger.warning(f"rejected {rejection}")
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

    # 2. One task per shard on Ray actors created once for the run; as many shards in flight as actor pairs.
    run_key = str(flow_run.id or id(plan))
    started_ray, pool, actor_infos, errors = False, None, [], []
    if plan.todo:
        started_ray = engine.connect_ray(config.ray_address)
        logger.info(engine.describe_cluster(started_ray))
        try:
            pool = engine.start_actors(engine.EngineConfig(
                models=models, device=device, dtype=dtype, vocoder=vocoder, micro_batch=micro_batch,
                ranking=dataclasses.asdict(plan.config.rule())), actors, logger.info)
            actor_infos = pool.infos()
            engine.register_pool(run_key, pool)
            pending = list(plan.todo)
            running: dict[concurrent.futures.Future, Any] = {}
            while pending or running:
                while pending and len(running) < len(pool):
                    shard = pending.pop(0)
                    future = generate_shard.submit(run_key, config.to_dict(), plan.model_ids, shard.name,
                                                   [r.to_dict() for r in shard.requests],
                                                   run.fingerprint_digest(plan.fingerprint))
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
        finally:
            engine.unregister_pool(run_key)
            engine.stop_actors(pool)
            if started_ray:
                import ray

                ray.shutdown()

    # 3. Finalize: run.json, dataset card, artifacts.
    elapsed = time.perf_counter() - t_start
    summary = run.finalize(plan, actors=actor_infos, extra={"flow_run_id": str(flow_run.id) if flow_run.id else None,
                                                            "seconds": round(elapsed, 2)})
    counts = summary["counts"]
    kept_rows = summary.pop("kept_rows")
    create_table_artifact(
        key=_artifact_key(plan.name, "kept"), description=f"kept candidates of {manifest}",
        table=[{"pair_id": r["pair_id"], "image_prompt": r["image_prompt"], "audio_prompt": r["audio_prompt"],
                "candidate": r["candidate_index"], "seed": r["seed"], "rank": r["rank"],
                "clip_score": round(r["clip_score"], 4), "clap_score": round(r["clap_score"], 4)} for r in kept_rows]
        or [{"pair_id": "(none kept)"}])
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
        f"| shards | {counts['shards_committed']}/{counts['shards']} committed, {counts['shards_resumed']} resumed |",
        f"| time | {elapsed:.1f} s ({generated / elapsed if elapsed else 0:.2f} candidates/s this run) |",
        f"| actors | {len(actor_infos)} ({', '.join(sorted({a['device'] for a in actor_infos})) or 'none needed'}) |",
        "", *[f"- rejected {r}" for r in plan.validated.rejections[:50]],
        *[f"- failed pair {f['pair_id']}: {f['error']}" for f in summary["failed"][:50]],
        *[f"- {e}" for e in errors],
    ]))
    logger.info(f"dataset at {out}: {counts['pairs_done']} pairs kept, {counts['pairs_failed']} failed, "
                f"{counts['rejected']} rejected")
    summary["errors"] = errors
    if errors:
        raise RuntimeError(f"{len(errors)} shard(s) failed; what was committed is kept, re-run to resume: "
                           + "; ".join(errors))
    return summary
