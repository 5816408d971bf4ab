"""The curated dataset on any fsspec URI (img2dataset's writer: deterministic shards, stats file written last).

    OUT/data/part-NNNNN.parquet        one row per kept candidate, image + audio as struct<bytes, path>
    OUT/candidates/part-NNNNN.parquet  every candidate's scores, rank and kept flag (no media)
    OUT/_shards/NNNNN.json             the shard's stats, written LAST: the shard is done iff it exists
    OUT/rejected.parquet               bad manifest rows with their reasons
    OUT/run.json                       config, versions, model ids
    OUT/README.md                      dataset card (Hugging Face YAML header)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MEDIA = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CARD_TAGS = ["images-that-sound", "audio", "image", "spectrogram", "synthetic"]


def read_parquet_bytes(data: bytes) -> pa.Table:
    """One Parquet file, read on this thread from an Arrow buffer.

    Not `pq.read_table` (Arrow's dataset scanner) and not a Python file object (Arrow reads those through its
    IO thread pool): both start Arrow pool threads, and one still joinable when C++ destroys the pools at
    interpreter exit aborts the process with "terminate called without an active exception" (exit 134) after
    its work is done (apache/arrow#34314; seen in short `pws-batch inspect` runs on a busy machine)."""
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)


def parquet_rows(data: bytes) -> int:
    """The row count in a Parquet file's footer (raises if it is not Parquet)."""
    return pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows


class Output:
    """An output location, opened once through fsspec."""

    def __init__(self, uri: str):
        import fsspec

        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    @property
    def posix_like(self) -> bool:
        """A filesystem with a rename that replaces a file at once (local disks, NFS, SFTP); object stores
        (s3, gs, az, memory ...) have none, but there one put of a whole object is already all-or-nothing."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return bool(set(protocols) & {"file", "local", "sftp", "ssh"})

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically: readers see the old content or the new, never a part of it."""
        parent = self.path(*rel.split("/")[:-1]) if "/" in rel else self.root
        self.fs.makedirs(parent, exist_ok=True)
        target = self.path(rel)
        if not self.posix_like:
            self.fs.pipe_file(target, data)  # one put
            return
        temporary = f"{parent}/.{rel.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with self.fs.open(temporary, "wb") as f:
                f.write(data)
            if type(self.fs).__name__ == "LocalFileSystem":
                os.replace(temporary, target)
            else:
                self.fs.mv(temporary, target)
        except BaseException:
            try:
                self.fs.rm(temporary)
            except Exception:  # noqa: BLE001 - nothing was written, or it is gone already
                pass
            raise

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.path(rel), "rb") as f:
            return json.loads(f.read())

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def write_table(self, rel: str, table: pa.Table) -> dict[str, Any]:
        """Write a Parquet file; returns its record for a shard marker (size, rows, sha256)."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        self.write_bytes(rel, data)
        return part_record(data, table.num_rows)

    def read_table(self, rel: str) -> pa.Table:
        return read_parquet_bytes(self.read_bytes(rel))

    def list(self, rel: str) -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))

    def clear(self) -> None:
        """--overwrite: remove what a previous run wrote (only pws-batch's own entries)."""
        for rel in ("data", "candidates", "_shards", "rejected.parquet", "run.json", "README.md"):
            if self.exists(rel):
                self.fs.rm(self.path(rel), recursive=True)


def shard_name(index: int) -> str:
    return f"{index:05d}"


class DatasetError(ValueError):
    """A dataset that cannot be read as it stands (one line: what is wrong and what repairs it)."""


def read_run_json(out: Output) -> dict | None:
    """OUT/run.json, or None when there is none; DatasetError when it is cut off or not JSON."""
    if not out.exists("run.json"):
        return None
    try:
        run = out.read_json("run.json")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{out.uri}/run.json is unreadable (cut off mid-write? {type(exc).__name__}); "
                           "run the same `pws-batch run` again to repair it") from exc
    if not isinstance(run, dict):
        raise DatasetError(f"{out.uri}/run.json is not a JSON object; run the same `pws-batch run` again to repair it")
    return run


def part_record(data: bytes, rows: int) -> dict[str, Any]:
    """What a shard marker records of one part: size in bytes, row count and sha256."""
    return {"bytes": len(data), "rows": rows, "sha256": hashlib.sha256(data).hexdigest()}


def verify_shard(out: Output, stats: dict) -> str | None:
    """None if the shard's parts are exactly those its marker records, else what does not match.

    A marker written before markers recorded their parts is checked for readable parts only."""
    parts = stats.get("parts")
    if parts is None:  # an older marker: the parts must at least be readable Parquet
        name = stats.get("shard", "")
        for rel in (f"data/part-{name}.parquet", f"candidates/part-{name}.parquet"):
            if out.exists(rel):
                try:
                    parquet_rows(out.read_bytes(rel))
                except Exception as exc:  # noqa: BLE001 - any reason it cannot be read
                    return f"{rel} is unreadable ({type(exc).__name__})"
        return None
    for rel, expected in parts.items():
        if not out.exists(rel):
            return f"{rel} is missing"
        size = out.size(rel)
        if size != expected["bytes"]:
            return f"{rel} has {size} bytes, its marker says {expected['bytes']}"
        data = out.read_bytes(rel)
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            return f"{rel} does not match its checksum"
        try:
            rows = parquet_rows(data)
        except Exception as exc:  # noqa: BLE001
            return f"{rel} is unreadable ({type(exc).__name__})"
        if rows != expected["rows"]:
            return f"{rel} has {rows} rows, its marker says {expected['rows']}"
    return None


