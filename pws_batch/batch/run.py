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
from pws_batch.batch.card import CARD_COLUMNS, write_card
from pws_batch.batch.dataset import Output, candidates_table, committed_shards, kept_table, shard_name
from pws_batch.batch.manifest import (PairRequest, RunDefaults, Validated, manifest_fingerprint, read_manifest,
                                rejections_table, validate_manifest)
from pws_batch.core.params import GenerationParams
from pws_batch.batch.ranking import RankingRule
from pws_batch.batch.schema import build_features, features_from_json, schema_of


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
    audio_format: str = "wav"  # how the data parts store the sounds: wav or flac

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
        if self.audio_format not in AUDIO_FORMATS:
            raise RunError(f"--audio-format must be one of {', '.join(AUDIO_FORMATS)}, got {self.audio_format!r}")
        if self.actors is not None and self.actors < 1:
            raise RunError(f"--actors must be >= 1, got {self.actors}")
        try:
            self.rule()
        except ValueError as exc:
            raise RunError(f"ranking: {exc}") from exc


AUDIO_FORMATS = ("wav", "flac")
# What makes two runs produce the same dataset: a resumed run must agree on all of it.
PLAN_KEYS = ("models", "num_candidates", "keep", "steps", "seed", "crop_columns", "shard_size", "ranking",
             "top_fraction", "clip_weight", "clap_weight", "vocoder", "dtype", "audio_format")


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
    features: dict[str, Any] = field(default_factory=dict)  # the data parts' one schema, as datasets.Features
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

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


def validate(config: RunConfig, check_files: bool = True) -> tuple[Validated, dict[str, str]]:
    scheduler_config, model_ids = scheduler_config_for(config.models)
    df = read_manifest(config.manifest)
    base = config.manifest.rsplit("/", 1)[0] if "/" in config.manifest else "."
    return validate_manifest(df, config.defaults(), scheduler_config, check_files=check_files, base=base), model_ids


