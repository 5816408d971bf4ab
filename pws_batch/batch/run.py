"""One batch run, in pieces the Prefect flow calls: prepare (validate, reject, plan, resume), process a shard
(generate, rank, write, commit), finalize (run.json, dataset card, summary).

Nothing here imports Prefect; the flow in `flows/` only orchestrates these calls.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from pws_batch import __version__
from pws_batch.batch import lease
from pws_batch.batch.dataset import (DatasetError, Output, candidates_table, committed_shards, dataset_card,
                               kept_table, read_run_json, shard_name, verify_shard)
from pws_batch.batch.manifest import (PairRequest, RunDefaults, Validated, guide_allowed, guide_columns,
                                manifest_fingerprint, read_manifest, rejections_table, validate_manifest)
from pws_batch.core.params import GenerationParams
from pws_batch.batch.ranking import RankingRule


class RunError(ValueError):
    """A run that cannot start: says why and what to do."""


@dataclass
class RunConfig:
    manifest: str
    out: str
    models: str = "sd15-auffusion"
    num_candidates: int = 8
    keep: int = 1
    steps: int = 100
    seed: int = 0
    crop_columns: int = 32
    shard_size: int = 4
    actors: int | None = None
    ray_address: str | None = None
    overwrite: bool = False
    ranking: str = "reference"
    top_fraction: float = 0.2
    clip_weight: float = 0.5
    clap_weight: float = 0.5
    micro_batch: int = 8
    device: str = "auto"
    dtype: str = "auto"
    vocoder: str = "hifigan"
    # --- issue 11 (faults): where guide files may come from, besides the manifest's own storage.
    # "local" = any local path, "any" = anywhere, else a path or URI prefix (e.g. s3://bucket/guides/).
    allow_guides: list[str] = field(default_factory=list)
    # --- end issue 11

    def defaults(self) -> RunDefaults:
        return RunDefaults(num_candidates=self.num_candidates, keep=self.keep, steps=self.steps, seed=self.seed,
                           crop_columns=self.crop_columns)

    def rule(self) -> RankingRule:
        return RankingRule(self.ranking, self.top_fraction, self.clip_weight, self.clap_weight)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        for name in ("num_candidates", "keep", "steps", "shard_size", "micro_batch"):
            if getattr(self, name) < 1:
                raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.actors is not None and self.actors < 1:
            raise RunError(f"--actors must be >= 1, got {self.actors}")
        try:
            self.rule()
        except ValueError as exc:
            raise RunError(f"ranking: {exc}") from exc


# What makes two runs produce the same dataset: a resumed run must agree on all of it.
PLAN_KEYS = ("models", "num_candidates", "keep", "steps", "seed", "crop_columns", "shard_size", "ranking",
             "top_fraction", "clip_weight", "clap_weight", "vocoder", "dtype")


@dataclass
class Shard:
    name: str
    requests: list[PairRequest]

    @property
    def pair_ids(self) -> list[str]:
        return [r.pair_id for r in self.requests]


@dataclass
class RunPlan:
    config: RunConfig
    validated: Validated
    shards: list[Shard]
    done: dict[str, dict]  # committed shards (skipped on resume), by name
    fingerprint: dict[str, Any]
    model_ids: dict[str, str]
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    lease: Any = field(default=None, repr=False)  # the output's lease (pws_batch.batch.lease), held until finalize

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.name not in self.done]

    @property
    def name(self) -> str:
        stem = re.sub(r"\.(parquet|csv|jsonl|ndjson|json)(\.gz)?$", "", self.config.manifest.rstrip("/").rsplit("/", 1)[-1])
        return stem or "manifest"


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


def manifest_base(manifest: str) -> str:
    return manifest.rsplit("/", 1)[0] if "/" in manifest else "."


def validate(config: RunConfig, check_files: bool = True) -> tuple[Validated, dict[str, str]]:
    scheduler_config, model_ids = scheduler_config_for(config.models)
    df = read_manifest(config.manifest)
    return validate_manifest(df, config.defaults(), scheduler_config, check_files=check_files,
                             base=manifest_base(config.manifest), manifest=config.manifest,
                             allow_guides=config.allow_guides), model_ids


def guides_fingerprint(config: RunConfig, df=None) -> str:
    """sha256 over the content of every guide file the manifest names (those it may read): a resume must
    start from the same guides, not just the same paths."""
    import fsspec

    df = read_manifest(config.manifest) if df is None else df
    digest = hashlib.sha256()
    for path in guide_columns(df, manifest_base(config.manifest)):
        digest.update(path.encode() + b"\0")
        if not guide_allowed(path, config.manifest, config.allow_guides):
            digest.update(b"not allowed\0")
            continue
        try:
            with fsspec.open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        except Exception:  # noqa: BLE001 - an unreadable guide: its row is rejected by validation
            digest.update(b"unreadable\0")
    return digest.hexdigest()


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short digest of a run's fingerprint, recorded in every shard marker it commits."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_shards(requests: list[PairRequest], shard_size: int) -> list[Shard]:
    """Deterministic shards: manifest order, `shard_size` pairs each, named 00000, 00001, ..."""
    return [Shard(shard_name(i // shard_size), requests[i:i + shard_size]) for i in range(0, len(requests), shard_size)]


def check_output(config: RunConfig) -> dict[str, Any]:
    """Refuse to resume into an output made from another manifest or other settings (unless --overwrite).

    Returns the run's fingerprint: the manifest's sha256 and every setting that changes the dataset.
    """
    out = Output(config.out)
    fingerprint = {"manifest_sha256": manifest_fingerprint(config.manifest), "guides_sha256": guides_fingerprint(config),
                   **{k: getattr(config, k) for k in PLAN_KEYS}}
    if config.overwrite:
        return fingerprint
    try:
        run_json = read_run_json(out)
    except DatasetError:
        run_json = None  # cut off mid-write: the shard markers say which run made them (below)
    if run_json is not None:
        previous = run_json.get("fingerprint", {})
        differs = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if differs:
            raise RunError(f"{config.out} already holds a dataset made from another manifest or with other settings "
                           f"(different: {', '.join(differs)}); pass --overwrite to replace it, or choose another --out")
    elif out.list("_shards"):
        digest = fingerprint_digest(fingerprint)
        foreign = sorted(n for n, stats in committed_shards(out).items() if stats.get("fingerprint") != digest)
        if foreign:
            raise RunError(f"{config.out} holds shards ({', '.join(foreign[:5])}) but no readable run.json, and they "
                           f"were not made from this manifest with these settings; pass --overwrite to replace them, "
                           f"or choose another --out")
    return fingerprint


def prepare(config: RunConfig, log: Callable[[str], None] = print, holder: str | None = None) -> RunPlan:
    """Take the lease on the output, validate the manifest, write rejected.parquet, plan the shards and find
    those already committed (verified against their markers). `finalize` gives the lease back."""
    config.check()
    try:
        held = lease.acquire(config.out, holder or f"pws-batch run of {config.manifest}", log)
    except lease.LeaseError as exc:
        raise RunError(str(exc)) from exc
    try:
        plan = _prepare(config, log)
    except BaseException:
        held.release()
        raise
    plan.lease = held
    return plan


def _prepare(config: RunConfig, log: Callable[[str], None]) -> RunPlan:
    out = Output(config.out)
    fingerprint = check_output(config)
    validated, model_ids = validate(config)
    if config.overwrite:
        out.clear()
    if not validated.requests:
        raise RunError(no_good_rows(config.manifest, validated))
    shards = plan_shards(validated.requests, config.shard_size)
    planned = {s.name: s.pair_ids for s in shards}
    done = {}
    for name, stats in committed_shards(out).items():
        if stats.get("pair_ids") != planned.get(name):
            continue
        problem = verify_shard(out, stats)
        if problem:  # a part cut off or changed after its commit: the shard is made again
            log(f"shard {name}: {problem}; regenerating it")
            out.fs.rm(out.path(f"_shards/{name}.json"))
            continue
        done[name] = stats
    out.write_table("rejected.parquet", rejections_table(validated.rejections))
    plan = RunPlan(config, validated, shards, done, fingerprint, model_ids)
    write_run_json(plan, status="running")
    for w in validated.warnings:
        log(f"manifest: {w}")
    log(f"manifest {config.manifest}: {validated.num_rows} rows, {len(validated.requests)} good, "
        f"{len(validated.rejections)} rejected; {len(shards)} shards of up to {config.shard_size} pairs, "
        f"{len(done)} already committed in {config.out}")
    return plan


def no_good_rows(manifest: str, validated: Validated) -> str:
    if not validated.num_rows:
        return f"{manifest} has no rows; nothing to generate (see manifests/README.md for the columns)"
    return (f"{manifest} has no good row ({validated.num_rows} rows, all rejected); nothing to generate. "
            f"See `pws-batch validate {manifest}`")


def write_run_json(plan: RunPlan, status: str, counts: dict | None = None, actors: list | None = None,
                   extra: dict | None = None) -> None:
    Output(plan.config.out).write_json("run.json", {
        "status": status,
        "name": plan.name,
        "manifest": plan.config.manifest,
        "config": {**plan.config.to_dict(), "ranking": dataclasses.asdict(plan.config.rule())},
        "fingerprint": plan.fingerprint,
        "models": plan.model_ids,
        "versions": versions(),
        "shards": {s.name: s.pair_ids for s in plan.shards},
        "started_at": plan.started_at,
        "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "counts": counts or {},
        "actors": actors or [],
        **(extra or {}),
    })


# ---------------------------------------------------------------------------------------------- a shard
KNOWN_TYPES: dict[str, pa.DataType] = {
    "pair_id": pa.string(), "candidate_index": pa.int64(), "seed": pa.int64(), "rank": pa.int64(),
    "clip_score": pa.float64(), "clap_score": pa.float64(), "keep": pa.int64(),
    "effective_image_prompt": pa.string(), "base_seed": pa.int64(), "generate_s": pa.float64(),
    "rank_s": pa.float64(), "unet_evals": pa.int64(), "shard": pa.string(), "manifest_row": pa.int64(),
    **{f"model_{c}": pa.string() for c in ("image", "audio", "vocoder", "clip", "clap")},
}
for _f in dataclasses.fields(GenerationParams):
    if _f.name != "seed":
        KNOWN_TYPES[_f.name] = {"str": pa.string(), "str | None": pa.string(), "float": pa.float64(),
                                "int": pa.int64(), "bool": pa.bool_()}[str(_f.type)]


def _safe(name: str) -> str:
    """A file-name stem for a pair_id, unique per pair_id: an id that has to be changed to be a safe name
    (`a/b`) gets a digest of the original after a "+" that no unchanged id contains, so it never meets
    another id's name (`a_b`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]
    if safe == name:
        return safe
    return f"{safe}+{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def kept_rows(request: PairRequest, result: dict, shard: str, model_ids: dict[str, str]) -> list[dict[str, Any]]:
    params = request.params.to_dict()
    base_seed = params.pop("seed")
    rows = []
    for k in result["kept"]:
        stem = f"{_safe(request.pair_id)}-{k['candidate_index']:03d}"
        rows.append({
            "pair_id": request.pair_id,
            "image": {"bytes": k["image_png"], "path": stem + ".png"},
            "audio": {"bytes": k["audio_wav"], "path": stem + ".wav"},
            "candidate_index": k["candidate_index"], "seed": k["seed"], "rank": k["rank"],
            "clip_score": k["clip_score"], "clap_score": k["clap_score"],
            "effective_image_prompt": request.params.effective_image_prompt,
            **params, "base_seed": base_seed, "keep": request.keep,
            **{f"model_{c}": v for c, v in model_ids.items()},
            "generate_s": result["generate_s"], "rank_s": result["rank_s"], "unet_evals": result["unet_evals"],
            "shard": shard, "manifest_row": request.row,
            **request.extra,
        })
    return rows


