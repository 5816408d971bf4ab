"""One batch run, in pieces the Prefect flow calls: prepare (validate, reject, plan, resume), process a shard
(generate, rank, write, commit), finalize (run.json, dataset card, summary).

Nothing here imports Prefect; the flow in `flows/` only orchestrates these calls.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from pws_batch import __version__
from pws_batch.batch.config import RunConfig, RunError
from pws_batch.batch.dataset import (MODEL_COMPONENTS, Output, candidates_table, committed_shards, dataset_card,
                                     kept_table, shard_name)
from pws_batch.batch.manifest import (Validated, manifest_fingerprint, manifest_name, read_manifest,
                                      rejections_table, validate_manifest)
from pws_batch.batch.pair import PairRequest, PairResult


@dataclass
class Shard:
    name: str
    requests: list[PairRequest]

    @property
    def pair_ids(self) -> list[str]:
        return [r.pair_id for r in self.requests]


@dataclass
class RunPlan:
    manifest: str
    out: str
    config: RunConfig
    validated: Validated
    shards: list[Shard]
    done: dict[str, dict]  # committed shards (skipped on resume), by name
    fingerprint: dict[str, Any]
    model_ids: dict[str, str]
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    shard_size: int | None = None  # pairs per shard (--shard-size, or chosen when auto)

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.name not in self.done]

    @property
    def name(self) -> str:
        return manifest_name(self.manifest)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"pws-batch": __version__, "python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "ray", "prefect", "pyarrow", "pandas", "fsspec", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def scheduler_config_for(models: str) -> tuple[dict, dict[str, str]]:
    """The image model's scheduler config for schedule checks (SD 1.5's when the model is not local), and the
    model ids (builds `tiny` if needed)."""
    from pws_batch.core.models import load_scheduler_config, resolve_model_set

    model_set = resolve_model_set(models)
    return load_scheduler_config(model_set.image, fallback=True), model_set.ids()


def validate(manifest: str, config: RunConfig, check_files: bool = True) -> tuple[Validated, dict[str, str]]:
    scheduler_config, model_ids = scheduler_config_for(config.engine.models)
    df = read_manifest(manifest)
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    return validate_manifest(df, config.defaults, scheduler_config, check_files=check_files, base=base), model_ids


SHARDS_PER_ACTOR = 4  # few enough Prefect tasks and commits; enough that no actor waits long at the end
MAX_AUTO_SHARD = 256  # a failed shard redoes at most this many pairs


def auto_shard_size(pairs: int, actors: int) -> int:
    """`--shard-size` auto: about SHARDS_PER_ACTOR shards per actor, 1 to MAX_AUTO_SHARD pairs each, so the number
    of Prefect tasks grows with the cluster, not with the manifest (100,000 pairs on 64 actors: 391 shards of 256)."""
    return max(1, min(MAX_AUTO_SHARD, -(-pairs // (SHARDS_PER_ACTOR * max(1, actors)))))


def plan_shards(requests: list[PairRequest], shard_size: int) -> list[Shard]:
    """Deterministic shards: manifest order, `shard_size` pairs each, named 00000, 00001, ..."""
    return [Shard(shard_name(i // shard_size), requests[i:i + shard_size]) for i in range(0, len(requests), shard_size)]


def check_output(manifest: str, out: str, config: RunConfig) -> dict[str, Any]:
    """Refuse to resume into an output made from another manifest or other settings (unless --overwrite).

    Returns the run's fingerprint: the manifest's sha256 and every config field that changes the dataset.
    """
    output = Output(out)
    fingerprint = {"manifest_sha256": manifest_fingerprint(manifest), **config.fingerprint()}
    if config.plan.overwrite:
        return fingerprint
    if output.exists("run.json"):
        previous = output.read_json("run.json").get("fingerprint", {})
        differs = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if differs:
            raise RunError(f"{out} already holds a dataset made from another manifest or with other settings "
                           f"(different: {', '.join(differs)}); pass --overwrite to replace it, or choose another --out")
    elif output.list("_shards"):
        raise RunError(f"{out} holds shards but no run.json; pass --overwrite to replace them, "
                       f"or choose another --out")
    return fingerprint


def prepare(manifest: str, out: str, config: RunConfig, log: Callable[[str], None] = print,
            actors: Callable[[], int] | None = None) -> RunPlan:
    """Validate the manifest, write rejected.parquet, plan the shards and find those already committed.

    `actors()` says how many actors the run has, for `--shard-size` auto (called only then; default: 1).
    """
    config.check()
    output = Output(out)
    fingerprint = check_output(manifest, out, config)
    validated, model_ids = validate(manifest, config)
    shard_size = config.plan.shard_size
    if shard_size is None and not config.plan.overwrite and output.exists("run.json"):
        shard_size = output.read_json("run.json").get("shard_size")  # a resumed run keeps its shards
    if shard_size is None:
        shard_size = auto_shard_size(len(validated.requests), actors() if actors else 1)
    if config.plan.overwrite:
        output.clear()
    shards = plan_shards(validated.requests, shard_size)
    planned = {s.name: s.pair_ids for s in shards}
    done = {name: stats for name, stats in committed_shards(output).items() if stats.get("pair_ids") == planned.get(name)}
    output.write_table("rejected.parquet", rejections_table(validated.rejections))
    plan = RunPlan(manifest, out, config, validated, shards, done, fingerprint, model_ids, shard_size=shard_size)
    write_run_json(plan, status="running")
    for w in validated.warnings:
        log(f"manifest: {w}")
    log(f"manifest {manifest}: {validated.num_rows} rows, {len(validated.requests)} good, "
        f"{len(validated.rejections)} rejected; {len(shards)} shards of up to {shard_size} pairs"
        f"{'' if config.plan.shard_size else ' (auto)'}, "
        f"{len(done)} already committed in {out}")
    return plan


def write_run_json(plan: RunPlan, status: str, counts: dict | None = None, actors: list | None = None,
                   extra: dict | None = None) -> None:
    Output(plan.out).write_json("run.json", {
        "status": status,
        "name": plan.name,
        "manifest": plan.manifest,
        "out": plan.out,
        "config": plan.config.to_dict(),
        "fingerprint": plan.fingerprint,
        "models": plan.model_ids,
        "versions": versions(),
        "shards": {s.name: s.pair_ids for s in plan.shards},
        "shard_size": plan.shard_size,
        "started_at": plan.started_at,
        "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": counts or {},
        "actors": actors or [],
        **(extra or {}),
    })


# ---------------------------------------------------------------------------------------------- a shard
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def kept_rows(result: PairResult, shard: str, model_ids: dict[str, str]) -> list[dict[str, Any]]:
    """One data row per kept candidate: media, scores, every generation parameter, models, timings, extras."""
    request = result.request
    params = dataclasses.asdict(request.params)
    base_seed = params.pop("seed")
    rows = []
    for c in result.kept:
        stem = f"{_safe(request.pair_id)}-{c.candidate_index:03d}"
        rows.append({
            "pair_id": request.pair_id,
            "image": {"bytes": c.image_png, "path": stem + ".png"},
            "audio": {"bytes": c.audio_wav, "path": stem + ".wav"},
            "candidate_index": c.candidate_index, "seed": c.seed, "rank": c.rank,
            "clip_score": c.clip_score, "clap_score": c.clap_score,
            "effective_image_prompt": request.params.effective_image_prompt,
            **params, "base_seed": base_seed, "keep": request.keep,
            "target_clip": request.target_clip, "target_clap": request.target_clap,
            "candidates_used": len(result.candidates),
            **{f"model_{c}": model_ids.get(c) for c in MODEL_COMPONENTS},
            "generate_s": result.generate_s, "rank_s": result.rank_s, "unet_evals": result.unet_evals,
            "shard": shard, "manifest_row": request.row,
            **request.extra,
        })
    return rows


def candidate_rows(result: PairResult) -> list[dict[str, Any]]:
    """The candidates sidecar's rows: every candidate made, with its seed, scores, rank and kept flag (no media),
    and how many candidates its pair used (fewer than num_candidates when the adaptive budget stopped it)."""
    used = len(result.candidates)
    return [{"pair_id": result.pair_id, "candidate_index": c.candidate_index, "seed": c.seed,
             "clip_score": c.clip_score, "clap_score": c.clap_score, "rank": c.rank, "kept": c.kept,
             "candidates_used": used}
            for c in result.candidates]


def process_shard(out: str, model_ids: dict[str, str], shard: Shard,
                  run_pairs: Callable[[list[PairRequest]], tuple[list[PairResult], dict]]) -> dict:
    """Generate and rank a shard's pairs, write its parts, and commit it by writing its stats LAST."""
    output = Output(out)
    t0 = time.perf_counter()
    results, where = run_pairs(shard.requests)
    rows, scores, failed = [], [], []
    for result in results:
        if not result.ok:
            failed.append({"pair_id": result.pair_id, "row": result.request.row, "error": result.error})
            continue
        rows.extend(kept_rows(result, shard.name, model_ids))
        scores.extend(candidate_rows(result))
    if rows:
        output.write_table(f"data/part-{shard.name}.parquet", kept_table(rows))
    elif output.exists(f"data/part-{shard.name}.parquet"):
        output.fs.rm(output.path(f"data/part-{shard.name}.parquet"))  # a stale part of an earlier attempt
    output.write_table(f"candidates/part-{shard.name}.parquet", candidates_table(scores))
    stats = {
        "shard": shard.name, "pair_ids": shard.pair_ids, "pairs": len(shard.requests),
        "pairs_done": len(shard.requests) - len(failed), "pairs_failed": len(failed), "failed": failed,
        "candidates": len(scores), "kept": len(rows), "seconds": round(time.perf_counter() - t0, 3),
        "unet_evals": sum(r.unet_evals for r in results if r.ok),
        "pairs_stopped_early": sum(r.stopped_early for r in results),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **where,
    }
    output.write_json(f"_shards/{shard.name}.json", stats)  # the commit marker: written last
    return stats


