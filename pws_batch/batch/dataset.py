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
import hashlib
import io
import json
import os
import typing
import uuid
from typing import Any, Callable

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


def read_parquet_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, read on this thread from an Arrow buffer.

    Not `pq.read_table` (Arrow's dataset scanner) and not a Python file object (Arrow reads those through its
    IO thread pool): both start Arrow pool threads, and one still joinable when C++ destroys the pools at
    interpreter exit aborts the process with "terminate called without an active exception" (exit 134) after
    its work is done (apache/arrow#34314; seen in short `pws-batch inspect` runs on a busy machine)."""
    parquet = pq.ParquetFile(pa.BufferReader(data))
    if columns is not None:
        columns = [c for c in columns if c in parquet.schema_arrow.names]
    return parquet.read(columns=columns, use_threads=False)


FOOTER_GUESS = 64 * 1024  # one ranged read usually holds a part's whole footer


def read_columns(fs, path: str, columns: list[str]) -> pa.Table:
    """Some columns of one Parquet file, fetching only the footer and those columns' chunks (ranged reads through
    fsspec: a few requests on an object store, not the whole object with its media).

    The fetched ranges are laid at their offsets in an anonymous memory map of the file's size (pages never
    written take no memory) and read from there as one Arrow buffer, on this thread (see read_parquet_bytes)."""
    import mmap

    size = int(fs.size(path))
    if size < 12:
        raise ValueError(f"{path} is {size} bytes: not a Parquet file")
    tail = fs.cat_file(path, start=max(0, size - FOOTER_GUESS), end=size)
    if tail[-4:] != b"PAR1":
        raise ValueError(f"{path} does not end with Parquet's magic bytes: not a Parquet file, or cut off")
    footer = int.from_bytes(tail[-8:-4], "little") + 8
    if footer > size - 4:
        raise ValueError(f"{path}: its Parquet footer says {footer} bytes, more than the file holds")
    if footer > len(tail):
        tail = fs.cat_file(path, start=size - footer, end=size)
    image = mmap.mmap(-1, size)
    try:
        image[:4] = b"PAR1"
        image[size - len(tail):] = tail
        buffer = pa.py_buffer(image)
        parquet = pq.ParquetFile(pa.BufferReader(buffer))
        wanted = [c for c in columns if c in parquet.schema_arrow.names]
        ranges = []
        meta = parquet.metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for i in range(group.num_columns):
                chunk = group.column(i)
                if chunk.path_in_schema.split(".")[0] not in wanted:
                    continue
                start = chunk.data_page_offset
                if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
                    start = min(start, chunk.dictionary_page_offset)
                ranges.append((start, start + chunk.total_compressed_size))
        if ranges:
            starts, ends = zip(*ranges)
            for (start, end), data in zip(ranges, fs.cat_ranges([path] * len(ranges), list(starts), list(ends))):
                if isinstance(data, Exception):
                    raise data
                image[start:start + len(data)] = data
        table = parquet.read(columns=wanted, use_threads=False)
        del parquet, buffer
        return table
    finally:
        try:
            image.close()
        except BufferError:  # an Arrow buffer still refers to it: the map goes when that does
            pass


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

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """The table at `rel`; with `columns`, only the bytes of those columns are fetched (`read_columns`): the
        media of a data part stay on the disk or in the bucket."""
        if columns is None:
            return read_parquet_bytes(self.read_bytes(rel))
        return read_columns(self.fs, self.path(rel), columns)

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


def verify_shard(out: Output, stats: dict, read: bool = True) -> str | None:
    """None if the shard's parts are exactly those its marker records, else what does not match. `read=False`
    checks only that they exist with the recorded sizes (reads no data: for shards whose content this run has
    checked already).

    A marker written before markers recorded their parts is checked for readable parts only."""
    parts = stats.get("parts")
    if parts is None and not read:
        return None
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
        if not read:
            continue
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


def verified_shards(out: Output, wanted: Callable[[str, dict], bool] | None = None,
                    read: bool = True) -> tuple[dict[str, dict], dict[str, str]]:
    """The committed shards (those `wanted(name, stats)` selects) whose parts match their markers, by name, and the
    problem of each of the others (`read`: see verify_shard)."""
    ok, broken = {}, {}
    for name, stats in committed_shards(out).items():
        if wanted is not None and not wanted(name, stats):
            continue
        problem = verify_shard(out, stats, read)
        if problem:
            broken[name] = problem
        else:
            ok[name] = stats
    return ok, broken


def check_intact(out: Output) -> None:
    """DatasetError naming the committed shards whose parts are missing or not the size their markers record (a
    copy cut short, a part deleted): what reads every kept row (gallery, export) would fail on them or silently
    leave their rows out. Reads no data."""
    _, broken = verified_shards(out, read=False)
    if broken:
        names = sorted(broken)
        raise DatasetError(f"{out.uri} is damaged: {len(names)} committed shard(s) do not match their markers "
                           f"({'; '.join(f'{n}: {broken[n]}' for n in names[:3])}{'; ...' if len(names) > 3 else ''}); "
                           f"run the same `pws-batch run` again to regenerate them (`pws-batch inspect` lists them)")


# Folders of a dataset that only `pws-batch run` writes: a gallery or an export inside them would break its readers
# (pandas, pyarrow and `datasets` read every file under data/).
OWN_FOLDERS = ("data", "candidates", "_shards", "card")


def same_place(a: str, b: str) -> tuple[str | None, str]:
    """Two locations as comparable paths: (a's, b's), normalised (a local path made real: `d/./data`, `d//data`
    and links name the same folder); (None, "") when they are on different filesystems."""
    from pws_batch.batch.manifest import location

    (where_a, path_a), (where_b, path_b) = location(a), location(b)
    if where_a != where_b:
        return None, ""
    return path_a.rstrip("/"), path_b.rstrip("/")


def inside_own_folders(out: Output, dest: str) -> str | None:
    """The dataset folder of `out` that `dest` is in (or is), else None."""
    from pws_batch.batch.manifest import is_under

    root, path = same_place(out.uri, dest)
    if root is None:
        return None
    return next((name for name in OWN_FOLDERS if is_under(path, f"{root}/{name}")), None)


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