def process_shard(config: RunConfig, model_ids: dict[str, str], shard: Shard, run_pairs: Callable,
                  fingerprint: str | None = None) -> dict:
    """Generate and rank a shard's pairs, write its parts, and commit it by writing its stats LAST.

    The stats (the marker) record each part's size, row count and sha256, and the run's fingerprint digest,
    so that a resume can verify what it skips."""
    out = Output(config.out)
    t0 = time.perf_counter()
    results, where = run_pairs(shard.requests)
    rows, scores, failed = [], [], []
    for request, result in zip(shard.requests, results):
        if "error" in result:
            failed.append({"pair_id": request.pair_id, "row": request.row, "error": result["error"]})
            continue
        rows.extend(kept_rows(request, result, shard.name, model_ids))
        scores.extend(result["scores"])
    parts = {}
    data_part, candidates_part = f"data/part-{shard.name}.parquet", f"candidates/part-{shard.name}.parquet"
    if rows:
        parts[data_part] = out.write_table(data_part, kept_table(rows, KNOWN_TYPES))
    elif out.exists(data_part):
        out.fs.rm(out.path(data_part))  # a stale part of an earlier attempt
    parts[candidates_part] = out.write_table(candidates_part, candidates_table(scores))
    stats = {
        "shard": shard.name, "pair_ids": shard.pair_ids, "pairs": len(shard.requests),
        "pairs_done": len(shard.requests) - len(failed), "pairs_failed": len(failed), "failed": failed,
        "candidates": len(scores), "kept": len(rows), "seconds": round(time.perf_counter() - t0, 3),
        "unet_evals": sum(r.get("unet_evals", 0) for r in results if "error" not in r),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **where,
        "parts": parts, "fingerprint": fingerprint,
    }
    out.write_json(f"_shards/{shard.name}.json", stats)  # the commit marker: written last
    return stats


