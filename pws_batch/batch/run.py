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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from pws_batch import __version__
from pws_batch.batch import lease
from pws_batch.batch.card import CARD_COLUMNS, best, write_card
from pws_batch.batch.config import RunConfig, RunError
from pws_batch.batch.dataset import (KEPT_SCHEMA, MODEL_COMPONENTS, DatasetError, Output, candidates_table,
                                     committed_shards, kept_table, read_run_json, shard_name, verified_shards)
from pws_batch.batch.manifest import (Validated, guide_allowed, guide_columns, location, manifest_fingerprint,
                                      manifest_name, read_manifest, rejections_table, validate_manifest)
from pws_batch.batch.pair import PairRequest, PairResult
from pws_batch.batch.schema import MEDIA_COLUMNS, build_features, features_from_json, schema_of


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
    features: dict[str, Any] = field(default_factory=dict)  # the data parts' one schema, as datasets.Features
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    lease: Any = field(default=None, repr=False)  # the output's lease (pws_batch.batch.lease), held until finalize
    shard_size: int | None = None  # pairs per shard (--shard-size, or chosen when auto)

    @property
    def schema(self) -> pa.Schema:
        """The data parts' one Arrow schema (the one run.json records): every shard of the run writes it."""
        return schema_of(features_from_json(self.features))

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


def run_model_ids(model_ids: dict[str, str], config: RunConfig) -> dict[str, str]:
    """The model ids a run's rows record: the model set's, with `vocoder` naming what made the sound (with
    `--vocoder griffin-lim` no vocoder model is loaded, and `generate` needs that flag to make the same sound)."""
    if config.engine.vocoder == "griffin-lim":
        return {**model_ids, "vocoder": "griffin-lim"}
    return model_ids


def manifest_base(manifest: str) -> str:
    return manifest.rsplit("/", 1)[0] if "/" in manifest else "."


# `pws-batch run` checks the manifest before it creates a flow run (a manifest with nothing to make fails in
# seconds) and the flow's prepare checks it again in the same process: the second asks the same questions
# (validation, the manifest's and its guides' fingerprints). Within one command (`answers_reused`) they are
# answered from here while the manifest file is unchanged (same fsspec checksum: size and modification time);
# outside it, and in a later command of the same process, they are asked anew.
_ANSWERS: dict[tuple, Any] = {}
_MODELS_FOUND: set[tuple] = set()  # (models, vocoder) whose files check_models found, within one command
_REUSING = False


@contextmanager
def answers_reused() -> Iterator[None]:
    """Reuse the answers about a manifest for the duration of one command (the flow's threads included)."""
    global _REUSING
    _REUSING = True
    try:
        yield
    finally:
        _REUSING = False
        _ANSWERS.clear()
        _MODELS_FOUND.clear()


def _manifest_stamp(manifest: str) -> Any:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(manifest)
        return fs.checksum(path)
    except Exception:  # noqa: BLE001 - cannot tell: ask again
        return None


def _answer(manifest: str, question: tuple, make: Callable[[], Any]) -> Any:
    """`make()`, or its earlier answer for this manifest while the file is unchanged."""
    stamp = _manifest_stamp(manifest) if _REUSING else None
    if stamp is None:
        return make()
    if any(key[:2] != (manifest, stamp) for key in _ANSWERS):
        _ANSWERS.clear()
    key = (manifest, stamp, *question)
    if key not in _ANSWERS:
        _ANSWERS[key] = make()
    return _ANSWERS[key]


def validate(manifest: str, config: RunConfig, check_files: bool = True) -> tuple[Validated, dict[str, str]]:
    """The manifest's good requests and rejected rows under this config, and the model ids."""
    def make() -> tuple[Validated, dict[str, str]]:
        scheduler_config, model_ids = scheduler_config_for(config.engine.models)
        df = read_manifest(manifest)
        return validate_manifest(df, config.defaults, scheduler_config, check_files=check_files,
                                 base=manifest_base(manifest), manifest=manifest,
                                 allow_guides=config.plan.allow_guides), model_ids

    return _answer(manifest, ("validate", repr(config.defaults), config.engine.models,
                              tuple(config.plan.allow_guides or ()), check_files), make)