def plan_shards(requests: list[PairRequest], shard_size: int) -> list[Shard]:
    """Deterministic shards: manifest order, `shard_size` pairs each, named 00000, 00001, ..."""
    return [Shard(shard_name(i // shard_size), requests[i:i + shard_size]) for i in range(0, len(requests), shard_size)]


def check_output(config: RunConfig) -> dict[str, Any]:
    """Refuse to resume into an output made from another manifest or other settings (unless --overwrite).

    Returns the run's fingerprint: the manifest's sha256 and every setting that changes the dataset.
    """
    out = Output(config.out)
    fingerprint = {"manifest_sha256": manifest_fingerprint(config.manifest),
                   **{k: getattr(config, k) for k in PLAN_KEYS}}
    if config.overwrite:
        return fingerprint
    if out.exists("run.json"):
        previous = out.read_json("run.json").get("fingerprint", {})
        previous.setdefault("audio_format", "wav")  # made before --audio-format existed: WAV
        differs = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if differs:
            raise RunError(f"{config.out} already holds a dataset made from another manifest or with other settings "
                           f"(different: {', '.join(differs)}); pass --overwrite to replace it, or choose another --out")
    elif out.list("_shards"):
        raise RunError(f"{config.out} holds shards but no run.json; pass --overwrite to replace them, "
                       f"or choose another --out")
    return fingerprint


def prepare(config: RunConfig, log: Callable[[str], None] = print) -> RunPlan:
    """Validate the manifest, write rejected.parquet, plan the shards and find those already committed."""
    config.check()
    out = Output(config.out)
    fingerprint = check_output(config)
    validated, model_ids = validate(config)
    if config.overwrite:
        out.clear()
    shards = plan_shards(validated.requests, config.shard_size)
    planned = {s.name: s.pair_ids for s in shards}
    done = {name: stats for name, stats in committed_shards(out).items() if stats.get("pair_ids") == planned.get(name)}
    out.write_table("rejected.parquet", rejections_table(validated.rejections))
    features, schema_warnings = kept_features(validated.requests, model_ids)
    plan = RunPlan(config, validated, shards, done, fingerprint, model_ids, features.to_dict())
    write_run_json(plan, status="running")
    for w in [*validated.warnings, *schema_warnings]:
        log(f"manifest: {w}")
    log(f"manifest {config.manifest}: {validated.num_rows} rows, {len(validated.requests)} good, "
        f"{len(validated.rejections)} rejected; {len(shards)} shards of up to {config.shard_size} pairs, "
        f"{len(done)} already committed in {config.out}")
    return plan


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
        "features": plan.features,
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
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def flac_of(wav: bytes) -> bytes:
    """16-bit WAV bytes -> lossless FLAC bytes (about half the size)."""
    import io

    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def kept_rows(request: PairRequest, result: dict, shard: str, model_ids: dict[str, str],
              audio_format: str = "wav") -> list[dict[str, Any]]:
    params = request.params.to_dict()
    base_seed = params.pop("seed")
    rows = []
    for k in result["kept"]:
        stem = f"{_safe(request.pair_id)}-{k['candidate_index']:03d}"
        rows.append({
            "pair_id": request.pair_id,
            "image": {"bytes": k["image_png"], "path": stem + ".png"},
            "audio": {"bytes": k["audio_wav"], "path": stem + ".wav"} if audio_format == "wav" else
                     {"bytes": flac_of(k["audio_wav"]), "path": stem + ".flac"},
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


def kept_features(requests: list[PairRequest], model_ids: dict[str, str]):
    """The data parts' one schema (datasets.Features), decided from every good request before the first shard:
    the columns `kept_rows` writes, in its order, then the pass-through columns typed over the whole manifest.
    Returns (features, warnings naming the pass-through columns written as text)."""
    probe_request = PairRequest(0, "probe", GenerationParams("probe", "probe"), 1)
    probe_result = {"kept": [{"candidate_index": 0, "seed": 0, "rank": 1, "clip_score": 0.0, "clap_score": 0.0,
                              "image_png": b"", "audio_wav": b""}], "generate_s": 0.0, "rank_s": 0.0, "unet_evals": 0}
    names = kept_rows(probe_request, probe_result, "", model_ids)[0]
    known = {name: None if name in ("image", "audio") else KNOWN_TYPES[name] for name in names}
    return build_features(known, [r.extra for r in requests])


def run_schema(out: Output, requests: list[PairRequest], model_ids: dict[str, str]) -> pa.Schema:
    """The schema `prepare` decided and wrote to run.json; for a shard processed outside a run, this shard's."""
    if out.exists("run.json") and (features := out.read_json("run.json").get("features")):
        return schema_of(features_from_json(features))
    return schema_of(kept_features(requests, model_ids)[0])


def process_shard(config: RunConfig, model_ids: dict[str, str], shard: Shard, run_pairs: Callable,
                  schema: pa.Schema | None = None) -> dict:
    """Generate and rank a shard's pairs, write its parts (in the run's one schema: `schema`, else the one in
    run.json), and commit it by writing its stats LAST."""
    out = Output(config.out)
    schema = schema or run_schema(out, shard.requests, model_ids)
    t0 = time.perf_counter()
    results, where = run_pairs(shard.requests)
    rows, scores, failed = [], [], []
    for request, result in zip(shard.requests, results):
        if "error" in result:
            failed.append({"pair_id": request.pair_id, "row": request.row, "error": result["error"]})
            continue
        rows.extend(kept_rows(request, result, shard.name, model_ids, config.audio_format))
        scores.extend(result["scores"])
    if rows:
        out.write_table(f"data/part-{shard.name}.parquet", kept_table(rows, schema))
    elif out.exists(f"data/part-{shard.name}.parquet"):
        out.fs.rm(out.path(f"data/part-{shard.name}.parquet"))  # a stale part of an earlier attempt
    out.write_table(f"candidates/part-{shard.name}.parquet", candidates_table(scores))
    stats = {
        "shard": shard.name, "pair_ids": shard.pair_ids, "pairs": len(shard.requests),
        "pairs_done": len(shard.requests) - len(failed), "pairs_failed": len(failed), "failed": failed,
        "candidates": len(scores), "kept": len(rows), "seconds": round(time.perf_counter() - t0, 3),
        "unet_evals": sum(r.get("unet_evals", 0) for r in results if "error" not in r),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **where,
    }
    out.write_json(f"_shards/{shard.name}.json", stats)  # the commit marker: written last
    return stats


# ---------------------------------------------------------------------------------------------- the end
def read_kept(out: Output, columns: list[str] | None = None) -> pa.Table | None:
    """The kept rows of every data part; with `columns`, only those columns are read (no media blobs)."""
    parts = [p for p in out.list("data") if p.endswith(".parquet")]
    if not parts:
        return None
    tables = [out.read_table(f"data/{p}", columns) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def finalize(plan: RunPlan, actors: list | None = None, extra: dict | None = None) -> dict[str, Any]:
    """Counts from the committed shards' stats, run.json, and the dataset card. Returns the summary."""
    out = Output(plan.config.out)
    stats = {name: s for name, s in committed_shards(out).items() if name in {sh.name for sh in plan.shards}}
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
    table = read_kept(out, CARD_COLUMNS)
    kept = table.to_pylist() if table else []
    write_card(out, plan.name, out.read_json("run.json"), kept)
    failed = [f for s in stats.values() for f in s.get("failed", [])]
    return {"out": plan.config.out, "name": plan.name, "complete": complete, "counts": counts, "failed": failed,
            "kept_rows": kept}
