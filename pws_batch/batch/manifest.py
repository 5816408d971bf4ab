"""The manifest: one row per prompt pair, in Parquet (or CSV, or JSON Lines), and its validation.

Good rows become `PairRequest`s; bad rows become `Rejection`s naming the row, the field, what is wrong and
how to fix it. Validation never raises for a bad row: a run generates the good rows and records the rest.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Sequence

from pws_batch.batch.config import GenerationDefaults
from pws_batch.batch.dataset import CANDIDATES_SCHEMA, KEPT_SCHEMA, read_parquet_bytes
from pws_batch.batch.pair import PairRequest
from pws_batch.core.params import MAX_CANDIDATES, GenerationParams, Problem, check_guides, check_params

REQUIRED = ("image_prompt", "audio_prompt")
PARAM_COLUMNS = ("negative_image_prompt", "negative_audio_prompt", "guidance_image", "guidance_audio", "t_image",
                 "t_audio", "weight_image", "weight_audio", "strength", "guide_audio", "guide_image",
                 "num_candidates", "seed", "steps", "scheduler")
TARGETS = ("target_clip", "target_clap")  # the adaptive budget's per-pair targets (not generation parameters)
OPTIONAL = ("pair_id", "keep", *TARGETS, *PARAM_COLUMNS)
KNOWN = (*REQUIRED, *OPTIONAL)
TEXT = {"image_prompt", "audio_prompt", "negative_image_prompt", "negative_audio_prompt", "guide_audio",
        "guide_image", "pair_id", "scheduler"}
INTEGER = {"num_candidates", "seed", "steps", "keep"}
# Known columns whose whole numbers the readers keep exact beside missing cells (pandas would make them float64,
# rounding a seed above 2**53): the integer parameters, and integer pair ids
WHOLE = INTEGER | {"pair_id"}
# Columns the output dataset writes itself: a manifest column of the same name is carried as manifest_<name>.
RESERVED = (set(KEPT_SCHEMA.names) | set(CANDIDATES_SCHEMA.names)) - set(KNOWN)
MAX_PAIR_ID = 200
PASS_PREFIX = "manifest_"


@dataclass
class Rejection:
    row: int
    pair_id: str | None
    field: str
    reason: str
    fix: str
    values: dict[str, Any]

    def __str__(self) -> str:
        who = f" (pair_id {self.pair_id!r})" if self.pair_id else ""
        # a row with several problems names each with its fix in `reason` (_first_of); `fix` is the first's
        inline = self.fix and f"(fix: {self.fix})" in self.reason
        return f"row {self.row}{who}: {self.field}: {self.reason}" + (f"; fix: {self.fix}" if self.fix and not inline
                                                                        else "")


@dataclass
class Validated:
    requests: list[PairRequest]
    rejections: list[Rejection]
    warnings: list[str]
    columns: list[str]
    num_rows: int


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, missing a required column)."""


# ---------------------------------------------------------------------------------------------- reading
READ_REJECTIONS = "read_rejections"  # df.attrs key: rows the reader itself could not use (ragged CSV, bad JSON)