def check_models(config: RunConfig) -> None:
    """The run's model set is known and every file its actors will load is there (offline, no weights loaded);
    else RunError, one line."""
    from pws_batch.batch.engine import ACTOR_CLASSES
    from pws_batch.core.model_files import require_model_files
    from pws_batch.core.models import ModelSetError

    if ACTOR_CLASSES.get("generator_cls"):  # stand-in actors (`bench cluster`) load no models
        return
    key = (config.engine.models, config.engine.vocoder)
    if _REUSING and key in _MODELS_FOUND:  # `pws-batch run` checked them before starting the flow
        return
    try:
        require_model_files(*key)
    except ModelSetError as exc:  # an unknown model set, or files missing
        raise RunError(str(exc)) from exc
    if _REUSING:
        _MODELS_FOUND.add(key)


def guides_fingerprint(manifest: str, config: RunConfig, df=None) -> str:
    """sha256 over the content of every guide file the manifest names (those it may read): a resume must
    start from the same guides, not just the same paths."""
    import fsspec

    df = read_manifest(manifest) if df is None else df
    digest = hashlib.sha256()
    # guides beside the manifest are named from its folder, so that the same manifest spelled another way (a
    # relative path from elsewhere, an absolute one) resumes its run
    base_place, base = location(manifest_base(manifest))
    base = base.rstrip("/") + "/"
    for path in guide_columns(df, manifest_base(manifest)):
        place, normal = location(path)
        inside = place == base_place and normal.startswith(base)
        digest.update((normal[len(base):] if inside else path).encode() + b"\0")
        if not guide_allowed(path, manifest, config.plan.allow_guides):
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
    fingerprint = {"manifest_sha256": _answer(manifest, ("sha256",), lambda: manifest_fingerprint(manifest)),
                   "guides_sha256": _answer(manifest, ("guides", tuple(config.plan.allow_guides or ())),
                                            lambda: guides_fingerprint(manifest, config)),
                   **config.fingerprint()}
    foreign = foreign_entries(output)
    if foreign:
        raise RunError(f"{out} already holds files that no pws-batch run wrote ({', '.join(foreign[:5])}"
                       f"{', ...' if len(foreign) > 5 else ''}) and no run.json: the dataset would be written among "
                       f"them (and --overwrite would delete its data/, candidates/ and README.md). Choose a new or "
                       f"empty folder for --out")
    if config.plan.overwrite:
        return fingerprint
    try:
        run_json = read_run_json(output)
    except DatasetError:
        run_json = None  # cut off mid-write: the shard markers say which run made them (below)
    if run_json is not None:
        previous = run_json.get("fingerprint", {})
        differs = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if differs:
            raise RunError(f"{out} already holds a dataset made from another manifest or with other settings "
                           f"(different: {', '.join(differs)}); pass --overwrite to replace it, or choose another --out")
    elif output.list("_shards"):
        digest = fingerprint_digest(fingerprint)
        foreign = sorted(n for n, stats in committed_shards(output).items() if stats.get("fingerprint") != digest)
        if foreign:
            raise RunError(f"{out} holds shards ({', '.join(foreign[:5])}) but no readable run.json, and they "
                           f"were not made from this manifest with these settings; pass --overwrite to replace them, "
                           f"or choose another --out")
    return fingerprint


# What a run writes before its run.json (its lease, the rejected rows): an output holding only these is a run's
STARTED = {lease.LEASE, "rejected.parquet"}


def foreign_entries(output: Output) -> list[str]:
    """The entries of an existing output folder that is no pws-batch dataset (no run.json, no shard marker), but
    for what a run writes before its run.json; [] for a new or empty folder or a dataset."""
    if output.exists("run.json") or output.list("_shards"):
        return []
    return [name for name in output.list("") if name not in STARTED]