def committed_shards(out: Output) -> dict[str, dict]:
    """Shard stats of every committed shard (the marker exists), keyed by shard name."""
    stats = {}
    for name in out.list("_shards"):
        if name.endswith(".json"):
            try:
                stats[name[:-5]] = out.read_json(f"_shards/{name}")
            except (json.JSONDecodeError, OSError):
                continue  # a marker cut off mid-write does not count as a commit
    return stats


# ---------------------------------------------------------------------------------------------- schemas
def _hf_feature(t: pa.DataType) -> dict | None:
    if pa.types.is_null(t):  # a pass-through column empty in every row of this shard
        return {"dtype": "null", "_type": "Value"}
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return {"dtype": "string", "_type": "Value"}
    if pa.types.is_boolean(t):
        return {"dtype": "bool", "_type": "Value"}
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        names = {"double": "float64", "float": "float32", "halffloat": "float16"}
        return {"dtype": names.get(str(t), str(t)), "_type": "Value"}
    if pa.types.is_list(t):
        inner = _hf_feature(t.value_type)
        return {"feature": inner, "_type": "List"} if inner else None
    return None


def with_hf_metadata(table: pa.Table) -> pa.Table:
    """Schema metadata that makes Hugging Face `datasets` load `image` / `audio` as Image / Audio features."""
    features: dict[str, Any] = {}
    for f in table.schema:
        if f.name == "image":
            features[f.name] = {"_type": "Image"}
        elif f.name == "audio":
            features[f.name] = {"_type": "Audio"}
        else:
            feature = _hf_feature(f.type)
            if feature is None:  # a pass-through column of an exotic type: let datasets infer all features
                return table
            features[f.name] = feature
    meta = dict(table.schema.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return table.replace_schema_metadata(meta)


def kept_table(rows: list[dict[str, Any]], types: dict[str, pa.DataType]) -> pa.Table:
    """data/part-*.parquet: `image` / `audio` as {"bytes", "path"}; known columns typed by `types`, the
    manifest's pass-through columns as Arrow infers them."""
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key in columns:
            columns[key].append(row.get(key))
    arrays = {}
    for key, values in columns.items():
        if key in ("image", "audio"):
            arrays[key] = pa.array(values, type=MEDIA)
        elif key in types:
            arrays[key] = pa.array(values, type=types[key])
        else:
            arrays[key] = _column(values)
    return with_hf_metadata(pa.table(arrays))


def _column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a pass-through column: keep them as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def candidates_table(rows: list[dict[str, Any]]) -> pa.Table:
    schema = pa.schema([("pair_id", pa.string()), ("candidate_index", pa.int64()), ("seed", pa.int64()),
                        ("clip_score", pa.float64()), ("clap_score", pa.float64()), ("rank", pa.int64()),
                        ("kept", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


# ---------------------------------------------------------------------------------------------- the card
def _summary(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    return f"mean {sum(values) / len(values):.4f}, min {min(values):.4f}, max {max(values):.4f}"


def dataset_card(name: str, run: dict[str, Any], kept_rows: list[dict[str, Any]]) -> str:
    counts = run.get("counts", {})
    models = run.get("models", {})
    header = "\n".join([
        "---",
        "pretty_name: " + json.dumps(name),
        "tags:", *[f"- {t}" for t in CARD_TAGS],
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/part-*.parquet",
        "---",
    ])
    lines = [
        header, "", f"# {name}", "",
        "Images that sound made with pws-batch: each row is one kept "
        "candidate, a 256-row grayscale canvas that is a picture (`image`, decoded by the image model's VAE) and a "
        "spectrogram (`audio`, 16 kHz mono, decoded by the audio model's VAE and vocoded).", "",
        "## Counts", "",
        f"- prompt pairs in the manifest: {counts.get('rows', 'n/a')}",
        f"- pairs kept: {counts.get('pairs_done', 'n/a')}, failed: {counts.get('pairs_failed', 0)}, "
        f"rejected rows: {counts.get('rejected', 0)} (see `rejected.parquet`)",
        f"- candidates generated: {counts.get('candidates', 'n/a')}, rows kept: {counts.get('kept', 'n/a')}",
        "", "## Scores of the kept rows", "",
        f"- CLIP (picture vs image prompt): {_summary([r.get('clip_score') for r in kept_rows])}",
        f"- CLAP (sound vs audio prompt): {_summary([r.get('clap_score') for r in kept_rows])}",
        f"- ranking rule: `{run.get('config', {}).get('ranking', {})}`",
        "", "## Models", "",
        *[f"- {k}: `{v}`" for k, v in models.items()],
        "", "## Files", "",
        "- `data/part-*.parquet`: kept rows with media and all metadata",
        "- `candidates/part-*.parquet`: every candidate's seed, scores, rank and kept flag",
        "- `rejected.parquet`: manifest rows that were not generated, with the reason",
        "- `run.json`: the run's configuration, library versions and model ids",
        "",
    ]
    return "\n".join(lines)