def read_manifest(uri: str):
    """A pandas DataFrame from a Parquet, CSV or JSON Lines manifest (path or fsspec URI).

    The index is the row number in the file (data rows from 0). A CSV row with too many or too few fields, or
    a JSON line that does not parse, is not read: it is listed in `df.attrs["read_rejections"]` (as Rejections
    naming its row and line) and the other rows are read as if it were not there.
    """
    import fsspec

    lower = uri.lower().split("?")[0]
    try:
        with fsspec.open(uri, "rb") as f:
            raw = f.read()
        if lower.endswith(".gz"):
            raw = gzip.decompress(raw)
        # Text fields are read as text (a pair_id "001" stays "001"); other columns as the file says.
        if lower.endswith((".csv", ".csv.gz")):
            return _read_csv(raw)
        if lower.endswith((".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")):
            return _read_json_lines(raw)
        if not raw.startswith(b"PAR1"):  # every Parquet file begins (and ends) with these 4 bytes
            raise ManifestError(_not_parquet(raw))
        # Not pd.read_parquet: Arrow's dataset scanner starts pool threads (see read_parquet_bytes).
        return _parquet_frame(read_parquet_bytes(raw))
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {uri} does not exist") from exc
    except ImportError as exc:  # fsspec's filesystem for the URI's protocol is not installed (s3fs, gcsfs, ...)
        raise ManifestError(f"cannot read manifest {uri}: {exc} (`.venv/bin/pip install` it: fsspec reads "
                            f"object stores through it)") from exc
    except ManifestError as exc:
        raise ManifestError(f"cannot read manifest {uri}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure: say which file and what format was expected
        raise ManifestError(f"cannot read manifest {uri} as {'CSV' if '.csv' in lower else 'JSON Lines' if '.json' in lower else 'Parquet'}: "
                            f"{type(exc).__name__}: {exc}") from exc


def _not_parquet(raw: bytes) -> str:
    """Why a file read as Parquet (any name not ending in a CSV / JSON Lines extension) is not one."""
    if not raw:
        return "the file is empty"
    head = raw[:200].decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    if head.startswith(("{", "[")):
        looks = "JSON: name it .jsonl (one object per line) or .json"
    elif "," in head.split("\n", 1)[0] and "\ufffd" not in head:
        looks = "CSV: name it .csv"
    else:
        looks = "neither Parquet, CSV nor JSON"
    return (f"it is not a Parquet file (which begins with PAR1); it looks like {looks}. The format is read from the "
            f"name: .parquet (or any other), .csv, .jsonl / .ndjson / .json, each optionally .gz")


def _parquet_frame(table):
    """The manifest's rows as pandas reads them, but for the pass-through columns holding whole numbers: pandas
    turns whole numbers beside a null into float64 (7 -> 7.0, in nested values too; a uint64 above 2**53 loses
    digits), so those columns keep Python ints and None, as the other readers give them; so do the known integer
    columns (WHOLE: a seed of 2**62 + 1 beside an empty cell stays that seed). The other known columns stay as
    pandas reads them (validation checks them a column at a time).

    A file pandas wrote keeps its DataFrame's index: a named one (`df.set_index("pair_id")`) is a column of the
    manifest like any other, an unnamed one (the row labels left by filtering rows) is dropped; rows are numbered
    from 0 in the file's order either way."""
    df = table.to_pandas()
    index = [c for c in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
    named = [c for c in index if not c.startswith("__index_level_")]
    if named:
        df = df.reset_index(level=named)
    df = df.reset_index(drop=True)
    for i, name in enumerate(df.columns):
        j = table.schema.get_field_index(name)  # -1: not in the file (or not once)
        if j < 0:
            continue
        field, column = table.schema.field(j), table.column(j)
        if (name not in KNOWN or name in WHOLE) and _holds_integers(field.type) \
                and (name not in KNOWN or column.null_count):
            df.isetitem(i, column.to_pandas(integer_object_nulls=True).set_axis(df.index))
    return df


def _holds_integers(t) -> bool:
    import pyarrow as pa

    if pa.types.is_integer(t):
        return True
    if pa.types.is_dictionary(t):
        return _holds_integers(t.value_type)
    if pa.types.is_map(t):
        return _holds_integers(t.key_type) or _holds_integers(t.item_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _holds_integers(t.value_type)
    if pa.types.is_struct(t):
        return any(_holds_integers(t.field(j).type) for j in range(t.num_fields))
    return False


def manifest_name(uri: str) -> str:
    """The manifest's name (its file name without the manifest extensions): names the run, the flow run, the card.

    `s3://b/my.pairs.parquet` -> `my.pairs`; `pairs.csv.gz` -> `pairs`.
    """
    stem = re.sub(r"\.(parquet|csv|jsonl|ndjson|json)(\.gz)?$", "", uri.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
    return stem or "manifest"


def _read_csv(raw: bytes):
    """CSV with ragged rows set aside by row and line (pandas would shift every column of such a row)."""
    import pandas as pd

    text = raw.decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    header, good, index, rejected = None, [], [], []
    line = 1
    for record in reader:
        first_line, line = line, reader.line_num + 1
        if header is None:
            header = record
            continue
        if not record:  # a blank line
            continue
        row = len(index) + len(rejected)
        if len(record) != len(header):
            many = "many" if len(record) > len(header) else "few"
            rejected.append(Rejection(
                row, None, "row", f"has {len(record)} fields but the header has {len(header)} (line {first_line}; "
                f"too {many} fields, so its columns cannot be matched to the header)",
                "quote fields that contain commas, and give every row one field per header column",
                {"line": first_line, "fields": record}))
            continue
        good.append(record)
        index.append(row)
    if header is None:
        raise ManifestError("the file is empty (not even a header row)")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(good)
    buffer.seek(0)
    df = pd.read_csv(buffer, keep_default_na=False, na_values=[""], dtype={c: str for c in TEXT})
    floats = [c for c in INTEGER if c in df.columns and df[c].dtype.kind == "f"]
    if floats:  # a blank cell made pandas read whole numbers as floats (rounding a seed above 2**53): as written
        buffer.seek(0)
        written = pd.read_csv(buffer, keep_default_na=False, na_values=[""], dtype=str, usecols=floats)
        for name in floats:
            df[name] = written[name].astype(object).where(written[name].notna(), None)
    df.index = index
    df.attrs[READ_REJECTIONS] = rejected
    return df


def _read_json_lines(raw: bytes):
    """JSON Lines (or one JSON array of objects); a line that does not parse is set aside with its number."""
    import pandas as pd

    text = raw.decode("utf-8-sig")
    if text.lstrip().startswith("["):  # a .json file holding one array of row objects
        records = json.loads(text)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ManifestError("a JSON manifest must be one object per line, or an array of objects")
        return _keep_whole_numbers(pd.DataFrame.from_records(records), records) if records else pd.DataFrame()
    good, index, rejected = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = len(index) + len(rejected)
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"is a JSON {type(record).__name__}, not an object")
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            rejected.append(Rejection(row, None, "row", f"line {number} is not a JSON object ({reason})",
                                      'write each row as one JSON object on its own line: {"image_prompt": ..., '
                                      '"audio_prompt": ...}', {"line": number, "text": line[:500]}))
            continue
        good.append(record)
        index.append(row)
    columns = list(dict.fromkeys(k for r in good for k in r))
    df = _keep_whole_numbers(pd.DataFrame.from_records(good, columns=columns), good) if good \
        else pd.DataFrame(columns=columns)
    df.index = index
    df.attrs[READ_REJECTIONS] = rejected
    return df


def _keep_whole_numbers(df, records: list[dict]):
    """pandas makes a column of whole numbers beside a missing value float64 (7 -> 7.0): a pass-through column
    whose values are whole numbers keeps them as Python ints (and None), as the JSON says (see _parquet_frame), and
    so does a known integer column (WHOLE: a seed above 2**53 would be rounded)."""
    import pandas as pd

    for i, name in enumerate(df.columns):
        if (name in KNOWN and name not in WHOLE) or df[name].dtype.kind != "f":
            continue
        values = [r.get(name) for r in records]
        if any(isinstance(v, int) and not isinstance(v, bool) for v in values):
            df.isetitem(i, pd.Series(values, index=df.index, dtype=object))
    return df


def manifest_fingerprint(uri: str) -> str:
    """sha256 of the manifest's bytes: a resumed run must be reading the same manifest."""
    import fsspec

    digest = hashlib.sha256()
    try:
        with fsspec.open(uri, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:  # gone since it was submitted, or not on this worker's storage
        raise ManifestError(f"cannot read manifest {uri} ({type(exc).__name__}: {exc}); the flow's process must "
                            f"read it where it runs (on a cluster: storage every worker shares, or s3://...)") from exc
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- values
def _missing(value: Any) -> bool:
    """None, NaN and pandas' NA / NaT are "no value" (the run's default applies)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    import pandas as pd

    return value is pd.NA or value is pd.NaT


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars and arrays -> lists, so types can be checked and values written out."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _coerce(name: str, value: Any) -> Any:
    """A cell -> the field's type, or raise ValueError with what is wrong."""
    if name == "pair_id" and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and float(value).is_integer():
        return str(int(value))  # integer ids are common (a blank cell makes pandas read them as floats)
    if name in TEXT:
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {type(value).__name__} {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got a boolean {value!r}")
    if isinstance(value, str):
        if name in INTEGER:
            try:
                return int(value.strip())  # exact: float() would round a seed above 2**53
            except ValueError:
                pass  # "7.0" is whole, "2.5" is not: as a number below
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"must be a number, got text {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    if name in INTEGER:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"must be a whole number, got {value!r}")
        return int(value)  # an int as it is (float() of a seed above 2**53 is not that seed)
    return float(value)


def default_pair_id(params: GenerationParams) -> str:
    """A stable id from the generation parameters: the same request always gets the same id."""
    canonical = json.dumps(params.to_dict(), sort_keys=True, separators=(",", ":"))
    return "pair-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


_FIXES = {
    "image_prompt": "give a non-empty text prompt",
    "audio_prompt": "give a non-empty text prompt",
    "negative_image_prompt": 'text, or leave the cell empty for ""',
    "negative_audio_prompt": 'text, or leave the cell empty for ""',
    "guidance_image": "a number in [0, 100], e.g. 7.5 (empty cell: 10)",
    "guidance_audio": "a number in [0, 100], e.g. 7.5 (empty cell: 10)",
    "t_image": "a number in [0, 1] (empty cell: 0.9)",
    "t_audio": "a number in [0, 1] (empty cell: 1.0)",
    "weight_image": "0 or a number in [0.001, 1000] (empty cell: 0.5)",
    "weight_audio": "0 or a number in [0.001, 1000] (empty cell: 0.5)",
    "strength": "a number in (0, 1] (empty cell: 1)",
    "guide_audio": "a readable sound file path or URI, or an empty cell",
    "guide_image": "a readable image file path or URI, or an empty cell",
    "scheduler": "a diffusers scheduler class name such as DDIMScheduler, or an empty cell",
    "num_candidates": "a whole number >= 1, e.g. 50",
    "keep": "a whole number between 1 and num_candidates",
    "seed": f"a whole number in [0, 2**63 - {MAX_CANDIDATES})",
    "steps": "a whole number, e.g. 100",
    "pair_id": f"text of at most {MAX_PAIR_ID} characters, unique in the manifest",
    "target_clip": "a number (the CLIP score at which a pair may stop early), or an empty cell for the run's "
                   "--target-clip",
    "target_clap": "a number (the CLAP score at which a pair may stop early), or an empty cell for the run's "
                   "--target-clap",
}


# ---------------------------------------------------------------------------------------------- validation
def resolve_guide(value: str, base: str | None) -> str:
    """A relative guide path is relative to the manifest's folder; absolute paths and URIs stay as they are."""
    if base is None or "://" in value or value.startswith("/"):
        return value
    return base.rstrip("/") + "/" + value


def location(uri: str) -> tuple[str, str]:
    """(where, path) of a path or URI: ("local", real absolute path) or ("scheme://host", normalised path)."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return "local", os.path.realpath(path)
    scheme, rest = uri.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme.lower()}://{host}", posixpath.normpath("/" + path)


def is_under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or lies inside it (both as `location` gives them)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def guide_allowed(guide: str, manifest: str | None, allow: list[str] | tuple[str, ...] = ()) -> bool:
    """May a guide be read from `guide`? Always from the manifest's own storage (its folder for a local
    manifest, its bucket for an object store); besides that only from `allow`: "local" (any local path), "any"
    (anywhere), or path / URI prefixes."""
    where, path = location(guide)
    if "any" in allow or (where == "local" and "local" in allow):
        return True
    prefixes = [entry for entry in allow if entry not in ("local", "any")]
    if manifest is not None:
        m_where, m_path = location(manifest)
        prefixes.append(os.path.dirname(m_path) if m_where == "local" else f"{m_where}/")
    for prefix in prefixes:
        p_where, p_path = location(prefix)
        if p_where == where and is_under(path, p_path):
            return True
    return False


def guide_columns(df, base: str | None) -> list[str]:
    """Every guide path a manifest names (resolved against its folder), in order, without repeats."""
    paths = []
    for column in ("guide_audio", "guide_image"):
        if column in df.columns:
            paths += [resolve_guide(v, base) for v in df[column] if isinstance(v, str) and v.strip()]
    return list(dict.fromkeys(paths))


def _read_rejections(df) -> list[Rejection]:
    """The rows the reader itself could not use (ragged CSV rows, broken JSON lines)."""
    return list(df.attrs.get(READ_REJECTIONS, []))


def _row_numbers(df) -> list[int]:
    """Each row's number in the file: the reader's index when it set rows aside, else the position."""
    return [int(i) for i in df.index] if READ_REJECTIONS in df.attrs else list(range(len(df)))


def _empty(df) -> Validated:
    """An empty manifest, a header-only CSV, or one whose every line was unreadable: nothing to generate."""
    read = sorted(_read_rejections(df), key=lambda r: r.row)
    return Validated([], read, [], [str(c) for c in df.columns], len(read))


def _resolve_guides(values: dict[str, Any], base: str, manifest: str | None,
                    allow_guides: Sequence[str] | None) -> list[Problem]:
    """Resolve a row's guide paths in `values` against the manifest's folder; the problems of those not allowed."""
    problems = []
    for guide in ("guide_audio", "guide_image"):
        if guide in values:
            values[guide] = resolve_guide(values[guide], base)
            if (problem := _guide_problem(guide, values[guide], manifest, allow_guides)) is not None:
                problems.append(problem)
    return problems


def _first_of(problems: list[Problem]) -> Problem:
    """The problem a row is rejected for: the first (its field and fix), its message naming the others with theirs,
    so that one round of fixes can clear the row."""
    if len(problems) == 1:
        return problems[0]
    p = problems[0]
    more = "".join(f"; and {q.field}: {q.message}" + (f" (fix: {q.fix})" if q.fix else "") for q in problems[1:])
    return Problem(p.field, p.message + (f" (fix: {p.fix})" if p.fix else "") + more, p.fix)


def _guide_problem(guide: str, value: str, manifest: str | None, allow_guides) -> Problem | None:
    """A guide from a place this run does not read guides from (checked before the file is opened)."""
    if allow_guides is None or guide_allowed(value, manifest, allow_guides):
        return None
    return Problem(guide, f"{value!r} is outside the places this run reads guides from (the manifest's own storage"
                          f"{', ' + ', '.join(allow_guides) if allow_guides else ''})",
                   "put the guide next to the manifest, or allow its place with --allow-guides PREFIX")


def _check_columns(df) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """The manifest's columns (raises ManifestError without the required ones), warnings, the extra columns carried
    through and their output names."""
    columns = [str(c) for c in df.columns]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        unknown = [c for c in columns if c not in KNOWN]  # a typo is no column the manifest uses as itself
        hints = [f"{m!r} (is {close[0]!r} a typo?)" if (close := difflib.get_close_matches(m, unknown, 1)) else repr(m)
                 for m in missing]
        raise ManifestError(f"the manifest has no column {', '.join(hints)}; required: {', '.join(REQUIRED)}")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise ManifestError(f"the manifest has duplicate column names {duplicated}")

    warnings: list[str] = []
    extra_columns = [c for c in columns if c not in KNOWN]
    renamed = {}
    for c in extra_columns:
        close = difflib.get_close_matches(c, KNOWN, 1, cutoff=0.8)
        if close:
            warnings.append(f"column {c!r} is not a known field and is carried through untouched; "
                            f"did you mean {close[0]!r}?")
        if c in RESERVED or c.startswith(PASS_PREFIX):
            renamed[c] = PASS_PREFIX + c
            warnings.append(f"column {c!r} clashes with an output column; it is carried through as "
                            f"{PASS_PREFIX + c!r}")
    return columns, warnings, extra_columns, renamed


def validate_manifest_by_row(df, defaults: GenerationDefaults | None = None, scheduler_config: dict | None = None,
                             check_files: bool = True, base: str | None = None, manifest: str | None = None,
                             allow_guides: list[str] | tuple[str, ...] | None = None) -> Validated:
    """`validate_manifest` one row at a time, every check redone for every row: the reference the vectorised
    `validate_manifest` must agree with (tests/test_manifest_scale.py); slow on big manifests."""
    from pws_batch.core.schedule import checked_timesteps
    from pws_batch.core.schedule import ScheduleError

    defaults = defaults or GenerationDefaults()
    if len(df) == 0:
        return _empty(df)
    columns, warnings, extra_columns, renamed = _check_columns(df)

    requests: list[PairRequest] = []
    rejections: list[Rejection] = _read_rejections(df)
    seen: dict[str, int] = {}
    records = df.to_dict(orient="records")
    for row, record in zip(_row_numbers(df), records):
        record = {k: _plain(v) for k, v in record.items()}
        shown = {k: (None if _missing(v) else v) for k, v in record.items()}

        def reject(field_: str, reason: str, fix: str = "", pair_id: str | None = None) -> None:
            rejections.append(Rejection(row, pair_id, field_, reason, fix or _FIXES.get(field_, ""), shown))

        values: dict[str, Any] = {}
        problems: list[Problem] = []
        for name in KNOWN:
            if name not in record or _missing(record[name]):
                if name in REQUIRED:
                    problems.append(Problem(name, "is missing (empty or null)", _FIXES[name]))
                continue
            try:
                values[name] = _coerce(name, record[name])
            except ValueError as exc:
                problems.append(Problem(name, str(exc), _FIXES.get(name, "")))
        problems += _resolve_guides(values, base, manifest, allow_guides)
        explicit_id = values.pop("pair_id", None)
        if problems:
            p = _first_of(problems)
            reject(p.field, p.message, p.fix, explicit_id)
            continue
        keep = values.pop("keep", defaults.keep)
        targets = {t: values.pop(t, getattr(defaults, t)) for t in TARGETS}
        params = defaults.params(**values)
        problems = check_params(params)
        if not problems and check_files:
            problems = check_guides(params)
        if problems:
            p = _first_of(problems)
            reject(p.field, p.message, p.fix, explicit_id)
            continue
        if not 1 <= keep <= params.num_candidates:
            reject("keep", f"must be between 1 and num_candidates ({params.num_candidates}), got {keep}",
                   pair_id=explicit_id)
            continue
        if scheduler_config is not None:
            try:
                checked_timesteps(params, scheduler_config)
            except ScheduleError as exc:
                reject("t_image", str(exc), "raise t_image or t_audio as the message says", explicit_id)
                continue
            except ValueError as exc:
                reject("scheduler", str(exc), pair_id=explicit_id)
                continue
        pair_id = explicit_id if explicit_id is not None else default_pair_id(params)
        if not pair_id.strip() or len(pair_id) > MAX_PAIR_ID:
            reject("pair_id", f"must be non-empty text of at most {MAX_PAIR_ID} characters", pair_id=pair_id)
            continue
        if pair_id in seen:
            reject("pair_id", f"duplicate pair_id {pair_id!r} (first at row {seen[pair_id]})",
                   "give every row its own pair_id" if explicit_id is not None
                   else "the row repeats an earlier row's parameters exactly; drop it or change its seed",
                   pair_id)
            continue
        seen[pair_id] = row
        extra = {renamed.get(c, c): (None if _missing(record.get(c)) else record.get(c)) for c in extra_columns}
        requests.append(PairRequest(row, pair_id, params, keep, extra, **targets))
    rejections.sort(key=lambda r: r.row)
    return Validated(requests, rejections, warnings, columns, len(records) + len(_read_rejections(df)))


def _coerce_column(name: str, series) -> tuple[list, list]:
    """One known column at once: (values, errors), a value (None = empty cell) or an error message per row.

    Numeric columns are checked with numpy; other columns cell by cell with `_coerce` (same answers either way).
    """
    import numpy as np

    n = len(series)
    dtype = series.dtype
    plain_numeric = isinstance(dtype, np.dtype) and dtype.kind in "iuf"
    if plain_numeric and name not in TEXT:
        array = series.to_numpy()
        errors: list = [None] * n
        if dtype.kind == "f":
            missing = np.isnan(array)
            bad = ~missing & ~np.isfinite(array)
            if name in INTEGER:
                finite = np.where(np.isfinite(array), array, 0.0)
                bad |= ~missing & np.isfinite(array) & (finite != np.trunc(finite))
            for i in np.flatnonzero(bad):
                try:
                    _coerce(name, float(array[i]))
                except ValueError as exc:
                    errors[i] = str(exc)
            cast = int if name in INTEGER else float
            values = [None if (m or b) else cast(v) for v, m, b in zip(array.tolist(), missing.tolist(), bad.tolist())]
            return values, errors
        cast = int if name in INTEGER else float
        return [cast(v) for v in array.tolist()], errors
    values, errors = [None] * n, [None] * n
    for i, cell in enumerate(series.tolist()):
        cell = _plain(cell)
        if _missing(cell):
            continue
        if isinstance(cell, str) and name in TEXT:
            values[i] = cell
            continue
        try:
            values[i] = _coerce(name, cell)
        except ValueError as exc:
            errors[i] = str(exc)
    return values, errors


def validate_manifest(df, defaults: GenerationDefaults | None = None, scheduler_config: dict | None = None,
                      check_files: bool = True, base: str | None = None, manifest: str | None = None,
                      allow_guides: list[str] | tuple[str, ...] | None = None) -> Validated:
    """Split a manifest into good requests and rejected rows; never raises for a bad row.

    `base` is the manifest's folder, against which relative guide paths are resolved. With `allow_guides` given, a
    guide from anywhere but `manifest`'s own storage and those places is rejected before it is opened (see
    `guide_allowed`). Vectorised for big manifests:
    each known column is coerced and checked at once, each distinct schedule and guide file is checked once, and a
    row is assembled only to build its request; the answers are those of `validate_manifest_by_row`. A scheduler
    class whose timesteps only diffusers computes is built in a child process (schedule.diffusers_in_a_child):
    validating imports no torch.
    """
    from pws_batch.core.schedule import diffusers_in_a_child

    with diffusers_in_a_child():
        return _validate_manifest(df, defaults, scheduler_config, check_files, base, manifest, allow_guides)


def _validate_manifest(df, defaults: GenerationDefaults | None, scheduler_config: dict | None, check_files: bool,
                       base: str | None, manifest: str | None,
                       allow_guides: list[str] | tuple[str, ...] | None) -> Validated:
    from pws_batch.core.schedule import checked_timesteps
    from pws_batch.core.schedule import ScheduleError

    defaults = defaults or GenerationDefaults()
    if len(df) == 0:
        return _empty(df)
    columns, warnings, extra_columns, renamed = _check_columns(df)
    n = len(df)
    numbers = _row_numbers(df)  # a row's number in the file; `row` below is its position in df
    present = [name for name in KNOWN if name in columns]
    coerced = {name: _coerce_column(name, df[name]) for name in present}

    rejections: list[Rejection] = []
    requests: list[PairRequest] = []
    seen: dict[str, int] = {}
    schedules: dict[tuple, tuple[str, str, str] | None] = {}
    guides: dict[tuple, list[Problem]] = {}
    extras = {c: df[c].tolist() for c in extra_columns}

    positions: dict[int, int] = {}

    def reject(row: int, field_: str, reason: str, fix: str = "", pair_id: str | None = None) -> None:
        positions[len(rejections)] = row
        rejections.append(Rejection(numbers[row], pair_id, field_, reason, fix or _FIXES.get(field_, ""), {}))

    # A row is looked at cell by cell only when one of its cells is bad.
    has_error = [False] * n
    for name in present:
        values_, errors_ = coerced[name]
        for i in (i for i, e in enumerate(errors_) if e is not None):
            has_error[i] = True
        if name in REQUIRED:
            for i in (i for i, v in enumerate(values_) if v is None):
                has_error[i] = True
    lookup = [(name, coerced[name][0]) for name in present]
    for row in range(n):
        problems: list[Problem] = []
        values = {name: col[row] for name, col in lookup if col[row] is not None}
        if has_error[row]:
            for name in KNOWN:
                error = coerced[name][1][row] if name in coerced else None
                if error is not None:
                    problems.append(Problem(name, error, _FIXES.get(name, "")))
                elif name in REQUIRED and values.get(name) is None:
                    problems.append(Problem(name, "is missing (empty or null)", _FIXES[name]))
        problems += _resolve_guides(values, base, manifest, allow_guides)
        explicit_id = values.pop("pair_id", None)
        if problems:
            p = _first_of(problems)
            reject(row, p.field, p.message, p.fix, explicit_id)
            continue
        keep = values.pop("keep", defaults.keep)
        targets = {t: values.pop(t, getattr(defaults, t)) for t in TARGETS}
        params = defaults.params(**values)
        problems = check_params(params)
        if not problems and check_files and (params.guide_audio or params.guide_image):
            key = (params.guide_audio, params.guide_image)
            if key not in guides:
                guides[key] = check_guides(params)
            problems = guides[key]
        if problems:
            p = _first_of(problems)
            reject(row, p.field, p.message, p.fix, explicit_id)
            continue
        if not 1 <= keep <= params.num_candidates:
            reject(row, "keep", f"must be between 1 and num_candidates ({params.num_candidates}), got {keep}",
                   pair_id=explicit_id)
            continue
        if scheduler_config is not None:
            key = (params.scheduler, params.steps, params.run_strength, params.t_image, params.t_audio,
                   params.weight_image, params.weight_audio)
            if key not in schedules:  # each distinct schedule is built and checked once
                try:
                    checked_timesteps(params, scheduler_config)
                    schedules[key] = None
                except ScheduleError as exc:
                    schedules[key] = ("t_image", str(exc), "raise t_image or t_audio as the message says")
                except ValueError as exc:
                    schedules[key] = ("scheduler", str(exc), "")
            if schedules[key] is not None:
                field_, reason, fix = schedules[key]
                reject(row, field_, reason, fix, explicit_id)
                continue
        pair_id = explicit_id if explicit_id is not None else default_pair_id(params)
        if not pair_id.strip() or len(pair_id) > MAX_PAIR_ID:
            reject(row, "pair_id", f"must be non-empty text of at most {MAX_PAIR_ID} characters", pair_id=pair_id)
            continue
        if pair_id in seen:
            reject(row, "pair_id", f"duplicate pair_id {pair_id!r} (first at row {numbers[seen[pair_id]]})",
                   "give every row its own pair_id" if explicit_id is not None
                   else "the row repeats an earlier row's parameters exactly; drop it or change its seed",
                   pair_id)
            continue
        seen[pair_id] = row
        extra = {}
        for c in extra_columns:
            v = _plain(extras[c][row])
            extra[renamed.get(c, c)] = None if _missing(v) else v
        requests.append(PairRequest(numbers[row], pair_id, params, keep, extra, **targets))
    if rejections:  # the rejected rows' values, read at once
        records = df.iloc[[positions[i] for i in range(len(rejections))]].to_dict(orient="records")
        for rejection, record in zip(rejections, records):
            rejection.values = {k: (None if _missing(v) else v) for k, v in ((k, _plain(v)) for k, v in record.items())}
    rejections = sorted([*rejections, *_read_rejections(df)], key=lambda r: r.row)
    return Validated(requests, rejections, warnings, columns, n + len(_read_rejections(df)))


def rejections_table(rejections: list[Rejection]):
    """rejected.parquet's table: row, pair_id, field, reason, fix, and the row's values as JSON."""
    import pyarrow as pa

    return pa.table({
        "row": pa.array([r.row for r in rejections], pa.int64()),
        "pair_id": pa.array([r.pair_id for r in rejections], pa.string()),
        "field": pa.array([r.field for r in rejections], pa.string()),
        "reason": pa.array([r.reason for r in rejections], pa.string()),
        "fix": pa.array([r.fix for r in rejections], pa.string()),
        "row_json": pa.array([json.dumps(r.values, default=str) for r in rejections], pa.string()),
    })