def may_have_work(out: str, config: RunConfig) -> bool:
    """False when `out` already holds a complete run (a resume with nothing to do starts no Ray)."""
    if config.plan.overwrite:
        return True
    try:
        return Output(out).read_json("run.json").get("status") != "complete"
    except Exception:  # noqa: BLE001 - no run.json (a new output) or unreadable: there is work
        return True


def prepare(manifest: str, out: str, config: RunConfig, log: Callable[[str], None] = print,
            holder: str | None = None, actors: Callable[[], int] | None = None) -> RunPlan:
    """Take the lease on the output, validate the manifest, write rejected.parquet, plan the shards and find
    those already committed (verified against their markers). `finalize` gives the lease back.

    `actors()` says how many actors the run has, for `--shard-size` auto (called only then; default: 1).
    """
    config.check()
    try:
        held = lease.acquire(out, holder or f"pws-batch run of {manifest}", log)
    except lease.LeaseError as exc:
        raise RunError(str(exc)) from exc
    except OSError as exc:  # the first write into OUT (a submitted run's checks ran on another machine)
        raise RunError(f"cannot write to --out {out} ({type(exc).__name__}: {exc}); choose a folder this flow's "
                       f"process can create and write (on a cluster: storage every worker shares, or s3://...)") \
            from exc
    try:
        plan = _prepare(manifest, out, config, log, actors)
    except BaseException:
        held.release()
        raise
    plan.lease = held
    return plan


def _prepare(manifest: str, out: str, config: RunConfig, log: Callable[[str], None],
             actors: Callable[[], int] | None) -> RunPlan:
    output = Output(out)
    fingerprint = check_output(manifest, out, config)
    validated, model_ids = validate(manifest, config)
    model_ids = run_model_ids(model_ids, config)
    check_models(config)  # before run.json says "running" and before Ray: a missing model is one line
    if not validated.requests:
        raise RunError(no_good_rows(manifest, validated))
    shard_size = config.plan.shard_size
    if shard_size is None and not config.plan.overwrite:
        try:
            shard_size = (read_run_json(output) or {}).get("shard_size")  # a resumed run keeps its shards
        except DatasetError:
            shard_size = None
    if shard_size is None:
        shard_size = auto_shard_size(len(validated.requests), actors() if actors else 1)
    if config.plan.overwrite:
        output.clear()
    shards = plan_shards(validated.requests, shard_size)
    planned = {s.name: s.pair_ids for s in shards}
    done, broken = verified_shards(output, lambda name, stats: stats.get("pair_ids") == planned.get(name))
    for name, problem in broken.items():  # a part cut off or changed after its commit: the shard is made again
        log(f"shard {name}: {problem}; regenerating it")
        output.fs.rm(output.path(f"_shards/{name}.json"))
    output.write_table("rejected.parquet", rejections_table(validated.rejections))
    features, schema_warnings = kept_features(validated.requests)
    plan = RunPlan(manifest, out, config, validated, shards, done, fingerprint, model_ids, features.to_dict(),
                   shard_size=shard_size)
    write_run_json(plan, status="running")
    for w in [*validated.warnings, *schema_warnings]:
        log(f"manifest: {w}")
    log(f"manifest {manifest}: {validated.num_rows} rows, {len(validated.requests)} good, "
        f"{len(validated.rejections)} rejected; {len(shards)} shards of up to {shard_size} pairs"
        f"{'' if config.plan.shard_size else ' (auto)'}, "
        f"{len(done)} already committed in {out}")
    return plan


def no_good_rows(manifest: str, validated: Validated) -> str:
    if not validated.num_rows:
        return f"{manifest} has no rows; nothing to generate (see manifests/README.md for the columns)"
    return (f"{manifest} has no good row ({validated.num_rows} rows, all rejected); nothing to generate. "
            f"See `pws-batch validate {manifest}`")


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
        "features": plan.features,
        **(extra or {}),
    })


