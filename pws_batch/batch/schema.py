"""One schema per run: every column's Arrow type decided once, from the whole manifest, before the first shard.

The data parts of a dataset must all have the identical schema, or pandas, pyarrow and Hugging Face `datasets`
refuse to read them together. The known columns have fixed types; a manifest's pass-through columns get theirs
from every good row's values:

- empty in every row -> string (all null);
- only whole numbers -> int64; whole and decimal numbers -> float64; only booleans -> bool; only text -> string;
- only timestamps, dates, lists or structs -> the Arrow type they have (kept as such), when `datasets` can
  represent it; otherwise (maps, mixed time zones, lists of differently shaped things ...) JSON text;
- anything else mixed (5, "x", 7) -> string, with a warning naming the column.

The result is a `datasets.Features` (Image; Audio at 16 kHz; a Value, List or struct for every other column),
whose Arrow schema carries the `huggingface` metadata `datasets` reads back.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any, Iterable, Mapping

import pyarrow as pa

SAMPLING_RATE = 16000
MEDIA_COLUMNS = ("image", "audio")


def media_extension(entry: dict | None, default: str) -> str:
    """The file extension of a stored media cell ({"bytes", "path"}), from its path; `default` without one."""
    path = (entry or {}).get("path") or ""
    return path.rsplit(".", 1)[-1].lower() if "." in path else default


def media_features() -> dict[str, Any]:
    from datasets import Audio, Image

    return {"image": Image(), "audio": Audio(sampling_rate=SAMPLING_RATE)}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if isinstance(value, dt.datetime):  # pandas' Timestamp too
        return "datetime"
    if isinstance(value, dt.date):
        return "date"
    if isinstance(value, (dict, list, tuple)):
        return "nested"
    return "other"


def _contains_null_type(t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_contains_null_type(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _contains_null_type(t.value_type)
    return False


def _representable(t: pa.DataType) -> bool:
    """True if `datasets` gives this Arrow type a feature that maps back to the very same type."""
    if _contains_null_type(t):
        return False
    try:
        from datasets import Features
        from datasets.features.features import generate_from_arrow_type

        return Features({"c": generate_from_arrow_type(t)}).type.field("c").type == t
    except Exception:  # noqa: BLE001 - no datasets equivalent (e.g. map types)
        return False


def column_type(values: Iterable[Any]) -> tuple[pa.DataType, str | None]:
    """The Arrow type of a pass-through column from all its values, and why it became text if it did."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.string(), None
    kinds = {_kind(v) for v in present}
    simple = {frozenset({"bool"}): pa.bool_(), frozenset({"int"}): pa.int64(),
              frozenset({"int", "float"}): pa.float64(), frozenset({"float"}): pa.float64(),
              frozenset({"str"}): pa.string(), frozenset({"bytes"}): pa.binary()}
    if frozenset(kinds) in simple:
        t = simple[frozenset(kinds)]
        try:
            pa.array(present, type=t)
            return t, None
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return pa.string(), "has values that do not fit a 64-bit number; they are written as text"
    if len(kinds) == 1 and kinds & {"datetime", "date", "nested"}:
        try:
            t = pa.array(present).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            t = None
        if t is not None and _representable(t):
            return t, None
        if t is not None:
            return pa.string(), (f"holds values of a type Hugging Face datasets has no feature for ({t}); they are "
                                 f"written as JSON text")
        if all(isinstance(v, list) and all(isinstance(e, tuple) and len(e) == 2 for e in v) for v in present):
            return pa.string(), ("holds maps (key-value pairs, as Parquet's map type), which Hugging Face datasets "
                                 "has no feature for; they are written as JSON text")
        return pa.string(), "holds nested values of different shapes; they are written as JSON text"
    if kinds == {"other"}:
        names = sorted({type(v).__name__ for v in present})
        return pa.string(), (f"holds values of a type the dataset keeps as text only ({', '.join(names)}); they "
                             f"are written as text")
    return pa.string(), (f"mixes values of types {', '.join(sorted(kinds))}; every value is written as text "
                         f"(give the column one type in the manifest to keep it)")


def passthrough_fields(extras: Iterable[Mapping[str, Any]], skip: Iterable[str] = ()) -> tuple[list[pa.Field], list[str]]:
    """Fields of the pass-through columns over every good row (in first-seen order) and warnings naming the
    columns whose values were turned into text."""
    skip = set(skip)
    columns: dict[str, list] = {}
    extras = list(extras)
    for extra in extras:
        for key in extra:
            if key not in skip:
                columns.setdefault(key, [])
    for extra in extras:
        for key, values in columns.items():
            values.append(extra.get(key))
    fields, warnings = [], []
    for key, values in columns.items():
        t, why = column_type(values)
        if why:
            warnings.append(f"pass-through column {key!r} {why}")
        fields.append(pa.field(key, t))
    return fields, warnings


def build_features(known: Mapping[str, pa.DataType | None], extras: Iterable[Mapping[str, Any]]):
    """`datasets.Features` for a run's data parts: `known` columns in order (image / audio as Image / Audio; the
    others as their Arrow type says), then the pass-through columns typed from every row. Returns (features,
    warnings)."""
    from datasets import Features
    from datasets.features.features import generate_from_arrow_type

    media = media_features()
    features: dict[str, Any] = {}
    for name, t in known.items():
        features[name] = media[name] if name in media else generate_from_arrow_type(t)
    fields, warnings = passthrough_fields(extras, skip=features)
    for f in fields:
        features[f.name] = generate_from_arrow_type(f.type)
    return Features(features), warnings


def schema_of(features) -> pa.Schema:
    """The Arrow schema of `features`, with the `huggingface` metadata that `datasets` reads back."""
    return features.arrow_schema


def features_from_json(d: Mapping[str, Any]):
    from datasets import Features

    return Features.from_dict(dict(d))


# ---------------------------------------------------------------------------------------------- cast
def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode()
    return str(value)


def as_text(value: Any) -> str | None:
    """A value as the text a string column holds: text as is, nested values as JSON, others as str()."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)


def table_of(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows cast to `schema` exactly (columns in its order; a column a row lacks is null; values of a text
    column made text). A row's column that the schema lacks is an error: the schema was decided from the
    whole manifest, so it can only mean a bug."""
    unknown = sorted({k for row in rows for k in row} - set(schema.names))
    if unknown:
        raise ValueError(f"columns {unknown} are not in the run's schema ({', '.join(schema.names)})")
    arrays = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if pa.types.is_string(f.type):
            values = [as_text(v) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
