"""The curated dataset on any fsspec URI (img2dataset's writer: deterministic shards, stats file written last).

    OUT/data/part-NNNNN.parquet        one row per kept candidate, image + audio as struct<bytes, path>
    OUT/candidates/part-NNNNN.parquet  every candidate's scores, rank and kept flag (no media)
    OUT/_shards/NNNNN.json             the shard's stats, written LAST: the shard is done iff it exists
    OUT/rejected.parquet               bad manifest rows with their reasons
    OUT/run.json                       config, versions, model ids
    OUT/README.md                      dataset card (Hugging Face YAML header)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
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
    *_generation_fields(), ("keep", pa.int64()), ("target_clip", pa.float64()), ("target_clap", pa.float64()),
    ("candidates_used", pa.int64()),
    *[(f"model_{c}", pa.string()) for c in MODEL_COMPONENTS],
    ("generate_s", pa.float64()), ("rank_s", pa.float64()), ("unet_evals", pa.int64()),
    ("shard", pa.string()), ("manifest_row", pa.int64()),
])
KNOWN_TYPES: dict[str, pa.DataType] = {f.name: f.type for f in KEPT_SCHEMA}
CANDIDATES_SCHEMA = pa.schema([("pair_id", pa.string()), ("candidate_index", pa.int64()), ("seed", pa.int64()),
                               ("clip_score", pa.float64()), ("clap_score", pa.float64()), ("rank", pa.int64()),
                               ("kept", pa.bool_()), ("candidates_used", pa.int64())])
CARD_TAGS = ["images-that-sound", "audio", "image", "spectrogram", "synthetic"]


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
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f, columns=columns)

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


def kept_table(rows: list[dict[str, Any]], types: dict[str, pa.DataType] = KNOWN_TYPES) -> pa.Table:
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
    return pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)


# ---------------------------------------------------------------------------------------------- the card
def describe_scores(values: list[float]) -> str:
    """"mean M, min A, max B" of the scores that are numbers (the card's and `inspect`'s wording), or "n/a"."""
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
        f"- CLIP (picture vs image prompt): {describe_scores([r.get('clip_score') for r in kept_rows])}",
        f"- CLAP (sound vs audio prompt): {describe_scores([r.get('clap_score') for r in kept_rows])}",
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