# ---------------------------------------------------------------------------------------------- a shard
def _safe(name: str) -> str:
    """A file-name stem for a pair_id, unique per pair_id: an id that has to be changed to be a safe name
    (`a/b`) gets a digest of the original after a "+" that no unchanged id contains, so it never meets
    another id's name (`a_b`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]
    if safe == name:
        return safe
    return f"{safe}+{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def kept_rows(result: PairResult, shard: str, model_ids: dict[str, str], audio_format: str = "wav"
              ) -> list[dict[str, Any]]:
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
            "audio": {"bytes": c.audio_wav, "path": stem + ".wav"} if audio_format == "wav" else
                     {"bytes": flac_of(c.audio_wav), "path": stem + ".flac"},
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


def flac_of(wav: bytes) -> bytes:
    """16-bit WAV bytes -> lossless FLAC bytes (about half the size)."""
    import io

    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(wav), dtype="int16")
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def candidate_rows(result: PairResult) -> list[dict[str, Any]]:
    """The candidates sidecar's rows: every candidate made, with its seed, scores, rank and kept flag (no media),
    and how many candidates its pair used (fewer than num_candidates when the adaptive budget stopped it)."""
    used = len(result.candidates)
    return [{"pair_id": result.pair_id, "candidate_index": c.candidate_index, "seed": c.seed,
             "clip_score": c.clip_score, "clap_score": c.clap_score, "rank": c.rank, "kept": c.kept,
             "candidates_used": used}
            for c in result.candidates]


def kept_features(requests: list[PairRequest]):
    """The data parts' one schema (datasets.Features), decided from every good request before the first shard:
    the declared columns (KEPT_SCHEMA), then the pass-through columns typed over the whole manifest.
    Returns (features, warnings naming the pass-through columns written as text)."""
    known = {f.name: None if f.name in MEDIA_COLUMNS else f.type for f in KEPT_SCHEMA}
    return build_features(known, [r.extra for r in requests])


def run_schema(out: Output, requests: list[PairRequest]) -> pa.Schema:
    """The schema `prepare` decided and wrote to run.json; for a shard processed outside a run, this shard's."""
    if out.exists("run.json") and (features := out.read_json("run.json").get("features")):
        return schema_of(features_from_json(features))
    return schema_of(kept_features(requests)[0])


def process_shard(out: str, model_ids: dict[str, str], shard: Shard,
                  run_pairs: Callable[[list[PairRequest]], tuple[list[PairResult], dict]], *,
                  schema: pa.Schema | None = None, audio_format: str = "wav", fingerprint: str | None = None) -> dict:
    """Generate and rank a shard's pairs, write its parts (in the run's one schema: `schema`, else the one in
    run.json), and commit it by writing its stats LAST.

    The stats (the marker) record each part's size, row count and sha256, and the run's fingerprint digest,
    so that a resume can verify what it skips."""
    output = Output(out)
    schema = schema or run_schema(output, shard.requests)
    t0 = time.perf_counter()
    results, where = run_pairs(shard.requests)
    rows, scores, failed = [], [], []
    for result in results:
        if not result.ok:
            failed.append({"pair_id": result.pair_id, "row": result.request.row, "error": result.error})
            continue
        rows.extend(kept_rows(result, shard.name, model_ids, audio_format))
        scores.extend(candidate_rows(result))
    parts = {}
    data_part, candidates_part = f"data/part-{shard.name}.parquet", f"candidates/part-{shard.name}.parquet"
    if rows:
        parts[data_part] = output.write_table(data_part, kept_table(rows, schema))
    elif output.exists(data_part):
        output.fs.rm(output.path(data_part))  # a stale part of an earlier attempt
    parts[candidates_part] = output.write_table(candidates_part, candidates_table(scores))
    stats = {
        "shard": shard.name, "pair_ids": shard.pair_ids, "pairs": len(shard.requests),
        "pairs_done": len(shard.requests) - len(failed), "pairs_failed": len(failed), "failed": failed,
        "candidates": len(scores), "kept": len(rows), "seconds": round(time.perf_counter() - t0, 3),
        "unet_evals": sum(r.unet_evals for r in results if r.ok),
        "pairs_stopped_early": sum(r.stopped_early for r in results),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **where,
        "parts": parts, "fingerprint": fingerprint,
    }
    output.write_json(f"_shards/{shard.name}.json", stats)  # the commit marker: written last
    return stats


