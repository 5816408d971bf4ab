"""The curated dataset on any fsspec URI (img2dataset's writer: deterministic shards, stats file written last).

    OUT/data/part-NNNNN.parquet        one row per kept candidate, image + audio as struct<bytes, path>
    OUT/candidates/part-NNNNN.parquet  every candidate's scores, rank and kept flag (no media)
    OUT/_shards/NNNNN.json             the shard's stats, written LAST: the shard is done iff it exists
    OUT/rejected.parquet               bad manifest rows with their reasons
    OUT/run.json                       config, versions, model ids
    OUT/README.md                      dataset card (Hugging Face YAML header), OUT/card/*.png its histograms
"""

from __future__ import annotations

import dataclasses
import io
import json
import typing
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pws_batch.core.params import GenerationParams

MEDIA = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MODEL_COMPONENTS = ("image", "audio", "vocoder", "clip", "clap")
_ARROW = {str: pa.string(), float: pa.float64(), int: pa.int64(), bool: pa.bool_()}


def _generation_fields() -> list[pa.Field]:
    """Every generation parameter as a column, typed from GenerationParams' own annotations (seed -> base_seed)."""
    hints = typing.get_type_hints(GenerationParams)
    columns = []
    for f in dataclasses.fields(GenerationParams):
        python_type = next(t for t in (*typing.get_args(hints[f.name]), hints[f.name]) if t in _ARROW)
        columns.append(pa.field("base_seed" if f.name == "seed" else f.name, _ARROW[python_type]))
    return columns


# The data parts' columns, declared once; the manifest's pass-through columns follow them.
KEPT_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("image", MEDIA), ("audio", MEDIA),
    ("candidate_index", pa.int64()), ("seed", pa.int64()), ("rank", pa.int64()),
    ("clip_score", pa.float64()), ("clap_score", pa.float64()), ("effective_image_prompt", pa.string()),
    *_generation_fields(), ("keep", pa.int64()),
    *[(f"model_{c}", pa.string()) for c in MODEL_COMPONENTS],
    ("generate_s", pa.float64()), ("rank_s", pa.float64()), ("unet_evals", pa.int64()),
    ("shard", pa.string()), ("manifest_row", pa.int64()),
])
KNOWN_TYPES: dict[str, pa.DataType] = {f.name: f.type for f in KEPT_SCHEMA}
CANDIDATES_SCHEMA = pa.schema([("pair_id", pa.string()), ("candidate_index", pa.int64()), ("seed", pa.int64()),
                               ("clip_score", pa.float64()), ("clap_score", pa.float64()), ("rank", pa.int64()),
                               ("kept", pa.bool_())])


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

    def write_bytes(self, rel: str, data: bytes) -> None:
        parent = self.path(*rel.split("/")[:-1]) if "/" in rel else self.root
        self.fs.makedirs(parent, exist_ok=True)
        with self.fs.open(self.path(rel), "wb") as f:
            f.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, default=str).encode())

    def read_json(self, rel: str) -> Any:
        with self.fs.open(self.path(rel), "rb") as f:
            return json.loads(f.read())

    def write_table(self, rel: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(rel, buffer.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """The table at `rel`; with `columns`, only those are read (media blobs stay unread)."""
        with self.fs.open(self.path(rel), "rb") as f:
            if columns is None:
                return pq.read_table(io.BytesIO(f.read()))
            present = [c for c in columns if c in pq.read_schema(f).names]
            f.seek(0)
            return pq.read_table(f, columns=present)

    def list(self, rel: str) -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))

    def clear(self) -> None:
        """--overwrite: remove what a previous run wrote (only pws-batch's own entries)."""
        for rel in ("data", "candidates", "_shards", "rejected.parquet", "run.json", "README.md", "card",
                    "gallery"):
            if self.exists(rel):
                self.fs.rm(self.path(rel), recursive=True)


def shard_name(index: int) -> str:
    return f"{index:05d}"


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
def kept_table(rows: list[dict[str, Any]], schema: pa.Schema | dict[str, pa.DataType] = KNOWN_TYPES) -> pa.Table:
    """data/part-*.parquet: the rows cast to the run's one schema (`pws_batch.batch.schema`), whose metadata
    makes `datasets` load `image` / `audio` as Image / Audio. Given a dict of known column types instead (a
    table on its own), the schema is decided from these rows alone."""
    from pws_batch.batch.schema import build_features, schema_of, table_of

    if not isinstance(schema, pa.Schema):
        names = list(dict.fromkeys(k for row in rows for k in row))
        known = {k: (MEDIA if k in ("image", "audio") else schema[k]) for k in names if k in schema or k in ("image", "audio")}
        features, _ = build_features(known, [{k: v for k, v in row.items() if k not in known} for row in rows])
        schema = schema_of(features)
    return table_of(rows, schema)


def candidates_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)