# ---------------------------------------------------------------------------------------------- the end
def read_kept(out: Output, columns: list[str] | None = None) -> pa.Table | None:
    """The kept rows of every data part (only `columns`, when given: the media need not be read)."""
    parts = [p for p in out.list("data") if p.endswith(".parquet")]
    if not parts:
        return None
    tables = [out.read_table(f"data/{p}", columns=columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def finalize(plan: RunPlan, actors: list | None = None, extra: dict | None = None) -> dict[str, Any]:
    """Counts from the committed shards' stats, run.json, and the dataset card. Returns the summary."""
    out = Output(plan.out)
    stats = {name: s for name, s in committed_shards(out).items() if name in {sh.name for sh in plan.shards}}
    counts = {
        "rows": plan.validated.num_rows, "good": len(plan.validated.requests),
        "rejected": len(plan.validated.rejections), "shards": len(plan.shards), "shards_committed": len(stats),
        "shards_resumed": len(plan.done), "pairs_done": sum(s["pairs_done"] for s in stats.values()),
        "pairs_failed": sum(s["pairs_failed"] for s in stats.values()),
        "pairs_missing": sum(len(s.requests) for s in plan.shards if s.name not in stats),
        "candidates": sum(s["candidates"] for s in stats.values()), "kept": sum(s["kept"] for s in stats.values()),
        "unet_evals": sum(s.get("unet_evals", 0) for s in stats.values()),
        "pairs_stopped_early": sum(s.get("pairs_stopped_early", 0) for s in stats.values()),
    }
    counts["unet_evals_per_kept_pair"] = round(counts["unet_evals"] / counts["pairs_done"], 1) \
        if counts["pairs_done"] else None
    complete = counts["shards_committed"] == counts["shards"]
    write_run_json(plan, "complete" if complete else "incomplete", counts, actors, extra)
    # Only the columns the card and the summary need, never the media: memory stays small at 100k pairs.
    scores = read_kept(out, columns=["clip_score", "clap_score"])
    kept = scores.to_pylist() if scores is not None else []
    out.write_bytes("README.md", dataset_card(plan.name, out.read_json("run.json"), kept).encode())
    del kept, scores
    failed = [f for s in stats.values() for f in s.get("failed", [])]
    return {"out": plan.out, "name": plan.name, "complete": complete, "counts": counts, "failed": failed[:TOP_K],
            "failed_total": len(failed), "kept_rows": top_kept(out)}


TOP_K = 50  # rows of the kept table shown in the flow's artifact (the dataset holds them all)
TOP_COLUMNS = ["pair_id", "image_prompt", "audio_prompt", "candidate_index", "seed", "rank", "clip_score",
               "clap_score"]


def top_kept(out: Output, k: int = TOP_K) -> list[dict[str, Any]]:
    """The `k` kept rows with the best CLIP + CLAP, read without their media."""
    import pyarrow.compute as pc

    table = read_kept(out, columns=TOP_COLUMNS)
    if table is None or table.num_rows == 0:
        return []
    total = pc.add(pc.fill_null(table["clip_score"], 0.0), pc.fill_null(table["clap_score"], 0.0))
    order = pc.sort_indices(pa.table({"total": total}), sort_keys=[("total", "descending")])[:k]
    return table.take(order).to_pylist()