# ---------------------------------------------------------------------------------------------- the end
def read_kept(out: Output, columns: list[str] | None = None, shards: list[str] | None = None,
              locate: bool = False) -> pa.Table | None:
    """The kept rows of the data parts (of `shards` only, when given; only `columns`, when given: the media
    need not be read); with `locate`, each row also says where it is: `_part` (the file in data/) and `_index`
    (its row there), which is how gallery.media_of fetches the media of a few rows."""
    parts = [p for p in out.list("data") if p.endswith(".parquet")]
    if shards is not None:
        parts = [p for p in parts if p[len("part-"):-len(".parquet")] in shards]
    if not parts:
        return None
    tables = [out.read_table(f"data/{p}", columns=columns) for p in parts]
    if locate:
        tables = [t.append_column("_part", pa.array([p] * t.num_rows, pa.string()))
                  .append_column("_index", pa.array(range(t.num_rows), pa.int64())) for p, t in zip(parts, tables)]
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


def committed_counts(stats: dict[str, dict], planned: dict[str, list[str]]) -> dict[str, Any]:
    """run.json's counts that the committed shards' markers (`stats`, of the `planned` shards) make: what finalize
    writes, and what `inspect` shows of a run that never got there (interrupted)."""
    counts = {
        "pairs_done": sum(s["pairs_done"] for s in stats.values()),
        "pairs_failed": sum(s["pairs_failed"] for s in stats.values()),
        "pairs_missing": sum(len(pair_ids) for name, pair_ids in planned.items() if name not in stats),
        "candidates": sum(s["candidates"] for s in stats.values()), "kept": sum(s["kept"] for s in stats.values()),
        "unet_evals": sum(s.get("unet_evals", 0) for s in stats.values()),
        "pairs_stopped_early": sum(s.get("pairs_stopped_early", 0) for s in stats.values()),
    }
    counts["unet_evals_per_kept_pair"] = round(counts["unet_evals"] / counts["pairs_done"], 1) \
        if counts["pairs_done"] else None
    return counts


def _finalize(plan: RunPlan, actors: list | None, extra: dict | None) -> dict[str, Any]:
    out = Output(plan.out)
    planned = {sh.name: sh.pair_ids for sh in plan.shards}
    # A shard whose parts are missing or changed size, or that holds other pairs than planned (left by an earlier
    # run with other shards, not yet remade), is not counted: a re-run remakes it. Its content was checked already
    # (a resumed shard's sha256 by prepare, a new one's computed as it was written), so nothing is read.
    stats, _ = verified_shards(out, lambda name, s: s.get("pair_ids") == planned.get(name), read=False)
    counts = {
        "rows": plan.validated.num_rows, "good": len(plan.validated.requests),
        "rejected": len(plan.validated.rejections), "shards": len(plan.shards), "shards_committed": len(stats),
        "shards_resumed": len(plan.done),
        **committed_counts(stats, planned),
    }
    complete = counts["shards_committed"] == counts["shards"]
    write_run_json(plan, "complete" if complete else "incomplete", counts, actors, extra)
    # read once: the card, the top rows and (by their _part and _index) the flow's gallery artifact
    table = read_kept(out, CARD_COLUMNS, list(stats), locate=True)
    kept = table.to_pylist() if table else []
    write_card(out, plan.name, out.read_json("run.json"), kept)
    failed = [f for s in stats.values() for f in s.get("failed", [])]
    return {"out": plan.out, "name": plan.name, "complete": complete, "counts": counts, "failed": failed[:TOP_K],
            "failed_total": len(failed), "kept_rows": best(kept, TOP_K)}


TOP_K = 50  # rows of the kept table shown in the flow's artifact (the dataset holds them all)
TOP_COLUMNS = CARD_COLUMNS


def top_kept(out: Output, k: int = TOP_K, shards: list[str] | None = None) -> list[dict[str, Any]]:
    """The `k` best kept rows (card.best_order; of `shards` only, when given), read without their media."""
    table = read_kept(out, columns=TOP_COLUMNS, shards=shards)
    return best(table.to_pylist(), k) if table else []