# ---------------------------------------------------------------------------------------------- the end
def read_kept(out: Output, shards: list[str] | None = None) -> pa.Table | None:
    """The kept rows of the data parts (of `shards` only, when given)."""
    parts = [p for p in out.list("data") if p.endswith(".parquet")]
    if shards is not None:
        parts = [p for p in parts if p[len("part-"):-len(".parquet")] in shards]
    if not parts:
        return None
    tables = [out.read_table(f"data/{p}") for p in parts]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def finalize(plan: RunPlan, actors: list | None = None, extra: dict | None = None) -> dict[str, Any]:
    """Counts from the committed shards' stats, run.json, and the dataset card. Returns the summary.

    If this fails, run.json says "failed" with the reason before the error goes on."""
    try:
        return _finalize(plan, actors, extra)
    except Exception as exc:
        reason = f"finalize failed: {type(exc).__name__}: {exc}"
        try:
            write_run_json(plan, "failed", actors=actors, extra={**(extra or {}), "error": reason})
        except Exception:  # noqa: BLE001 - the output itself cannot be written: the original error says why
            pass
        raise RunError(reason) from exc
    finally:
        if plan.lease is not None:
            plan.lease.release()


def _finalize(plan: RunPlan, actors: list | None, extra: dict | None) -> dict[str, Any]:
    out = Output(plan.config.out)
    stats = {}
    for name, s in committed_shards(out).items():
        if name not in {sh.name for sh in plan.shards}:
            continue
        if verify_shard(out, s) is None:  # a shard whose parts do not match is not counted: a re-run remakes it
            stats[name] = s
    counts = {
        "rows": plan.validated.num_rows, "good": len(plan.validated.requests),
        "rejected": len(plan.validated.rejections), "shards": len(plan.shards), "shards_committed": len(stats),
        "shards_resumed": len(plan.done), "pairs_done": sum(s["pairs_done"] for s in stats.values()),
        "pairs_failed": sum(s["pairs_failed"] for s in stats.values()),
        "pairs_missing": sum(len(s.requests) for s in plan.shards if s.name not in stats),
        "candidates": sum(s["candidates"] for s in stats.values()), "kept": sum(s["kept"] for s in stats.values()),
        "unet_evals": sum(s.get("unet_evals", 0) for s in stats.values()),
    }
    complete = counts["shards_committed"] == counts["shards"]
    write_run_json(plan, "complete" if complete else "incomplete", counts, actors, extra)
    table = read_kept(out, list(stats))
    kept = table.drop_columns([c for c in ("image", "audio") if c in table.column_names]).to_pylist() if table else []
    out.write_bytes("README.md", dataset_card(plan.name, out.read_json("run.json"), kept).encode())
    failed = [f for s in stats.values() for f in s.get("failed", [])]
    return {"out": plan.config.out, "name": plan.name, "complete": complete, "counts": counts, "failed": failed,
            "kept_rows": kept}
